#!/usr/bin/env bash
# Copied verbatim (apart from this line) from the team's shared bench material, /work/shared/bench/anchor-bench.sh (see ANCHORS.md there).
# anchor-bench.sh -- HTTP binary-cache serving benchmark (the "(c)" anchor measurements).
#
# Usage: anchor-bench.sh BASE_URL CACHE_DIR [LABEL]
#   BASE_URL   where a server serves CACHE_DIR, e.g. http://127.0.0.1:8081 (a path prefix is ok)
#   CACHE_DIR  a Nix file:// binary cache (nix-cache-info, *.narinfo, nar/...), as made by
#              `nix copy --to file://DIR?compression=...`; the server must serve exactly it
#   LABEL      prefix of every printed line (default: "bench")
# Env: RUNS (5) wrk repetitions; NAR_RUNS (5) NAR-fetch repetitions; DURATION (10) wrk seconds;
#      CONNS ("1 16") wrk connection counts; PARS ("1 16") NAR-fetch concurrency;
#      WRK_THREADS (2) max wrk threads; QUIET_MAX (180) seconds to wait, before each run, for
#      the machine to be idle (<10% CPU busy over 1 s; a warning line if it never is);
#      KEEP (unset) keep the work dir.
# Needs: wrk (Debian 'wrk'), curl >= 7.66 (--parallel), python3, timeout.
#
# What it measures:
#  narinfo: wrk with a Lua script requesting every *.narinfo of CACHE_DIR round-robin,
#           DURATION s per run, at each of CONNS connections: requests/s, latency p50/p99.
#  nar:     fetch every NAR referenced by the narinfos once, with curl (one process, libcurl
#           multi: sequential for P=1, --parallel --parallel-max P otherwise) to /dev/null:
#           wall time, MiB/s of NAR-equivalent (sum NarSize) and of wire bytes (sum FileSize).
# Output: one line per figure "LABEL <test> <figure> <median>  [runs: r1 r2 r3]"; medians of
# RUNS runs. A warm-up pass (all narinfos + all NARs, checked for 200 and exact byte counts)
# runs first and aborts the benchmark if the server does not serve the cache correctly.
set -euo pipefail
BASE=${1:?usage: anchor-bench.sh BASE_URL CACHE_DIR [LABEL]}
CACHE=${2:?usage: anchor-bench.sh BASE_URL CACHE_DIR [LABEL]}
LABEL=${3:-bench}
RUNS=${RUNS:-5}; NAR_RUNS=${NAR_RUNS:-5}; QUIET_MAX=${QUIET_MAX:-180}; DURATION=${DURATION:-10}; CONNS=${CONNS:-"1 16"}; PARS=${PARS:-"1 16"}
WRK_THREADS=${WRK_THREADS:-2}
BASE=${BASE%/}
for t in wrk curl python3 timeout; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 2; }; done
[ -f "$CACHE/nix-cache-info" ] || { echo "$CACHE is not a binary cache dir" >&2; exit 2; }
W=$(mktemp -d /tmp/anchor-bench.XXXXXX)
[ -n "${KEEP:-}" ] || trap 'rm -rf "$W"' EXIT

# --- inventory of the cache --------------------------------------------------------------
python3 - "$CACHE" "$BASE" "$W" <<'EOF'
import os, sys, glob, urllib.parse
cache, base, w = sys.argv[1:]
prefix = urllib.parse.urlsplit(base).path.rstrip('/')
ni, nars = [], []
nar_total = wire_total = 0
for f in sorted(glob.glob(os.path.join(cache, '*.narinfo'))):
    kv = {}
    for line in open(f):
        k, _, v = line.rstrip('\n').partition(': ')
        kv[k] = v
    ni.append(prefix + '/' + os.path.basename(f))
    size = int(kv['FileSize']) if 'FileSize' in kv else os.path.getsize(os.path.join(cache, kv['URL']))
    nars.append((kv['URL'], size)); nar_total += int(kv['NarSize']); wire_total += size
open(f'{w}/narinfo.paths', 'w').write(''.join(p + '\n' for p in ni))
with open(f'{w}/nar.curlrc', 'w') as c:
    for u, _ in nars:
        c.write(f'url = "{base}/{u}"\noutput = "/dev/null"\n')
with open(f'{w}/ni.curlrc', 'w') as c:
    for p in ni:
        c.write(f'url = "{base}{p[len(prefix):]}"\noutput = "/dev/null"\n')
open(f'{w}/totals', 'w').write(f'{len(ni)} {nar_total} {wire_total}\n')
EOF
read -r N NAR_BYTES WIRE_BYTES < "$W/totals"
[ "$N" -gt 0 ] || { echo "no narinfo in $CACHE" >&2; exit 2; }

cat > "$W/rr.lua" <<'EOF'
local paths = {}
for line in io.lines(os.getenv("NARINFO_LIST")) do paths[#paths + 1] = line end
local i = 0
function setup(thread) end
function init(args) i = math.random(#paths) end
function request()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT rps=%.1f p50_us=%d p99_us=%d mean_us=%.1f requests=%d bytes=%d non2xx=%d errs=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50), latency:percentile(99),
    latency.mean, summary.requests, summary.bytes, e.status, e.connect + e.read + e.write + e.timeout))
