#!/usr/bin/env bash
# fuzz/seeds/hand-seeds.sh OUT — seeds that come from this repository rather than from Nix:
# the README's store URLs, the example config, and HTTP header values as clients send them.
set -euo pipefail
OUT=$(realpath -m "${1:?usage: hand-seeds.sh OUT}")
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUT"/{store_url,config,http_headers}

n=0
url() { n=$((n + 1)); printf '%s' "$1" > "$OUT/store_url/url-$n"; }
# Every URL form the README's "Store URLs" table shows, in each dialect it names.
for u in /nix/store /some/dir local auto 'local?root=/some/dir' file:///srv/cache \
  'file:///srv/cache?create_dir=1' 'file:///cache?compression=zstd&write-nar-listing=true' \
  s3://bucket 's3://bucket?region=eu-west-1&endpoint=https://s3.example:9000&profile=p&prefix=dir/sub' \
  's3://bucket?endpoint=127.0.0.1:9000&disableSSL=true&s3ForcePathStyle=true' \
  's3://bucket?endpoint=minio:9000&scheme=http&addressing-style=virtual&compression=xz&awssdk=v2' \
  gs://bucket 'gs://bucket?prefix=dir&endpoint=http://127.0.0.1:4443' \
  'gs://bucket?access_id=x&private_key_path=/k' ssh://host 'ssh://user@host:2222/nix/store' \
  'ssh://host?ssh-key=/k&remote-store=/r&remote-program=/bin/nix-store&compress=1' \
  https://cache.nixos.org 'http://localhost:38380/' 'https://cache.example/prefix'; do
  url "$u"
done
# And the URLs in the README's prose and examples.
grep -o '\(s3\|gs\|ssh\|file\|https\?\)://[^ `"|)<>]*' "$ROOT/README.md" | grep -v '…' | sort -u \
  | while read -r u; do n=$((n + 1)); printf '%s' "$u" > "$OUT/store_url/readme-$n"; done

cp "$ROOT/contrib/nixcached.example.toml" "$OUT/config/example.toml"
awk '/^```toml/{f=1; n++; next} /^```/{f=0} f{print > ("'"$OUT"'/config/readme-" n ".toml")}' "$ROOT/README.md"
printf '[[upload]]\ninput = "/run/q"\ndest = "s3://b?region=r"\njobs = 4\nqueue-size = 100\n' > "$OUT/config/upload.toml"

# http_headers: first byte picks the header (see fuzz_targets/http_headers.rs), rest is the value.
h=0
hdr() { h=$((h + 1)); printf '%s%s' "$1" "$2" > "$OUT/http_headers/h-$h"; }
for v in 'bytes=0-99' 'bytes=100-' 'bytes=-5' 'bytes=0-1,5-6' ' bytes = 3 - 4 ' 'bytes=18446744073709551615-'; do hdr R "$v"; done
for v in 'text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8' '*/*' 'text/*;q=0.5, text/html;q=0.1' \
  'text/x-nix-narinfo' ''; do hdr A "$v"; done
for v in 'gzip, deflate, br, zstd' 'zstd;q=0' 'ZSTD; q=0.5' 'identity' '*'; do hdr E "$v"; done
