#!/usr/bin/env bash
# bench/catalog.sh -- the explorer index at scale (issue 11 item 6). One command:
#
#     bench/catalog.sh
#
# For each size in SIZES (100,000 and 1,000,000 objects): generates a file:// cache of that
# many synthetic narinfos (bench/gen-catalog-cache.py; kept in $WORK between runs), starts the
# release `nixcached serve file://CACHE`, asks for the index once (which starts discovery),
# waits until /metrics says the catalog holds every object, then times each index page with
# curl: the first request of each page after discovery, then WARM more (median and max).
# Pages: plain (/), search for a common word (q=hello, 1 in 12 objects), a rare search
# (q=perl-4242., 1 object), an uppercase search matching 5 in 12 names (q=O), sorted by size,
# a search sorted by size, and a deep page (after= the 101st object from the end, by size).
# Reports the daemon's peak RSS (VmHWM) and RSS at the end (VmRSS), and the discovery time.
#
# Env: SIZES="100000 1000000"; WARM=20; WORK=${TMPDIR:-/tmp}/nixcached-catalog-bench;
#      NO_BUILD=1 (use the existing release binary; BIN=PATH another one); QUIET_MAX=60 seconds to wait for the
#      machine to be idle (<10% CPU) before timing each size (a warning line if it never is).
# Needs: cargo (unless NO_BUILD), curl, python3.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZES=${SIZES:-"100000 1000000"}; WARM=${WARM:-20}; QUIET_MAX=${QUIET_MAX:-60}
WORK=${WORK:-${TMPDIR:-/tmp}/nixcached-catalog-bench}
BIN=${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/nixcached}
mkdir -p "$WORK"
[ -n "${NO_BUILD:-}" ] || (cd "$ROOT" && cargo build --release --bin nixcached)
[ -x "$BIN" ] || { echo "no $BIN" >&2; exit 2; }

PID=
cleanup() { [ -z "$PID" ] || { kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null || true; }; }
trap cleanup EXIT

busy_pct() { local a b i t=0
  read -ra a < <(head -1 /proc/stat); sleep 1; read -ra b < <(head -1 /proc/stat)
  for i in 1 2 3 4 5 6 7 8; do t=$((t + b[i] - a[i])); done
  echo $(( t > 0 ? 100 * (t - (b[4] + b[5] - a[4] - a[5])) / t : 0 )); }
wait_quiet() { local w=0 p
  while p=$(busy_pct); [ "$p" -ge 10 ]; do
    w=$((w + 2)); [ "$w" -lt "$QUIET_MAX" ] || { echo "warning: machine busy ($p% CPU) before $1"; break; }
    sleep 1; done; }
status_kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
metric() { curl -s "$URL/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
# Seconds of one request (fails unless 200).
timed() { local out; out=$(curl -s -o /dev/null -w '%{http_code} %{time_total}' "$URL$1")
  [ "${out%% *}" = 200 ] || { echo "$1 answered ${out%% *}" >&2; exit 1; }; echo "${out#* }"; }
ms() { awk '{printf "%.1f\n", $1 * 1000}'; }

echo "cpu: $(nproc) x $(lscpu | sed -n 's/^Model name: *//p' | head -1); load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "nixcached: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
for n in $SIZES; do
  cache=$WORK/cache-$n
  t0=$(date +%s)
  python3 "$ROOT/bench/gen-catalog-cache.py" "$n" "$cache"
  echo "== $n objects (cache generated or reused in $(( $(date +%s) - t0 )) s)"
  log=$WORK/serve-$n.log
  "$BIN" serve "file://$cache" --listen 127.0.0.1:0 --max-list-frequency 1h \
    --index-max-objects "$n" > "$log" 2>&1 &
  PID=$!
  URL=
  for _ in $(seq 100); do
    URL=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -o 'Listening on http://[^ ]*' | head -1 | sed 's/^Listening on //; s,/$,,') || true
    [ -n "$URL" ] && break; sleep 0.1
  done
  [ -n "$URL" ] || { cat "$log" >&2; exit 1; }
  t0=$(date +%s%N)
  timed / > /dev/null   # starts discovery
  while [ "$(metric nixcached_catalog_objects)" != "$n" ]; do
    kill -0 "$PID" || { cat "$log" >&2; exit 1; }; sleep 0.5; done
  echo "discovery: $(awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN{printf "%.1f", (b-a)/1e9}') s to learn $n objects"
  # The 101st object from the end by size, for the deep page.
  deep=$(python3 - "$cache" <<'EOF'
import glob, os, sys
rows = []
for f in glob.glob(os.path.join(sys.argv[1], "*.narinfo")):
    for line in open(f):
        if line.startswith("NarSize: "):
            rows.append((-int(line[9:]), os.path.basename(f)[:32]))
rows.sort()
print(rows[-101][1])
EOF
)
  wait_quiet "$n objects"
  printf '%-34s %10s %10s %10s\n' page first_ms warm_p50_ms warm_max_ms
  for page in "/" "/?q=hello" "/?q=perl-4242." "/?q=O" "/?sort=size" "/?q=hello&sort=size" "/?sort=size&after=$deep"; do
    first=$(timed "$page" | ms)
    warm=$(for _ in $(seq "$WARM"); do timed "$page" | ms; done | sort -n)
    p50=$(echo "$warm" | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    max=$(echo "$warm" | tail -1)
    label=$page; [ "${page#*after=}" = "$page" ] || label="/?sort=size&after=(deep)"
    printf '%-34s %10s %10s %10s\n' "$label" "$first" "$p50" "$max"
  done
  echo "peak RSS (VmHWM): $(( $(status_kib "$PID" VmHWM) / 1024 )) MiB; RSS now: $(( $(status_kib "$PID" VmRSS) / 1024 )) MiB"
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
done
