#!/usr/bin/env python3
"""Summarises the raw lines of one bench/run.sh run as Markdown tables with ratios.

Usage: bench/summarize.py RAW [MACHINE] [--include-busy]
  RAW      bench/results/<stamp>-raw.txt; MACHINE the matching -machine.txt (printed on top).
  A measurement taken on a busy machine (anchor-bench.sh's "warning: machine busy" for that
  server, round and test, or busy_before >= 10% on dump/upload lines) is left out of the
  medians and listed at the end, unless --include-busy.
Medians are over rounds; the ratio is of the medians, and [a-b] is the range of the per-round
ratios (servers are measured back to back within a round, so those pairs are the fairest).
"""
import re
import statistics
import sys

args = [a for a in sys.argv[1:] if not a.startswith('--')]
include_busy = '--include-busy' in sys.argv
raw = args[0]
machine = args[1] if len(args) > 1 else None

serve = {}      # (label, test, figure) -> {round: value}
busy = set()    # (label, round, test) measured on a busy machine
dump, dump_wall = {}, {}
up = {}         # (tool, comp) -> [dict]
load = {}       # server -> [dict]
load_rss = {}   # server -> peak RSS KiB
slow = []       # dict per stalled-readers scenario
notes, excluded = [], []
for line in open(raw):
    line = line.rstrip('\n')
    m = re.match(r'^(\S+)@(\d+) warning: machine busy .* before (\S+) run', line)
    if m:
        notes.append(line)
        busy.add((m[1], int(m[2]), m[3]))
        continue
    m = re.match(r'^(\S+)@(\d+) (narinfo_c\d+|nar_p\d+) (\S+) (\S+)  \[runs:', line)
    if m:
        if (m[1], int(m[2]), m[3]) in busy and not include_busy:
            if m[4] in ('req_per_s', 'nar_MiB_per_s'):
                excluded.append(f'{m[1]} round {m[2]} {m[3]} {m[4]}={m[5]} (machine busy)')
            continue
        serve.setdefault((m[1], m[3], m[4]), {})[int(m[2])] = float(m[5])
        continue
    if line.startswith('load server=') and 'FAILED' not in line:
        kv = dict(x.split('=', 1) for x in line.split()[1:])
        if int(kv.get('busy_before', '0%').rstrip('%')) >= 10 and not include_busy:
            excluded.append(line + ' (machine busy)')
        else:
            load.setdefault(kv['server'], []).append(kv)
        continue
    if line.startswith('slow scenario='):
        slow.append(dict(x.split('=', 1) for x in line.split()[1:]))
        continue
    if line.startswith('load peak '):
        kv = dict(x.split('=', 1) for x in line.split()[2:])
        if kv.get('rss_kib'):
            load_rss[kv['server']] = int(kv['rss_kib'])
        continue
    if line.startswith('dump ') or (line.startswith('upload tool=') and 'FAILED' not in line):
        kv = dict(x.split('=', 1) for x in line.split()[1:])
        b = int(kv.get('busy_before', '0%').rstrip('%'))
        if b >= 10 and not include_busy:
            excluded.append(line + ' (machine busy)')
            continue
        if line.startswith('dump '):
            dump.setdefault(kv['variant'], []).append(float(kv['MiB_per_s']))
            dump_wall.setdefault(kv['variant'], []).append(float(kv['wall_s']))
        else:
            up.setdefault((kv['tool'], kv['comp']), []).append(kv)
        continue
    if any(s in line for s in ('warning', 'FAILED', 'errors_or_non2xx', 'DIFFERENT', 'upload check',
                               'total run time', 'daemon-')) or re.search(r' run \d+: ', line):
        if not line.startswith('servers '):
            notes.append(line)

med = statistics.median


def vals(label, test, fig):
    return serve.get((label, test, fig), {})


def m(label, test, fig):
    v = vals(label, test, fig)
    return med(v.values()) if v else None


def num(x):
    return f'{x:,.0f}' if abs(x) >= 100 else f'{x:.3g}'


def rng(label, test, fig):
    v = list(vals(label, test, fig).values())
    return f'{num(min(v))}-{num(max(v))}, n={len(v)}' if v else '-'


def fmt(x, d=0):
    return '-' if x is None else f'{x:,.{d}f}'


def paired(a, b, test, fig):
    va, vb = vals(a, test, fig), vals(b, test, fig)
    rs = [va[r] / vb[r] for r in va if r in vb and vb[r]]
    return f'{min(rs):.2f}-{max(rs):.2f}' if rs else '-'


def ratio(x, y):
    return None if x is None or y is None or not y else x / y


def verdict(r, target):
    return '-' if r is None else ('**met**' if r >= target else '**not met**')