end
EOF

now() { date +%s%N; }
# wait until other processes leave the 2 cores alone (this machine is shared with builds)
busy_pct() { local a b i t=0
  read -ra a < <(head -1 /proc/stat); sleep 1; read -ra b < <(head -1 /proc/stat)
  for i in 1 2 3 4 5 6 7 8; do t=$((t + b[i] - a[i])); done
  echo $(( t > 0 ? 100 * (t - (b[4] + b[5] - a[4] - a[5])) / t : 0 )); }
wait_quiet() { local w=0 p
  while p=$(busy_pct); [ "$p" -ge 10 ]; do
    w=$((w + 1)); [ "$w" -lt "$QUIET_MAX" ] || { echo "$LABEL warning: machine busy ($p% CPU) before $1" >&2; return; }
    sleep 4; w=$((w + 4)); done; }
# curl over a config; prints "codes_ok total_bytes count"
curl_all() { # $1 curlrc, $2 parallelism
  local par=()
  [ "$2" -gt 1 ] && par=(--parallel --parallel-max "$2")
  timeout 600 curl -sS --no-progress-meter "${par[@]}" -K "$1" -w '%{http_code} %{size_download}\n' \
    | awk '{n++; b+=$2; if ($1==200) ok++} END {printf "%d %d %d\n", ok, b, n}'
}

# --- warm-up + correctness check ------------------------------------------------------------
read -r ok b n < <(curl_all "$W/ni.curlrc" 16)
[ "$ok" -eq "$N" ] || { echo "warm-up: only $ok/$N narinfos answered 200" >&2; exit 3; }
read -r ok b n < <(curl_all "$W/nar.curlrc" 16)
[ "$ok" -eq "$N" ] && [ "$b" -eq "$WIRE_BYTES" ] \
  || { echo "warm-up: NARs: $ok/$N answered 200, $b/$WIRE_BYTES bytes" >&2; exit 3; }
echo "$LABEL cache narinfos $N  nar_bytes $NAR_BYTES  wire_bytes $WIRE_BYTES  ($CACHE via $BASE)"

med() { python3 -c 'import sys,statistics; print(f"{statistics.median(float(x) for x in sys.argv[1:]):.6g}")' "$@"; }
line() { # label test figure values...
  local l=$1 t=$2 f=$3; shift 3
  printf '%s %s %s %s  [runs: %s]\n' "$l" "$t" "$f" "$(med "$@")" "$*"
}

# --- narinfo throughput (wrk) ----------------------------------------------------------------
for c in $CONNS; do
  th=$(( c < WRK_THREADS ? c : WRK_THREADS ))
  rps=(); p50=(); p99=(); bad=0
  for r in $(seq "$RUNS"); do
    wait_quiet "narinfo_c$c run $r"
    out=$(NARINFO_LIST="$W/narinfo.paths" timeout $((DURATION + 30)) \
      wrk -t"$th" -c"$c" -d"${DURATION}s" --timeout 5s -s "$W/rr.lua" "$BASE/" | grep '^RESULT')
    eval "$(echo "$out" | sed 's/^RESULT //; s/\([a-z0-9_]*\)=/local_\1=/g')"
    rps+=("$local_rps"); p50+=("$(awk -v u="$local_p50_us" 'BEGIN{printf "%.3f", u/1000}')")
    p99+=("$(awk -v u="$local_p99_us" 'BEGIN{printf "%.3f", u/1000}')")
    bad=$((bad + local_non2xx + local_errs))
  done
  line "$LABEL" "narinfo_c$c" req_per_s "${rps[@]}"
  line "$LABEL" "narinfo_c$c" p50_ms "${p50[@]}"
  line "$LABEL" "narinfo_c$c" p99_ms "${p99[@]}"
  [ "$bad" -eq 0 ] || echo "$LABEL narinfo_c$c errors_or_non2xx $bad"
done

# --- NAR throughput (curl) ---------------------------------------------------------------------
for p in $PARS; do
  secs=(); narm=(); wirem=()
  for r in $(seq "$NAR_RUNS"); do
    wait_quiet "nar_p$p run $r"
    t0=$(now); read -r ok b n < <(curl_all "$W/nar.curlrc" "$p"); t1=$(now)
    [ "$ok" -eq "$N" ] && [ "$b" -eq "$WIRE_BYTES" ] || echo "$LABEL nar_p$p run $r: $ok/$N ok, $b/$WIRE_BYTES bytes" >&2
    s=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", (b-a)/1e9}')
    secs+=("$s")
    narm+=("$(awk -v x="$NAR_BYTES" -v s="$s" 'BEGIN{printf "%.1f", x/1048576/s}')")
    wirem+=("$(awk -v x="$WIRE_BYTES" -v s="$s" 'BEGIN{printf "%.1f", x/1048576/s}')")
  done
  line "$LABEL" "nar_p$p" wall_s "${secs[@]}"
  line "$LABEL" "nar_p$p" nar_MiB_per_s "${narm[@]}"
  line "$LABEL" "nar_p$p" wire_MiB_per_s "${wirem[@]}"
done
