"""Noise-immune counts for the proxy's data path (#15): system calls per request from
`strace -c -f` and CPU µs per request from /proc/PID/stat, for balancer builds side by side
with nginx `stream` and HAProxy in one run.

The box is shared with other people's compilers, so requests/s moves with their load; the
number of system calls a proxy makes per request does not, and CPU time per request moves far
less. Each target is measured in turn for each load (interleaved), always against the same
kind of built-in workers.

    python3 bench/counts.py --bin base=/tmp/balancer-old --bin new=target/release/balancer
    python3 bench/counts.py --bin tokio=target/release/balancer \
        --bin "epoll=target/release/balancer --engine epoll"

`--cmd "NAME=ARGV"` adds any other proxy (a spike): `{listen}` in ARGV becomes a free
127.0.0.1 port and `{backends}` the first build's workers, space separated, e.g.
`--cmd "uring=bench/spikes/uring-proxy/target/release/uring-proxy {listen} {backends}"`.

`--strace-seconds 0` skips strace; `--loads close50` measures one load. Besides the
proxy's own CPU (utime+stime from /proc/PID/stat), each run reports the whole machine's busy
CPU per request (/proc/stat), which also counts the kernel threads and softirqs a
kernel-side data path (a sockmap redirect) runs in, the kworker threads' CPU per request, and
the TCP segments the machine sent per request (/proc/net/snmp `OutSegs`: handshakes, ACKs and
FINs included, e.g. 16.6 for `--engine epoll` against nginx's 20.1 on close50).
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import machine
import wrk
from processes import ProcessSet
from targets import Target, free_port, start_balancer, start_haproxy, start_nginx, wait_listening

#: (name, connections, a new connection per request)
LOADS = {"ka50": (50, False), "ka200": (200, False), "close50": (50, True)}
#: How long strace may take to write its summary after SIGINT.
STRACE_STOP_TIMEOUT = 20.0

_STRACE_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$")


def parse_strace(text: str) -> Counter[str]:
    """Calls per syscall name from `strace -c` output (its summary table)."""
    calls: Counter[str] = Counter()
    for line in text.splitlines():
        m = _STRACE_ROW.match(line)
        if m and m[3] != "total":
            calls[m[3]] += int(m[1])
    return calls


def parse_bin(spec: str) -> tuple[str, str, list[str]]:
    """`NAME=PATH [FLAGS...]` → (name, path, flags): the same build can run twice with
    different flags (`--bin tokio=B --bin "epoll=B --engine epoll"`)."""
    name, _, rest = spec.partition("=")
    path, *flags = rest.split()
    return name, path, flags


def cmd_argv(argv: str, listen: str, backends: list[str]) -> list[str]:
    """A `--cmd` ARGV as words: `{listen}` → `listen`, a `{backends}` word → one word each."""
    words: list[str] = []
    for w in argv.split():
        words += backends if w == "{backends}" else [w.replace("{listen}", listen)]
    return words


def log(msg: str) -> None:
    print(f"[counts {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine_us_per_request(before: tuple[int, int], after: tuple[int, int], requests: int) -> float:
    """Busy CPU µs of the whole machine per request between two `machine.system_cpu()`
    readings: wrk, the workers, the proxy, kernel threads and softirqs together. A proxy
    whose bytes the kernel moves (a sockmap redirect runs in softirq and a kworker) hides
    most of its cost from its own utime+stime; this total does not (other people's load
    is in it too, so compare targets within one run)."""
    return (after[0] - before[0]) / machine.CLK_TCK * 1e6 / max(requests, 1)


def kworker_cpu() -> dict[int, float]:
    """CPU seconds of every kernel worker thread (`kworker/...`) now, by pid."""
    out = {}
    for pid in machine.all_pids():
        if machine._comm(pid).startswith("kworker"):
            used = machine.cpu_seconds(pid)
            if used is not None:
                out[pid] = used
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two [`kworker_cpu`] readings: a thread that appeared counts
    all its time, one that exited meanwhile is lost (kworkers come and go; a lower bound)."""
    return sum(used - before.get(pid, 0.0) for pid, used in after.items())


def cpu_run(t: Target, conns: int, close: bool, seconds: float) -> tuple[float, float, float, float, float]:
    """(req/s, CPU µs per request of: the proxy, the whole machine, the kworkers; and TCP
    segments the machine sent per request) of one wrk run."""
    pids = t.proxy_pids()
    before = machine.total_cpu_seconds(pids)
    kw_before = kworker_cpu()
    sys_before = machine.system_cpu()
    segs_before = machine.tcp_out_segments()
    res, _ = wrk.run(t.url, conns, 2, seconds, close)
    segs_after = machine.tcp_out_segments()
    sys_after = machine.system_cpu()
    kw = cpu_delta(kw_before, kworker_cpu())
    used = machine.total_cpu_seconds(pids) - before
    reqs = max(res.requests, 1)
    segs = (segs_after - segs_before) / reqs if segs_before is not None and segs_after is not None else float("nan")
    return res.rps, used * 1e6 / reqs, machine_us_per_request(sys_before, sys_after, reqs), kw * 1e6 / reqs, segs


def strace_run(t: Target, conns: int, close: bool, seconds: float) -> tuple[int, Counter[str]]:
    """(requests, calls per syscall) of one wrk run with strace attached to the proxy."""
    argv = ["strace", "-c", "-f", "-qq"]
    for p in t.proxy_pids():
        argv += ["-p", str(p)]
    st = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)  # strace needs a moment to attach to every thread
    res, _ = wrk.run(t.url, conns, 2, seconds, close)
    st.send_signal(signal.SIGINT)
    out, _ = st.communicate(timeout=STRACE_STOP_TIMEOUT)
    return res.requests, parse_strace(out)


