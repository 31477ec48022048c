#!/bin/sh
# Nix post-build hook: queues what was just built for nixcached-upload.service.
#
#   install -D -m 0755 post-build-hook.sh /usr/local/lib/nixcached/post-build-hook.sh
#   echo 'post-build-hook = /usr/local/lib/nixcached/post-build-hook.sh' >> /etc/nix/nix.conf
#
# Nix runs it (as the Nix daemon's user) after every build, with DRV_PATH and OUT_PATHS set,
# and waits for it: `nixcached send` only writes the paths to the upload FIFO (the upload
# itself happens later, in the uploader), and --timeout bounds the wait when the uploader is
# down and the FIFO is full.
#
# Environment: NIXCACHED_FIFO (default /run/nixcached-upload, as nixcached-upload.socket makes
# it), NIXCACHED_SEND_TIMEOUT (default 30s), NIXCACHED (the binary; default: from PATH).
set -eu

# Nix 2.8 (Debian's nix-bin) leaves OUT_PATHS empty: ask Nix for the derivation's outputs.
out=${OUT_PATHS:-}
if [ -z "$out" ] && [ -n "${DRV_PATH:-}" ]; then
  out=$(nix-store -q --outputs "$DRV_PATH")
fi
[ -n "$out" ] || exit 0

# A failing hook stops Nix's build loop, so a cache problem would fail builds: report it in the
# build log and let the build succeed. (`send` first writes the paths durably into the
# uploader's spool folder when there is one, so they are uploaded even when the FIFO write
# times out.)
# $out is unquoted on purpose: one argument per path (store paths have no spaces).
# shellcheck disable=SC2086
if ! "${NIXCACHED:-nixcached}" send -o "${NIXCACHED_FIFO:-/run/nixcached-upload}" \
    --timeout "${NIXCACHED_SEND_TIMEOUT:-30s}" $out; then
  echo "post-build-hook: could not queue $out for upload; continuing without it" >&2
fi
exit 0