if machine:
    print(open(machine).read().strip().replace('\n', '  \n'))
rounds = sorted({r for v in serve.values() for r in v})
daemons = [d for d in ('daemon-file', 'daemon-file-nodelay') if any(k[0] == d for k in serve)]
if rounds:
    print(f'\n### Serve, file:// zstd cache: daemon vs nginx (medians over {len(rounds)} interleaved rounds;'
          ' ratio = daemon/nginx, [per-round ratio range])\n')
    for d in daemons:
        name = '`serve file://`' + (' with a TCP_NODELAY listener (experiment)' if d.endswith('nodelay') else '')
        print(f'| figure | nginx | {name} | ratio | target | |')
        print('|---|---|---|---|---|---|')
        for fig, t, f, target in (('narinfo c=1 req/s', 'narinfo_c1', 'req_per_s', 1.0),
                                  ('narinfo c=16 req/s', 'narinfo_c16', 'req_per_s', 1.0),
                                  ('NAR P=1 MiB/s', 'nar_p1', 'nar_MiB_per_s', 0.8),
                                  ('NAR P=16 MiB/s', 'nar_p16', 'nar_MiB_per_s', 0.8)):
            a, b = m('nginx-zstd', t, f), m(d, t, f)
            r = ratio(b, a)
            print(f"| {fig} | {fmt(a)} ({rng('nginx-zstd', t, f)}) | {fmt(b)} ({rng(d, t, f)}) | "
                  f"**{fmt(r, 2)}x** [{paired(d, 'nginx-zstd', t, f)}] | >= {target}x | {verdict(r, target)} |")
        for t in ('narinfo_c1', 'narinfo_c16'):
            print(f"| {t.replace('_', ' ')} latency p50 / p99 ms | {fmt(m('nginx-zstd', t, 'p50_ms'), 3)} / "
                  f"{fmt(m('nginx-zstd', t, 'p99_ms'), 3)} | {fmt(m(d, t, 'p50_ms'), 3)} / {fmt(m(d, t, 'p99_ms'), 3)} | | | |")
        for t in ('nar_p1', 'nar_p16'):
            print(f"| {t.replace('_', ' ')} wire MiB/s (zstd bytes sent) | {fmt(m('nginx-zstd', t, 'wire_MiB_per_s'))} | "
                  f"{fmt(m(d, t, 'wire_MiB_per_s'))} | | | |")
        print()

    print('### Serve, local store (`serve /nix/store`: NARs serialised on the fly, uncompressed)\n')
    print('| figure | anchor | `serve /nix/store` | ratio |')
    print('|---|---|---|---|')
    for fig, t in (('narinfo c=1 req/s', 'narinfo_c1'), ('narinfo c=16 req/s', 'narinfo_c16')):
        a, b = m('nginx-zstd', t, 'req_per_s'), m('daemon-local', t, 'req_per_s')
        print(f"| {fig} | nginx (zstd cache) {fmt(a)} | {fmt(b)} ({rng('daemon-local', t, 'req_per_s')}) | "
              f"**{fmt(ratio(b, a), 2)}x** nginx [{paired('daemon-local', 'nginx-zstd', t, 'req_per_s')}] |")
    for t in ('narinfo_c1', 'narinfo_c16'):
        print(f"| {t.replace('_', ' ')} latency p50 / p99 ms | nginx {fmt(m('nginx-zstd', t, 'p50_ms'), 3)} / "
              f"{fmt(m('nginx-zstd', t, 'p99_ms'), 3)} | {fmt(m('daemon-local', t, 'p50_ms'), 3)} / "
              f"{fmt(m('daemon-local', t, 'p99_ms'), 3)} | |")
    dl = med(dump['loop']) if dump.get('loop') else None
    de = med(dump['export']) if dump.get('export') else None
    if dl:
        print(f"| `nix-store --dump` loop, 206 processes | {fmt(dl)} MiB/s ({num(min(dump['loop']))}-"
              f"{num(max(dump['loop']))}, n={len(dump['loop'])}), wall {med(dump_wall['loop']):.2f} s | | |")
    if de:
        print(f"| `nix-store --export`, one process | {fmt(de)} MiB/s ({num(min(dump['export']))}-"
              f"{num(max(dump['export']))}, n={len(dump['export'])}), wall {med(dump_wall['export']):.2f} s | | |")
    for fig, t in (('NAR P=1 MiB/s', 'nar_p1'), ('NAR P=16 MiB/s', 'nar_p16')):
        b = m('daemon-local', t, 'nar_MiB_per_s')
        print(f"| {fig} | dump loop {fmt(dl)} / export {fmt(de)} | {fmt(b)} ({rng('daemon-local', t, 'nar_MiB_per_s')}) | "
              f"**{fmt(ratio(b, dl), 2)}x** dump loop, {fmt(ratio(b, de), 2)}x export |")
    for fig, t in (('NAR P=1 MiB/s', 'nar_p1'), ('NAR P=16 MiB/s', 'nar_p16')):
        a, b = m('nginx-zstd', t, 'nar_MiB_per_s'), m('daemon-local', t, 'nar_MiB_per_s')
        print(f"| {fig}, for scale | nginx sending the zstd files {fmt(a)} | {fmt(b)} | {fmt(ratio(b, a), 2)}x nginx |")

