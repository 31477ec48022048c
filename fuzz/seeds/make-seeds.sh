#!/usr/bin/env bash
# fuzz/seeds/make-seeds.sh OUT — seed inputs for the fuzz targets, written by the real Nix.
#
# Builds a small closure in a private chroot store (the system store is never touched), copies
# it with `nix copy` to file:// caches in every compression Nix writes, with NAR listings and a
# signing key, and sorts what lands there into OUT/<target>/. The committed corpus
# (fuzz/corpus/) is this output after `cargo fuzz cmin`; rerun this when Nix's output changes.
set -euo pipefail
OUT=$(realpath -m "${1:?usage: make-seeds.sh OUT}")
HERE=$(cd "$(dirname "$0")" && pwd)
W=$(mktemp -d "${TMPDIR:-/tmp}/nixcached-seeds.XXXXXX")
trap 'chmod -R u+w "$W" 2>/dev/null; rm -rf "$W"' EXIT
export HOME=$W XDG_CACHE_HOME=$W/xdg NIX_CONFIG='experimental-features = nix-command
sandbox = false
build-users-group =
substituters ='
STORE=$W/store
mkdir -p "$OUT"

# A tree with every kind of NAR node: nested and empty directories, executables, empty and
# multi-block files, odd names, relative and absolute symlinks.
T=$W/tree
mkdir -p "$T/bin" "$T/share/doc/empty" "$T/lib"
printf '#!/bin/sh\necho hi\n' > "$T/bin/hi" && chmod +x "$T/bin/hi"
: > "$T/empty"
head -c 20000 /dev/urandom > "$T/lib/blob"
printf 'seven b' > "$T/share/doc/7"
printf 'x' > "$T/share/doc/caf\xc3\xa9 (1) & <b>"
ln -s ../lib/blob "$T/bin/link"
ln -s /nix/store/does-not-exist "$T/abs"
TREE=$(nix-store --store "$STORE" --add "$T")
printf 'single file\n' > "$W/file" && FILE=$(nix-store --store "$STORE" --add "$W/file")
ln -s target "$W/symlink" && LINK=$(nix-store --store "$STORE" --add "$W/symlink")

# Built paths with references and a deriver, as in tests/common (static busybox builder).
mkdir -p "$W/bb/bin" && cp /bin/busybox "$W/bb/bin/busybox"
BB=$(nix-store --store "$STORE" --add "$W/bb")
cat > "$W/c.nix" <<NIX
let bb = builtins.storePath "$BB"; tree = builtins.storePath "$TREE";
  mk = name: cmd: builtins.derivation { inherit name; system = builtins.currentSystem;
    builder = "\${bb}/bin/busybox"; args = [ "sh" "-c" cmd ]; PATH = "\${bb}/bin"; };
in rec {
  lib = mk "seedlib" "mkdir -p \$out/lib && echo \${tree} > \$out/lib/x";
  app = mk "seedapp" "mkdir -p \$out/bin && echo \${lib} > \$out/bin/uses && ln -s \${lib}/lib/x \$out/link";
}
NIX
APP=$(nix-build --store "$STORE" "$W/c.nix" -A app --no-out-link)
nix-store --generate-binary-cache-key seed-1 "$W/sk" "$W/pk"
PATHS=("$APP" "$TREE" "$FILE" "$LINK")

for c in none xz zstd bzip2 gzip br; do
  nix copy --from "$STORE" --to "file://$W/cache-$c?compression=$c&write-nar-listing=true&secret-key=$W/sk" \
    "${PATHS[@]}"
done
# A cache without signatures or listings too (the minimal narinfo).
nix copy --from "$STORE" --to "file://$W/cache-plain?compression=none" "$FILE"

mkdir -p "$OUT"/{narinfo,cache_info,nar_reader,compressed_nar,listing,store_path,line_splitter,nar_path}
for d in "$W"/cache-*; do
  c=${d##*cache-}
  for f in "$d"/*.narinfo; do cp "$f" "$OUT/narinfo/$c-$(basename "$f")"; done
  for f in "$d"/*.ls; do [[ -e $f ]] && cp "$f" "$OUT/listing/$c-$(basename "$f")"; done
  cp "$d/nix-cache-info" "$OUT/cache_info/$c"
done
for f in "$W"/cache-none/nar/*.nar "$W"/cache-plain/nar/*.nar; do cp "$f" "$OUT/nar_reader/"; done
# compressed_nar: a selector byte (the codec's index in Compression::ALL; top bit set for the
# round-trip mode) before the stream, as Nix compressed it.
sel=0
for c in none xz zstd bzip2 gzip br; do
  for f in "$W/cache-$c"/nar/*; do
    { printf "\\$(printf '%03o' $sel)"; cat "$f"; } > "$OUT/compressed_nar/$c-$(basename "$f")"
  done
  f=$(ls "$W"/cache-none/nar/*.nar | head -1)
  { printf "\\$(printf '%03o' $((sel | 128)))"; cat "$f"; } > "$OUT/compressed_nar/roundtrip-$c"
  sel=$((sel + 1))
done
# Store path and hash forms as Nix prints them: base names, full paths, every hash encoding.
i=0
for p in $(nix-store --store "$STORE" -qR "$APP") "$TREE" "$FILE" "$LINK"; do
  i=$((i + 1))
  printf '%s' "$p" > "$OUT/store_path/path-$i"
  printf '%s' "${p#/nix/store/}" > "$OUT/store_path/base-$i"
  printf '%s\n' "$p" > "$OUT/line_splitter/line-$i"
  h=$(nix-store --store "$STORE" -q --hash "$p")
  printf '%s' "$h" > "$OUT/store_path/hash-nix32-$i"
  for fmt in base16 base32 sri; do
    nix hash to-$fmt "$h" > /dev/null 2>&1 && printf '%s' "$(nix hash to-$fmt "$h")" > "$OUT/store_path/hash-$fmt-$i"
  done
done
{ nix-store --store "$STORE" -qR "$APP"; printf '\0\n'; } > "$OUT/line_splitter/closure-finish"
printf '%s\r\n%s/\n\n%s' "$TREE" "$FILE" "$LINK" > "$OUT/line_splitter/crlf-slash"
printf '%s\n' "$(ls "$STORE/nix/store" | grep '\.drv$' | head -1 | sed 's|^|/nix/store/|')" > "$OUT/line_splitter/drv"
# Explorer paths as the explorer links them (percent-encoded segments).
printf 'bin/hi' > "$OUT/nar_path/plain"
printf '/share/doc/caf%%C3%%A9%%20%%281%%29%%20%%26%%20%%3Cb%%3E/' > "$OUT/nar_path/encoded"
printf 'a/%%2e%%2e/b' > "$OUT/nar_path/traversal"
"$HERE/hand-seeds.sh" "$OUT"
echo "seeds written to $OUT" >&2