def perf_run(t: Target, conns: int, close: bool, seconds: float) -> tuple[int, dict[str, float]]:
    """(requests, software event counts) of one wrk run under `perf stat` on the proxy:
    context switches, CPU migrations and task-clock (ms). No hardware counters in this VM."""
    pids = ",".join(str(p) for p in t.proxy_pids())
    argv = ["perf", "stat", "-x,", "-e", "context-switches,cpu-migrations,task-clock", "-p", pids]
    st = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.5)
    res, _ = wrk.run(t.url, conns, 2, seconds, close)
    st.send_signal(signal.SIGINT)
    out, _ = st.communicate(timeout=STRACE_STOP_TIMEOUT)
    counts = {}
    for line in out.splitlines():
        f = line.split(",")
        if len(f) > 3 and f[0].replace(".", "", 1).isdigit():
            counts[f[2]] = float(f[0])
    return res.requests, counts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--bin",
        action="append",
        required=True,
        help="NAME=PATH [FLAGS...] of a balancer build, with flags of its own (one string)",
    )
    p.add_argument("--loads", default="ka50,ka200,close50")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--strace-seconds", type=float, default=3.0)
    p.add_argument("--perf", action="store_true", help="also perf stat (context switches) per request")
    p.add_argument("--cmd", action="append", default=[], help="NAME=ARGV of another proxy, with {listen} and {backends}")
    p.add_argument("--nginx-workers", default="auto", help="nginx worker_processes (1 to match a one-thread proxy)")
    p.add_argument("--no-haproxy", action="store_true")
    p.add_argument("--extra", default="", help="extra balancer flags, space separated")
    a = p.parse_args()
    procs = ProcessSet(log)
    tmp = Path(tempfile.mkdtemp(prefix="bench-counts-"))
    try:
        targets: list[Target] = []
        backends: list[str] = []
        for spec in a.bin:
            name, path, flags = parse_bin(spec)
            b = start_balancer(procs, Path(path), tmp, name, 2, a.extra.split() + flags)
            if not backends:
                backends = [addr for _, (_, addr) in sorted(b.ready_workers().items())]
            targets.append(Target(name, f"http://{b.listen}/", lambda pid=b.pid: [pid]))
        for spec in a.cmd:
            name, _, argv = spec.partition("=")
            port = free_port()
            proc = procs.start(name, cmd_argv(argv, f"127.0.0.1:{port}", backends), tmp / f"{name}.log")
            wait_listening(proc, port, 10.0)
            targets.append(Target(name, f"http://127.0.0.1:{port}/", proc.pids))
        targets.append(start_nginx(procs, tmp, backends, worker_processes=a.nginx_workers))
        if not a.no_haproxy:
            targets.append(start_haproxy(procs, tmp, backends, 2))
        loads = a.loads.split(",")
        for load in loads:
            conns, close = LOADS[load]
            cpu: dict[str, list[tuple[float, float, float, float, float]]] = {t.name: [] for t in targets}
            for r in range(a.rounds):
                for t in targets:
                    cpu[t.name].append(cpu_run(t, conns, close, a.seconds))
            print(f"\n## {load}: median of {a.rounds} x {a.seconds:g} s")
            print(
                "| target | req/s | CPU µs/req | per round (µs/req) | machine µs/req "
                "| per round (machine) | kworker µs/req | TCP segments/req |"
            )
            print("|---|---:|---:|---|---:|---|---:|---:|")
            for t in targets:
                runs = cpu[t.name]
                mid = len(runs) // 2
                rps = sorted(x[0] for x in runs)[mid]
                proxy = sorted(x[1] for x in runs)[mid]
                whole = sorted(x[2] for x in runs)[mid]
                kw = sorted(x[3] for x in runs)[mid]
                segs = sorted(x[4] for x in runs)[mid]
                per = ", ".join(f"{x[1]:.1f}" for x in runs)
                per_whole = ", ".join(f"{x[2]:.1f}" for x in runs)
                print(f"| {t.name} | {rps:.0f} | {proxy:.1f} | {per} | {whole:.1f} | {per_whole} | {kw:.2f} | {segs:.2f} |")
            if a.strace_seconds > 0:
                rows = {}
                for t in targets:
                    reqs, calls = strace_run(t, conns, close, a.strace_seconds)
                    rows[t.name] = (reqs, calls)
                names = sorted({n for _, c in rows.values() for n in c}, key=lambda n: -max(c[n] / max(r, 1) for r, c in rows.values()))
                print(f"\nsyscalls per request under strace ({a.strace_seconds:g} s, {load})")
                print("| syscall | " + " | ".join(rows) + " |")
                print("|---|" + "---:|" * len(rows))
                total = {k: sum(c.values()) / max(r, 1) for k, (r, c) in rows.items()}
                print("| **total** | " + " | ".join(f"**{total[k]:.2f}**" for k in rows) + " |")
                for n in names:
                    vals = [c[n] / max(r, 1) for r, c in rows.values()]
                    if max(vals) >= 0.005:
                        print(f"| {n} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
            if a.perf:
                print(f"\nperf stat per request ({a.strace_seconds:g} s, {load})")
                print("| target | context switches | migrations | task-clock µs |")
                print("|---|---:|---:|---:|")
                for t in targets:
                    reqs, c = perf_run(t, conns, close, max(a.strace_seconds, 1.0))
                    r = max(reqs, 1)
                    print(
                        f"| {t.name} | {c.get('context-switches', 0) / r:.3f} | "
                        f"{c.get('cpu-migrations', 0) / r:.4f} | {c.get('task-clock', 0) * 1000 / r:.1f} |"
                    )
            sys.stdout.flush()
        return 0
    finally:
        procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
