#!/usr/bin/env bash
# bench/lifecycle.sh -- fsck and gc at scale (issue 14 item 5). One command:
#
#     bench/lifecycle.sh
#
# Generates (bench/gen-catalog-cache.py --nars) a file:// cache of N narinfos, each with its
# NAR file: 2N objects. Then, timing each with /usr/bin/time (wall clock, peak RSS):
#   1. fsck                          (every narinfo read and checked, NAR sizes from the listing)
#   2. gc --dry-run --max-size 100M  (everything read, LRU down to 100 MB, nothing changed)
#   3. gc --max-size LIMIT           (for real: LIMIT is 90% of what the cache holds, so about
#                                     a tenth of the paths go, referrers first)
#   4. fsck                          (the collected cache: no finding other than the NARs
#                                     waiting for the grace period)
# Step 3 changes the cache; the next run generates it again (a marker says it was collected).
#
# Env: N=1000000; WORK=/work/scale (or $TMPDIR); NO_BUILD=1 uses the existing release binary
# (BIN=PATH another one); JOBS=16.
# Needs: cargo (unless NO_BUILD), python3, /usr/bin/time. About 8 GB of disk for N=1000000
# (small files take a block each).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=${N:-1000000}; JOBS=${JOBS:-16}
WORK=${WORK:-$([ -d /work ] && echo /work/scale || echo "${TMPDIR:-/tmp}/nixcached-scale")}
BIN=${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/nixcached}
CACHE=$WORK/c$N
[ -n "${NO_BUILD:-}" ] || (cd "$ROOT" && cargo build --release --bin nixcached)
[ -x "$BIN" ] || { echo "no $BIN" >&2; exit 2; }
[ -x /usr/bin/time ] || { echo "needs /usr/bin/time (apt-get install time)" >&2; exit 2; }

if [ -e "$CACHE/.collected" ]; then rm -rf "$CACHE"; fi
t0=$(date +%s)
python3 "$ROOT/bench/gen-catalog-cache.py" "$N" "$CACHE" --nars
echo "cpu: $(nproc) x $(lscpu | sed -n 's/^Model name: *//p' | head -1); load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "nixcached: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'); cache: $N narinfos + $N NARs (generated or reused in $(( $(date +%s) - t0 )) s)"

# step NAME ARGS…: runs nixcached ARGS… --json, prints wall time, peak RSS and a summary.
step() { local name=$1; shift
  local out=$WORK/$name.json tm=$WORK/$name.time rc=0
  /usr/bin/time -v "$BIN" "$@" > "$out" 2> "$tm" || rc=$?
  local wall rss
  wall=$(sed -n 's/.*Elapsed (wall clock) time (h:mm:ss or m:ss): //p' "$tm")
  rss=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$tm")
  printf '%-8s exit %s  wall %8s  peak RSS %4d MiB  ' "$name" "$rc" "$wall" $(( rss / 1024 ))
  python3 - "$out" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
if "findings" in r:
    kinds = {}
    for f in r["findings"]:
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
    print(f"narinfos {r['narinfos']}, NAR files {r['nar_files']}, findings {kinds or 'none'}")
else:
    print(f"narinfos {r['narinfos']}, kept {r['kept']}, removed {len(r['removed_narinfos'])} narinfos"
          f" + {len(r['removed_files'])} files, {r['total_bytes']} -> {r['kept_bytes']} bytes")
PY
}
step fsck fsck --json --jobs "$JOBS" "file://$CACHE"
step gc-dry gc --json --jobs "$JOBS" --dry-run --grace 0s --max-size 100M "file://$CACHE"
total=$(python3 -c "import json; print(json.load(open('$WORK/gc-dry.json'))['total_bytes'])")
touch "$CACHE/.collected"
step gc gc --json --jobs "$JOBS" --grace 0s --max-size $(( total * 9 / 10 )) "file://$CACHE"
step fsck-2 fsck --json --jobs "$JOBS" "file://$CACHE"
