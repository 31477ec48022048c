#!/usr/bin/env python3
"""gen-catalog-cache.py N DIR [--nars] -- a file:// binary cache of N synthetic narinfos.

For the explorer index benchmark (bench/catalog.sh): the index needs only narinfos. Names
look like Nix ones (word-number.variant, some capitalised), sizes vary with many ties, the
first 200 objects form a chain of shared dependencies (like glibc and friends) and every other
object refers to 3 of them, so closures are a few hundred objects deep, as in real caches.
Deterministic: the same N gives the same cache. DIR is filled in place (existing files are
overwritten); a file DIR/.complete-N marks a finished cache so reruns skip the work.

With --nars (for gc and fsck at scale, bench/lifecycle.sh) every narinfo also gets its NAR
file, small (64 to 127 bytes) and of the narinfo's FileSize, so the cache holds 2N objects
that fsck finds whole; the marker is then DIR/.complete-N-nars.
"""
import os
import sys

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
WORDS = ["hello", "glibc", "python3", "zlib", "bash", "openssl", "Perl", "gcc", "curl",
         "coreutils", "systemd", "nodejs"]
BASE = 200
HASH = "sha256:1vn8cv29b1lzdb1pfpx4klpf2xja1iq8jbrvfk82f2ms1gc0gz4y"
M64 = (1 << 64) - 1


def mix(z):
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def digest(i):
    # 12 characters (60 bits) from each of three mixes.
    parts = [mix((i ^ (1 << 48)) + (j << 56)) for j in range(3)]
    return "".join(ALPHABET[(parts[k // 12] >> (5 * (k % 12))) & 31] for k in range(32))


def main():
    n, out = int(sys.argv[1]), sys.argv[2]
    nars = "--nars" in sys.argv[3:]
    done = os.path.join(out, f".complete-{n}" + ("-nars" if nars else ""))
    if os.path.exists(done):
        return
    os.makedirs(out, exist_ok=True)
    if nars:
        os.makedirs(os.path.join(out, "nar"), exist_ok=True)
    with open(os.path.join(out, "nix-cache-info"), "w") as f:
        f.write("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n")
    base = [f"{digest(i)}-{WORDS[i % len(WORDS)]}-{i // len(WORDS)}.{i % 7}" for i in range(BASE)]
    for i in range(n):
        d = digest(i)
        name = f"{WORDS[i % len(WORDS)]}-{i // len(WORDS)}.{i % 7}"
        size = 1024 + (mix(i) % 5000) * 512
        file_size = 64 + i % 64 if nars else size // 3
        if nars:
            with open(os.path.join(out, "nar", f"{d}.nar.xz"), "wb") as f:
                f.write(bytes(file_size))
        if i < BASE:
            refs = base[max(0, i - 2):i]
        else:
            refs = [base[mix(i * 3 + k) % BASE] for k in range(3)]
        with open(os.path.join(out, f"{d}.narinfo"), "w") as f:
            f.write(f"StorePath: /nix/store/{d}-{name}\nURL: nar/{d}.nar.xz\nCompression: xz\n"
                    f"FileHash: {HASH}\nFileSize: {file_size}\nNarHash: {HASH}\nNarSize: {size}\n"
                    f"References: {' '.join(refs)}\n")
    open(done, "w").close()


if __name__ == "__main__":
    main()