if up:
    print('\n### Upload: `nixcached upload --jobs N` vs `nix copy --to file://…?compression=C` (same closure, fresh destinations)\n')
    print('| compression | jobs | nix copy wall s, median (min-max), n | nixcached upload wall s | speed-up (nix / upload) '
          '| NAR files, bytes: nix / upload | whole cache dir, bytes: nix / upload | target | |')
    print('|---|---|---|---|---|---|---|---|---|')
    ours = sorted({t for (t, _) in up if t != 'nix'})
    for comp in ('zstd', 'xz', 'none', 'bzip2', 'gzip', 'br'):
        a = up.get(('nix', comp))
        for tool in ours:
            b = up.get((tool, comp))
            if not a and not b:
                continue

            def walls(x):
                return [float(i['wall_s']) for i in x] if x else []

            def span(w):
                return f'{med(w):.2f} ({min(w):.2f}-{max(w):.2f}), n={len(w)}' if w else '-'

            def size(x, k):
                return f"{int(x[-1][k]):,}" if x else '-'
            wa, wb = walls(a), walls(b)
            s = ratio(med(wa) if wa else None, med(wb) if wb else None)
            jobs = tool.rsplit('-j', 1)[-1] if '-j' in tool else '2'
            print(f"| {comp} | {jobs} | {span(wa)} | {span(wb)} | **{fmt(s, 2)}x** | {size(a, 'bytes_nar')} / {size(b, 'bytes_nar')} | "
                  f"{size(a, 'bytes_all')} / {size(b, 'bytes_all')} | > 1.0x | "
                  f"{'-' if s is None else ('**met**' if s > 1.0 else '**not met**')} |")
if load:
    conns = next(iter(load.values()))[0]['conns']
    print(f'\n### Load: {conns} keep-alive connections, half narinfo hits, half misses (wrk, medians over rounds)\n')
    print('| server | req/s (min-max, n) | p50 / p99 ms | answers 200 / 404 / other | socket errors | peak RSS |')
    print('|---|---|---|---|---|---|')
    for server in ('nginx', 'daemon-file'):
        rows = load.get(server)
        if not rows:
            continue
        rps = [float(r['rps']) for r in rows]
        tot = {k: sum(int(r[k]) for r in rows) for k in ('ok', 'missing', 'other', 'errs')}
        rss = load_rss.get(server)
        print(f"| {server} | {fmt(med(rps))} ({num(min(rps))}-{num(max(rps))}, n={len(rps)}) | "
              f"{med(float(r['p50_ms']) for r in rows):.2f} / {med(float(r['p99_ms']) for r in rows):.2f} | "
              f"{tot['ok']:,} / {tot['missing']:,} / {tot['other']:,} | {tot['errs']:,} | "
              f"{'-' if rss is None else f'{rss / 1024:.0f} MiB'} |")
    a = [float(r['rps']) for r in load.get('nginx', [])]
    b = [float(r['rps']) for r in load.get('daemon-file', [])]
    if a and b:
        print(f'\nRatio daemon/nginx (medians): **{med(b) / med(a):.2f}x**')
if slow:
    print(f"\n### Stalled readers: {slow[0]['readers']} clients ask for a large file and read nothing (bench/slow-readers.py)\n")
    print('| served as | responses begun | peak RSS before / with the readers | per reader | threads | another client\'s request | every reader then got it all |')
    print('|---|---|---|---|---|---|---|')
    for r in slow:
        grown = (int(r['peak_rss_kib']) - int(r['base_rss_kib'])) / 1024
        print(f"| {r['scenario']} | {r['begun']} | {int(r['base_rss_kib']) / 1024:.0f} / {int(r['peak_rss_kib']) / 1024:.0f} MiB "
              f"(+{grown:.0f} MiB) | {r['per_reader_kib']} KiB | {r['threads']} | {float(r['other_ms']):.0f} ms | {r['all_read']} |")
if excluded:
    print('\nLeft out of the medians (taken on a busy machine; --include-busy keeps them):\n')
    for line in excluded:
        print(f'    {line}')
if notes:
    print('\nNotes from the run:\n')
    for line in notes:
        print(f'    {line}')
