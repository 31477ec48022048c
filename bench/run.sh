#!/usr/bin/env bash
# bench/run.sh -- nixcached's benchmark harness (issues #4 serve and #5 upload). One command:
#
#     bench/run.sh
#
# What it does, in one run (so every figure is a ratio to an anchor measured minutes apart):
#  1. cargo build --release (target/release/nixcached); installs nginx, wrk, curl with apt-get
#     when missing. Nix must already be set up (`sudo scripts/test` once does that).
#  2. builds the corpus closure (bench/make-corpus.sh: 206 paths, ~650 MiB of NAR) and a zstd
#     binary cache of it with `nix copy --to file://…?compression=zstd` (kept in $WORK).
#  3. serve: starts nginx (own config, 127.0.0.1, free port) on that cache, `nixcached serve
#     file://CACHE` and `nixcached serve /nix/store` (both --listen 127.0.0.1:0), then RUNS
#     rounds; each round runs bench/anchor-bench.sh once against every server (narinfo req/s at
#     1 and 16 connections with wrk, NAR MiB/s at 1 and 16 parallel fetches with curl), the
#     order rotating between rounds, plus `nix-store --dump` of every closure path (206
#     processes) and one `nix-store --export` of the closure (the local-store anchors).
#  4. upload: UPLOAD_RUNS rounds of `nix copy --to file://FRESH?compression=C` against
#     `nixcached upload --from /nix/store --input PATHS --state-dir FRESH --compression C
#     --jobs 2 --progress-interval 0 file://FRESH` of the same top path, C in zstd and xz,
#     fresh destinations every time; checks both caches hold the same NARs.
#  5. load: nginx and `nixcached serve file://CACHE` each take LOAD_RUNS rounds (order rotating)
#     of wrk with LOAD_CONNS (1000) keep-alive connections for DURATION s, every other request
#     a narinfo of the cache (200) and the others a digest nobody has (404): requests/s, p50 and
#     p99 latency, answers by status, socket errors, and the daemon's peak RSS.
#  6. slow: bench/slow-readers.py: SLOW_READERS (600) clients ask for a SLOW_MB (20) MB file and
#     read nothing, served three ways (local store NAR, file:// NAR, explorer file view in a zstd
#     cache): the daemon's peak RSS before and with them, threads, another client's request
#     time, and whether every reader then gets the whole file.
#  7. prints a summary (medians, min-max, ratios, targets) and stops everything it started.
#
# Env (all optional):
#   RUNS=5          serve rounds (each round: every server once; the median over rounds is reported)
#   DURATION=10     seconds per wrk run
#   UPLOAD_RUNS=3   upload rounds for zstd;  XZ_RUNS=$UPLOAD_RUNS for xz (nix copy xz takes ~5 min)
#   UPLOAD_COMPS="zstd xz"
#   JOBS="1 2"      nixcached upload --jobs values, each timed (1 gives the per-core figure)
#   PARTS="serve upload load slow"   which parts to run
#   LOAD_RUNS=3 LOAD_CONNS=1000   rounds and connections of the load part
#   SLOW_READERS=600 SLOW_MB=20   stalled readers and file size of the slow part
#   QUIET_MAX=180   seconds to wait before each timed run for the shared machine to be idle
#                   (<10 % CPU over 1 s); a run that never got a quiet machine is flagged
#   WORK=${TMPDIR:-/tmp}/nixcached-bench   corpus GC root and the zstd cache (kept between runs);
#                   per-run files go to $WORK/run-STAMP and are removed unless KEEP=1
#   RESULTS=bench/results   raw lines, machine description and summary of each run
#   NO_BUILD=1      use the existing target/release/nixcached
# Results: $RESULTS/<stamp>-raw.txt, -machine.txt, -summary.md (the summary is also printed).
# One run at a time: a second bench/run.sh waits on ${TMPDIR:-/tmp}/nixcached-bench.lock.
# bench/summarize.py RAW [MACHINE] re-makes a summary from a raw file.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin
export NO_COLOR=1 LC_ALL=C
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
RUNS=${RUNS:-5}; DURATION=${DURATION:-10}; QUIET_MAX=${QUIET_MAX:-180}
UPLOAD_RUNS=${UPLOAD_RUNS:-3}; XZ_RUNS=${XZ_RUNS:-$UPLOAD_RUNS}; UPLOAD_COMPS=${UPLOAD_COMPS:-"zstd xz"}
JOBS=${JOBS:-"1 2"}; PARTS=${PARTS:-"serve upload load slow"}
LOAD_RUNS=${LOAD_RUNS:-3}; LOAD_CONNS=${LOAD_CONNS:-1000}; SLOW_READERS=${SLOW_READERS:-600}; SLOW_MB=${SLOW_MB:-20}
WORK=${WORK:-${TMPDIR:-/tmp}/nixcached-bench}
RESULTS=${RESULTS:-$HERE/results}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
T_START=$(date +%s)
say() { printf '== %s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { echo "bench/run.sh: $*" >&2; exit 1; }
has() { [[ " $PARTS " == *" $1 "* ]]; }

# --- prerequisites ---------------------------------------------------------------------------
SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
command -v cargo >/dev/null || die "cargo is missing: install Rust (https://rustup.rs) first"
command -v nix-store >/dev/null && command -v nix >/dev/null \
  || die "Nix is missing: run 'sudo scripts/test' once (it installs and configures Nix), then re-run"
pkgs=()
command -v nginx >/dev/null || pkgs+=(NGINX)
command -v wrk >/dev/null || pkgs+=(wrk)
command -v curl >/dev/null || pkgs+=(curl)
command -v python3 >/dev/null || pkgs+=(python3)
command -v timeout >/dev/null || pkgs+=(coreutils)
if [ ${#pkgs[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing ${pkgs[*]} (no apt-get here: install them by hand)"
  say "installing ${pkgs[*]} with apt-get"
  $SUDO apt-get update -qq
  if [[ " ${pkgs[*]} " == *" NGINX "* ]]; then
    ng=nginx; apt-cache show nginx-light >/dev/null 2>&1 && ng=nginx-light
    pkgs=("${pkgs[@]/NGINX/$ng}")
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
fi
NIX=(nix --extra-experimental-features nix-command)

mkdir -p "$WORK" "$RESULTS"
# two runs at once on one machine invalidate each other: wait for any other run to finish
exec 9>"${TMPDIR:-/tmp}/nixcached-bench.lock"
flock -n 9 || { say "another bench/run.sh is running; waiting for it to finish"; flock 9; }
W=$WORK/run-$STAMP; mkdir -p "$W"
RAW=$RESULTS/$STAMP-raw.txt; MACHINE=$RESULTS/$STAMP-machine.txt; SUMMARY=$RESULTS/$STAMP-summary.md
: > "$RAW"
export XDG_CACHE_HOME=$W/xdg   # fresh Nix narinfo disk cache: never trust "already in the cache"

# --- everything we start is stopped by PID ---------------------------------------------------
DAEMON_PIDS=(); NGINX_PID=
cleanup() {
  local rc=$? p
  for p in "${DAEMON_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  [ -z "$NGINX_PID" ] || kill -QUIT "$NGINX_PID" 2>/dev/null || true
  for p in "${DAEMON_PIDS[@]}" $NGINX_PID; do wait "$p" 2>/dev/null || true; done
  if [ -z "${KEEP:-}" ]; then chmod -R u+w "$W" 2>/dev/null || true; rm -rf "$W"; else echo "kept $W" >&2; fi
  exit $rc
}
# Stops the daemons and nginx a part started, and waits for them to go.
stop_servers() {
  local p
  for p in "${DAEMON_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  kill -QUIT "$NGINX_PID" 2>/dev/null || true; wait "$NGINX_PID" 2>/dev/null || true
  DAEMON_PIDS=(); NGINX_PID=
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

now() { date +%s%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", (b-a)/1e9}'; }
busy_pct() { local a b i t=0
  read -ra a < <(head -1 /proc/stat); sleep 1; read -ra b < <(head -1 /proc/stat)
  for i in 1 2 3 4 5 6 7 8; do t=$((t + b[i] - a[i])); done
  echo $(( t > 0 ? 100 * (t - (b[4] + b[5] - a[4] - a[5])) / t : 0 )); }
wait_quiet() { local w=0 p   # sets BUSY to the last CPU-busy % seen
  while p=$(busy_pct); [ "$p" -ge 10 ]; do
    w=$((w + 5)); [ "$w" -lt "$QUIET_MAX" ] || { echo "warning: machine busy ($p% CPU) before $1" | tee -a "$RAW" >&2; break; }
    sleep 4; done
  BUSY=$p; }
dir_bytes() { [ -d "$1" ] && find "$1" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}' || echo 0; }

# --- machine ---------------------------------------------------------------------------------
{
  echo "date_utc: $STAMP"
  echo "cpu: $(nproc) x $(lscpu | sed -n 's/^Model name: *//p' | head -1) ($(lscpu | sed -n 's/^Hypervisor vendor: *//p') guest)"
  echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
  echo "kernel: $(uname -r); os: $(. /etc/os-release; echo "$PRETTY_NAME") ($(cat /etc/debian_version 2>/dev/null || true))"
  echo "root fs: $(findmnt -no FSTYPE,SOURCE,OPTIONS / 2>/dev/null || true)"
  echo "nix: $(nix --version); nginx: $(nginx -v 2>&1 | sed 's/.*: //'); wrk: $(wrk -v 2>&1 | head -1 | awk '{print $2}'); curl: $(curl --version | head -1 | awk '{print $2}')"
  echo "rustc: $(rustc --version 2>/dev/null || true); python3: $(python3 --version 2>&1)"
  echo "nixcached: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" status --porcelain -uno 2>/dev/null | grep -q . && echo ' + uncommitted changes' || true)"
  echo "settings: RUNS=$RUNS DURATION=$DURATION UPLOAD_RUNS=$UPLOAD_RUNS XZ_RUNS=$XZ_RUNS UPLOAD_COMPS=\"$UPLOAD_COMPS\" JOBS=$JOBS QUIET_MAX=$QUIET_MAX PARTS=\"$PARTS\""
} > "$MACHINE"
cat "$MACHINE" >&2

# --- build -----------------------------------------------------------------------------------
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/nixcached
if [ -z "${NO_BUILD:-}" ]; then
  say "cargo build --release (waits if another build holds the target dir lock)"
  (cd "$ROOT" && cargo build --release --bin nixcached)
fi
[ -x "$BIN" ] || die "$BIN was not built"
echo "binary: $BIN ($(stat -c %y "$BIN" | cut -d. -f1))" >> "$MACHINE"
# run a private copy: a concurrent `cargo build --release` must not swap the binary mid-run
cp "$BIN" "$W/nixcached"; BIN=$W/nixcached

# --- corpus and the zstd cache ---------------------------------------------------------------
say "corpus (bench/make-corpus.sh)"
t0=$(now)
CORPUS_WORK=$WORK/corpus "$HERE/make-corpus.sh" > "$W/corpus.out"
cat "$W/corpus.out" >&2
TOP=$(tail -1 "$W/corpus.out")
[ -e "$TOP" ] || die "make-corpus.sh did not print a store path"
mapfile -t CLOSURE < <(nix-store -qR "$TOP")
N=${#CLOSURE[@]}
NARSUM=$("${NIX[@]}" path-info -r --json "$TOP" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(sum(i["narSize"] for i in (d if isinstance(d,list) else d.values())))')
echo "corpus: $TOP, $N paths, $NARSUM NAR bytes (built/checked in $(secs "$t0" "$(now)") s)" | tee -a "$MACHINE" >&2
echo "corpus top=$TOP paths=$N nar_bytes=$NARSUM" >> "$RAW"
printf '%s\n' "$TOP" > "$W/paths"

CACHE=$WORK/cache-zstd
if ! { [ "$(cat "$WORK/cache-zstd.top" 2>/dev/null)" = "$TOP" ] \
       && [ "$(find "$CACHE" -maxdepth 1 -name '*.narinfo' | wc -l)" -eq "$N" ]; }; then
  say "making the zstd cache nginx and the daemon serve: nix copy --to file://$CACHE?compression=zstd"
  rm -rf "$CACHE" "$WORK/cache-zstd.top"
  "${NIX[@]}" copy --to "file://$CACHE?compression=zstd" "$TOP"
  echo "$TOP" > "$WORK/cache-zstd.top"
fi

# --- servers ---------------------------------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
start_nginx() { # $1 = root dir; sets NGINX_URL
  local d=$W/nginx port; port=$(free_port); mkdir -p "$d/logs"
  cat > "$d/nginx.conf" <<EOF
worker_processes auto;
pid $d/nginx.pid;
error_log $d/logs/error.log warn;
$([ "$(id -u)" -eq 0 ] && echo 'user root root;')
events { worker_connections 4096; }
http {
  types { text/x-nix-narinfo narinfo; text/plain nix-cache-info; }
  default_type application/octet-stream;
  sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_timeout 65; keepalive_requests 1000000;
  access_log off;
  open_file_cache max=10000 inactive=60s;
  client_body_temp_path $d/tmp-body; proxy_temp_path $d/tmp-proxy;
  fastcgi_temp_path $d/tmp-fcgi; uwsgi_temp_path $d/tmp-uwsgi; scgi_temp_path $d/tmp-scgi;
  server { listen 127.0.0.1:$port; root $1; }
}
EOF
  nginx -p "$d" -c "$d/nginx.conf" -g 'daemon off;' 2>>"$d/logs/stderr" 9>&- &
  NGINX_PID=$!
  NGINX_URL=http://127.0.0.1:$port
  for _ in $(seq 100); do curl -sf "$NGINX_URL/nix-cache-info" >/dev/null && return; sleep 0.1; done
  cat "$d/logs/"* >&2; die "nginx did not come up"
}
start_daemon() { # $1 = log name, $2 = store URL; sets DAEMON_URL
  local log=$W/$1.log url= pid
  "$BIN" serve --listen 127.0.0.1:0 "$2" >"$log" 2>&1 9>&- &
  pid=$!; DAEMON_PIDS+=("$pid")
  for _ in $(seq 300); do
    url=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -o 'Listening on http://[^ ]*' | head -1 | sed 's/^Listening on //; s,/$,,') || true
    [ -z "$url" ] || break
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; die "nixcached serve $2 exited"; }
    sleep 0.1
  done
  [ -n "$url" ] || { cat "$log" >&2; die "no 'Listening on http://…' line from nixcached serve $2"; }
  curl -sf "$url/nix-cache-info" >/dev/null || die "$url/nix-cache-info does not answer"
  DAEMON_URL=$url
}

bench_one() { # label url cache round
  local rc=0
  RUNS=1 NAR_RUNS=1 DURATION=$DURATION QUIET_MAX=$QUIET_MAX \
    "$HERE/anchor-bench.sh" "$2" "$3" "$1@$4" > "$W/ab.out" 2>&1 || rc=$?
  grep -v ' cache narinfos ' "$W/ab.out" | tee -a "$RAW" >&2 || true
  [ "$rc" -eq 0 ] || echo "$1@$4 FAILED anchor-bench exit $rc" | tee -a "$RAW" >&2
}
dump_round() { # round
  local t0 t1 s p
  wait_quiet "dump-loop round $1"; t0=$(now)
  for p in "${CLOSURE[@]}"; do nix-store --dump "$p" >/dev/null; done
  t1=$(now); s=$(secs "$t0" "$t1")
  echo "dump variant=loop round=$1 wall_s=$s MiB_per_s=$(awk -v x="$NARSUM" -v s="$s" 'BEGIN{printf "%.1f", x/1048576/s}') busy_before=$BUSY%" | tee -a "$RAW" >&2
  wait_quiet "export round $1"; t0=$(now)
  nix-store --export "${CLOSURE[@]}" >/dev/null
  t1=$(now); s=$(secs "$t0" "$t1")
  echo "dump variant=export round=$1 wall_s=$s MiB_per_s=$(awk -v x="$NARSUM" -v s="$s" 'BEGIN{printf "%.1f", x/1048576/s}') busy_before=$BUSY%" | tee -a "$RAW" >&2
}

if has serve; then
  say "starting nginx and two daemons"
  start_nginx "$CACHE"; NG=$NGINX_URL
  start_daemon daemon-file "file://$CACHE"; DF=$DAEMON_URL
  start_daemon daemon-local /nix/store; DL=$DAEMON_URL
  echo "servers nginx=$NG daemon-file=$DF daemon-local=$DL" | tee -a "$RAW" >&2
  # anchor-bench.sh reads the narinfos it requests from a cache dir: for the local store that
  # is what the daemon itself serves (NAR URL nar/<digest>.nar, FileSize = NarSize).
  LV=$W/local-view; mkdir -p "$LV"
  curl -sf "$DL/nix-cache-info" > "$LV/nix-cache-info"
  for p in "${CLOSURE[@]}"; do
    h=$(basename "$p"); h=${h%%-*}
    curl -sf "$DL/$h.narinfo" > "$LV/$h.narinfo" || die "daemon-local: no narinfo for $p"
  done
  python3 - "$LV" <<'EOF'
import glob, sys
for f in glob.glob(sys.argv[1] + '/*.narinfo'):
    t = open(f).read()
    if '\nFileSize: ' not in t:
        size = [l.split(': ')[1] for l in t.splitlines() if l.startswith('NarSize: ')][0]
        open(f, 'w').write(t + f'FileSize: {size}\n')
EOF
  servers=("nginx-zstd $NG $CACHE" "daemon-file $DF $CACHE" "daemon-local $DL $LV")
  for r in $(seq "$RUNS"); do
    say "serve round $r/$RUNS"
    for i in "${!servers[@]}"; do   # rotate the order between rounds
      read -r label url dir <<< "${servers[$(( (i + r - 1) % ${#servers[@]} ))]}"
      bench_one "$label" "$url" "$dir" "$r"
    done
    dump_round "$r"
  done
  for f in "$W"/daemon-*.log; do
    grep -Ei 'error|warn|panic' "$f" | head -5 | sed "s,^,$(basename "$f"): ," | tee -a "$RAW" >&2 || true
  done
  stop_servers
fi

# --- load: many keep-alive connections, hits and misses --------------------------------------
if has load; then
  # LOAD_CONNS sockets for wrk, as many for each server.
  ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
  say "load: nginx and nixcached serve file://, $LOAD_CONNS connections"
  start_nginx "$CACHE"; NG=$NGINX_URL
  start_daemon daemon-load "file://$CACHE"; DF=$DAEMON_URL; LOAD_PID=${DAEMON_PIDS[-1]}
  find "$CACHE" -maxdepth 1 -name '*.narinfo' -printf '/%f\n' > "$W/load.paths"
  cat > "$W/mix.lua" <<'EOF'
-- Every other request a narinfo of the cache, the others a digest nobody has.
local paths = {}
for line in io.lines(os.getenv("NARINFO_LIST")) do paths[#paths + 1] = line end
local alphabet = "0123456789abcdfghijklmnpqrsvwxyz"
local threads, i, n = {}, 0, 0
function setup(thread) table.insert(threads, thread) end
function init(args) i = math.random(#paths); ok, missing, other = 0, 0, 0 end
function request()
  n = n + 1
  if n % 2 == 0 then
    i = i % #paths + 1
    return wrk.format("GET", paths[i])
  end
  local d = {}
  for k = 1, 32 do local r = math.random(32); d[k] = alphabet:sub(r, r) end
  return wrk.format("GET", "/" .. table.concat(d) .. ".narinfo")
end
function response(status, headers, body)
  if status == 200 then ok = ok + 1 elseif status == 404 then missing = missing + 1 else other = other + 1 end
end
function done(summary, latency, requests)
  local o, m, x = 0, 0, 0
  for _, t in ipairs(threads) do o = o + t:get("ok"); m = m + t:get("missing"); x = x + t:get("other") end
  local e = summary.errors
  io.write(string.format("RESULT rps=%.1f p50_ms=%.3f p99_ms=%.3f ok=%d missing=%d other=%d errs=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    o, m, x, e.connect + e.read + e.write + e.timeout))
end
EOF
  load_servers=("nginx $NG" "daemon-file $DF")
  for r in $(seq "$LOAD_RUNS"); do
    for i in "${!load_servers[@]}"; do   # rotate the order between rounds
      read -r label url <<< "${load_servers[$(( (i + r - 1) % ${#load_servers[@]} ))]}"
      wait_quiet "load $label round $r"
      out=$(NARINFO_LIST="$W/load.paths" timeout $((DURATION + 60)) \
        wrk -t2 -c"$LOAD_CONNS" -d"${DURATION}s" --timeout 5s -s "$W/mix.lua" "$url/" | grep '^RESULT' || true)
      [ -n "$out" ] || out="RESULT FAILED"
      echo "load server=$label conns=$LOAD_CONNS round=$r ${out#RESULT } busy_before=$BUSY%" | tee -a "$RAW" >&2
    done
  done
  echo "load peak server=daemon-file rss_kib=$(awk '/^VmHWM:/ {print $2}' "/proc/$LOAD_PID/status")" | tee -a "$RAW" >&2
  stop_servers
fi

# --- slow: stalled readers (bench/slow-readers.py) -------------------------------------------------
if has slow; then
  ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
  say "slow: $SLOW_READERS stalled readers of a ${SLOW_MB} MB file, three ways of serving it"
  wait_quiet "slow readers"
  python3 "$HERE/slow-readers.py" "$BIN" "$W/slow" "$SLOW_READERS" "$SLOW_MB" 2>&1 \
    | grep '^slow ' | tee -a "$RAW" >&2 || echo "slow FAILED" | tee -a "$RAW" >&2
fi

# --- upload ----------------------------------------------------------------------------------
upload_one() { # tool comp run
  local tool=$1 comp=$2 r=$3 d=$W/up/$1-$2-$3 st=$W/up/state-$2-$3 log=$W/up/$1-$2-$3.log t0 t1 rc=0
  mkdir -p "$W/up"; sync; wait_quiet "$tool $comp run $r"
  t0=$(now)
  if [ "$tool" = nix ]; then
    timeout 3600 "${NIX[@]}" copy --to "file://$d?compression=$comp" "$TOP" 2>"$log" || rc=$?
  else
    timeout 3600 "$BIN" upload --from /nix/store --input "$W/paths" --state-dir "$st-$tool" \
      --compression "$comp" --jobs "${tool#nixcached-j}" --progress-interval 0 "file://$d" 2>"$log" || rc=$?
  fi
  t1=$(now)
  local n; n=$(find "$d" -maxdepth 1 -name '*.narinfo' 2>/dev/null | wc -l)
  echo "upload tool=$tool comp=$comp run=$r wall_s=$(secs "$t0" "$t1") bytes_all=$(dir_bytes "$d") bytes_nar=$(dir_bytes "$d/nar") narinfos=$n exit=$rc busy_before=$BUSY%" | tee -a "$RAW" >&2
  [ "$rc" -eq 0 ] && [ "$n" -eq "$N" ] || { echo "upload tool=$tool comp=$comp run=$r FAILED (exit $rc, $n/$N narinfos; log: $(tail -3 "$log" | tr '\n' ' '))" | tee -a "$RAW" >&2; }
}
same_nars() { # two cache dirs: same store paths with the same NarHash/NarSize/References?
  python3 - "$1" "$2" <<'EOF'
import glob, os, sys
def load(d):
    out = {}
    for f in glob.glob(d + '/*.narinfo'):
        kv = dict(l.split(': ', 1) for l in open(f).read().splitlines() if ': ' in l)
        out[kv['StorePath']] = (kv['NarHash'].replace('sha256:', ''), kv['NarSize'], ' '.join(sorted(kv.get('References', '').split())))
    return out
a, b = load(sys.argv[1]), load(sys.argv[2])
bad = [p for p in set(a) | set(b) if a.get(p) != b.get(p)]
print('same' if not bad and a else f'DIFFERENT ({len(bad)} of {len(set(a) | set(b))} paths differ, e.g. {sorted(bad)[:2]})')
EOF
}
same_bytes() { # two cache dirs: the same NAR files, byte for byte?
  python3 - "$1" "$2" <<'EOF'
import hashlib, os, sys
def load(d):
    d = os.path.join(d, 'nar')
    return {f: hashlib.sha256(open(os.path.join(d, f), 'rb').read()).hexdigest() for f in os.listdir(d)} if os.path.isdir(d) else {}
a, b = load(sys.argv[1]), load(sys.argv[2])
bad = [f for f in set(a) | set(b) if a.get(f) != b.get(f)]
print(f'identical ({len(a)} NAR files)' if not bad and a else f'DIFFERENT ({len(bad)} of {len(set(a) | set(b))} NAR files differ)')
EOF
}
if has upload; then
  for r in $(seq "$UPLOAD_RUNS"); do
    for comp in $UPLOAD_COMPS; do
      [ "$comp" != xz ] || [ "$r" -le "$XZ_RUNS" ] || continue
      say "upload round $r/$UPLOAD_RUNS, $comp"
      ours=$(for j in $JOBS; do printf 'nixcached-j%s ' "$j"; done)
      if [ $((r % 2)) -eq 1 ]; then order="nix $ours"; else order="$ours nix"; fi
      for tool in $order; do upload_one "$tool" "$comp" "$r"; done
      for tool in $ours; do
        [ "$r" -ne 1 ] || echo "upload check comp=$comp nix-vs-$tool narinfos: $(same_nars "$W/up/nix-$comp-1" "$W/up/$tool-$comp-1")" | tee -a "$RAW" >&2
        # Determinism: the same closure, compression and level give the same bytes every run.
        [ "$r" -ne 2 ] || echo "upload check comp=$comp $tool run 1 vs run 2 bytes: $(same_bytes "$W/up/$tool-$comp-1" "$W/up/$tool-$comp-2")" | tee -a "$RAW" >&2
      done
    done
  done
fi

# --- summary ---------------------------------------------------------------------------------
T_END=$(date +%s)
echo "total run time: $(( (T_END - T_START) / 60 )) min $(( (T_END - T_START) % 60 )) s" | tee -a "$RAW" "$MACHINE" >&2
python3 "$HERE/summarize.py" "$RAW" "$MACHINE" > "$SUMMARY"
echo >&2
cat "$SUMMARY"
echo >&2
say "raw lines: $RAW; summary: $SUMMARY"
