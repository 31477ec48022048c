#!/usr/bin/env python3
"""Stalled readers against `nixcached serve` (issue 11 item 3), for bench/run.sh.

Usage: bench/slow-readers.py BIN WORKDIR [READERS] [NAR_MB]

Adds a store path with one NAR_MB MB file (and a small one) to the local Nix store, puts it
into two folder caches with `nix copy` (compression none and zstd, no .ls), then for each way
of serving it -- the local store's NAR, the none cache's NAR, the explorer's file view in the
zstd cache (decompressed and parsed as it is read) -- starts `BIN serve`, reads the target once
(warm-up), opens READERS connections that ask for it and read nothing, waits until every
response has begun, and reports one line:

  slow scenario=S readers=N base_rss_kib=A peak_rss_kib=B per_reader_kib=C threads=T0->T1
       other_ms=M all_read=yes|NO

peak RSS is the daemon's VmHWM; other_ms is how long another client's small request took
while every reader stalled; all_read says whether every stalled reader then got the whole
body. Needs ulimit -n above READERS + 100.
"""
import os
import re
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

BIN, WORK = sys.argv[1], sys.argv[2]
READERS = int(sys.argv[3]) if len(sys.argv) > 3 else 600
NAR_MB = int(sys.argv[4]) if len(sys.argv) > 4 else 20
NIX = ['nix', '--extra-experimental-features', 'nix-command']


def status(pid, key):
    for line in open(f'/proc/{pid}/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1])
    return 0


def make_path():
    src = tempfile.mkdtemp(prefix='slow-readers-', dir=WORK)
    # Varied bytes (xorshift), so compression cannot make the file trivially small.
    x, words = 0x9e3779b97f4a7c15, []
    mask = (1 << 64) - 1
    for _ in range((NAR_MB << 20) // 8):
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        words.append(x)
    with open(os.path.join(src, 'data'), 'wb') as f:
        f.write(b''.join(w.to_bytes(8, 'little') for w in words))
    with open(os.path.join(src, 'small.txt'), 'w') as f:
        f.write('a small file other clients view while readers stall\n')
    sp = subprocess.check_output(['nix-store', '--add', src], text=True).strip()
    return sp


def start(store):
    log = open(os.path.join(WORK, 'slow-serve.log'), 'w+')
    p = subprocess.Popen([BIN, 'serve', '--listen', '127.0.0.1:0', store],
                         stdout=log, stderr=subprocess.STDOUT)
    for _ in range(300):
        log.seek(0)
        m = re.search(r'Listening on (http://[0-9.:]+)', re.sub(r'\x1b\[[0-9;]*m', '', log.read()))
        if m:
            return p, m.group(1)
        if p.poll() is not None:
            break
        time.sleep(0.1)
    log.seek(0)
    sys.exit(f'nixcached serve {store} did not start: {log.read()[-2000:]}')


def get(url):
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.read()


def stalled(addr, target):
    s = socket.create_connection(addr)
    s.sendall(f'GET {target} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n'.encode())
    return s


def begun(s):
    r, _, _ = select.select([s], [], [], 0)
    return bool(r)


def read_all(s, out, i):
    s.settimeout(120)
    n, head = 0, b''
    try:
        while True:
            b = s.recv(1 << 16)
            if not b:
                break
            if head is not None:
                head += b
                p = head.find(b'\r\n\r\n')
                if p >= 0:
                    n, head = len(head) - p - 4, None
            else:
                n += len(b)
    except OSError:
        pass
    out[i] = n
    s.close()


def scenario(name, store, target, small, want_len):
    p, base = start(store)
    try:
        assert len(get(base + target)) == want_len, f'{name}: warm-up read is short'
        base_rss, base_threads = status(p.pid, 'VmHWM'), status(p.pid, 'Threads')
        host, port = base[len('http://'):].split(':')
        conns = [stalled((host, int(port)), target) for _ in range(READERS)]
        t0 = time.time()
        while time.time() - t0 < 120 and not all(begun(s) for s in conns):
            time.sleep(0.2)
        started = sum(begun(s) for s in conns)
        time.sleep(2)
        peak, threads = status(p.pid, 'VmHWM'), status(p.pid, 'Threads')
        t = time.time()
        get(base + small)
        other_ms = (time.time() - t) * 1000
        out = [0] * READERS
        ts = [threading.Thread(target=read_all, args=(s, out, i)) for i, s in enumerate(conns)]
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        ok = started == READERS and all(n == want_len for n in out)
        print(f'slow scenario={name} readers={READERS} begun={started} base_rss_kib={base_rss} '
              f'peak_rss_kib={peak} per_reader_kib={(peak - base_rss) // READERS} '
              f'threads={base_threads}->{threads} other_ms={other_ms:.1f} '
              f'all_read={"yes" if ok else "NO"}', flush=True)
    finally:
        p.terminate()
        p.wait()


def main():
    os.makedirs(WORK, exist_ok=True)
    sp = make_path()
    digest = os.path.basename(sp)[:32]
    nar_len = len(subprocess.check_output(['nix-store', '--dump', sp]))
    data_len = os.path.getsize(os.path.join(sp, 'data'))
    caches = {}
    for comp in ('none', 'zstd'):
        d = tempfile.mkdtemp(prefix=f'slow-cache-{comp}-', dir=WORK)
        subprocess.check_call(NIX + ['copy', '--to', f'file://{d}?compression={comp}', sp])
        caches[comp] = d
    info = open(os.path.join(caches['none'], digest + '.narinfo')).read()
    url = re.search(r'^URL: (\S+)', info, re.M).group(1)
    scenario('local-store-nar', '/nix/store', f'/nar/{digest}.nar', f'/{digest}.narinfo', nar_len)
    scenario('file-cache-nar', 'file://' + caches['none'], '/' + url, f'/{digest}.narinfo', nar_len)
    scenario('explorer-file-zstd', 'file://' + caches['zstd'], f'/{digest}/file/data',
             f'/{digest}/file/small.txt', data_len)


main()
