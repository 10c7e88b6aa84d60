#!/usr/bin/env python3
"""A/B of the accept side (#15): `shared`, `reuseport` and `proxy` modes of balancer builds
against one worker direct, with who accepted how many connections.

    python3 bench/accept_ab.py --bin base=/tmp/balancer-base --bin new=target/release/balancer \
        --modes shared,reuseport --loads close50 --rounds 4 --seconds 4 --strace

Every build runs every mode side by side (each its own balancer with 2 built-in workers);
`direct` is wrk against worker 0 of the first build's `proxy`-mode balancer, the ceiling of
#15's "`shared`/`reuseport` >= 0.95x direct". Runs are interleaved (every target one load in
turn, then the next round), and each run's req/s and p99 are divided by direct's of the same
round: the medians of those paired ratios are the result, since the box's load moves the
absolute numbers by tens of percent between minutes.

Per run it also reads, from /proc, the CPU of the master and of each worker and, for the
master's proxy threads (`balancer-proxy-N`), each thread's CPU ticks and voluntary /
involuntary context switches: the uneven split between proxy threads shows there.

`--strace` adds one pass per target with `strace -c` attached to each worker (shared,
reuseport) or each proxy thread (proxy) on its own, so the table says how many connections
each one accepted (`accept4` calls minus errors), how many accepts found nothing (`EAGAIN`,
a wake-up for a connection another process took) and the system calls per request.
`--nginx` adds nginx `stream` in front of direct's two workers (its master and workers
count as "master" and "workers"; for a p99 next to nginx's). `--node` measures Node instead: the reference is Node's own cluster primary
(bench/node_cluster.py's `node-cluster`), and each build runs `--mode shared` (and
`handoff`, if in `--modes`) as the primary of the same 2 Node workers (bench/node/app.js).

`--bin NAME=PATH:FLAGS` passes extra balancer flags (comma separated) to that build, and
`--env NAME=VAR=VALUE` sets an environment variable for it (repeatable): one binary can be
several targets.
"""

from __future__ import annotations

import argparse
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import machine
import wrk
from processes import ProcessSet
from targets import start_balancer, start_nginx

#: (connections, a new connection per request)
LOADS = {"ka50": (50, False), "ka200": (200, False), "close50": (50, True)}
#: Every balancer started here: on a box with a load average of 15, workers have taken over
#: 10 s to announce `ready` and idle workers have failed 1 s health checks, been replaced and
#: come back on new ports; these keep the same workers through the run (equal for all).
PATIENT = ["--ready-timeout", "60s", "--health-timeout", "5s"]
#: How long strace may take to write its summary after SIGINT.
STRACE_STOP_TIMEOUT = 20.0
#: strace's summary row: % time, seconds, usecs/call, calls, [errors], syscall.
_STRACE_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$")


def log(msg: str) -> None:
    print(f"[accept_ab {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_strace(text: str) -> dict[str, tuple[int, int]]:
    """syscall -> (calls, errors) from `strace -c` output."""
    rows: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        m = _STRACE_ROW.match(line)
        if m and m[3] != "total":
            rows[m[3]] = (int(m[1]), int(m[2] or 0))
    return rows


def thread_stats(pid: int) -> dict[str, tuple[int, int, int]]:
    """name-tid -> (CPU ticks, voluntary, involuntary switches) of `pid`'s proxy threads."""
    out: dict[str, tuple[int, int, int]] = {}
    try:
        tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return out
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if not name.startswith("balancer-proxy"):
            continue
        rest = stat[stat.rindex(")") + 2 :].split()
        ticks = int(rest[11]) + int(rest[12])
        vol = int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M)[1])
        inv = int(re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", status, re.M)[1])
        out[f"{name}/{tid}"] = (ticks, vol, inv)
    return out


@dataclass
class Target:
    name: str
    url: str
    master: int | None
    workers: list[int]
    #: Per load, one dict per run: rps, p99, errors, master_us and workers_us (CPU µs per
    #: request), worker_share (each worker's share of the workers' CPU), threads (per proxy
    #: thread: CPU ticks, voluntary and involuntary switches during the run).
    runs: dict[str, list[dict]] = field(default_factory=dict)
    #: Called before each run (the direct target follows a replaced worker).
    refresh: Callable[[], None] | None = None


def one_run(t: Target, load: str, seconds: float) -> dict:
    if t.refresh:
        t.refresh()
    conns, close = LOADS[load]
    pids = ([t.master] if t.master else []) + t.workers
    cpu0 = {p: machine.cpu_seconds(p) or 0.0 for p in pids}
    th0 = thread_stats(t.master) if t.master else {}
    res, _ = wrk.run(t.url, conns, 2, seconds, close)
    cpu1 = {p: machine.cpu_seconds(p) or 0.0 for p in pids}
    th1 = thread_stats(t.master) if t.master else {}
    reqs = max(res.requests, 1)
    wcpu = [cpu1[p] - cpu0[p] for p in t.workers]
    threads = {k: tuple(b - a for a, b in zip(th0.get(k, (0, 0, 0)), v)) for k, v in th1.items()}
    return {
        "rps": res.rps,
        "p99": res.p99_ms,
        "errors": res.errors,
        "master_us": ((cpu1[t.master] - cpu0[t.master]) * 1e6 / reqs) if t.master else 0.0,
        "workers_us": sum(wcpu) * 1e6 / reqs,
        "worker_share": [w / max(sum(wcpu), 1e-9) for w in wcpu],
        "threads": threads,
    }


def strace_each(tids: list[int], url: str, load: str, seconds: float) -> tuple[int, list[dict[str, tuple[int, int]]]]:
    """One wrk run with a separate `strace -c` on each of `tids` (processes or threads)."""
    conns, close = LOADS[load]
    tracers = [
        subprocess.Popen(["strace", "-c", "-qq", "-p", str(t)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for t in tids
    ]
    time.sleep(1.0)  # strace needs a moment to attach
    res, _ = wrk.run(url, conns, 2, seconds, close)
    outs = []
    for st in tracers:
        st.send_signal(signal.SIGINT)
    for st in tracers:
        out, _ = st.communicate(timeout=STRACE_STOP_TIMEOUT)
        outs.append(parse_strace(out))
    return res.requests, outs


def proxy_threads(pid: int) -> list[int]:
    tids = []
    for t in sorted(Path(f"/proc/{pid}/task").iterdir(), key=lambda p: int(p.name)):
        try:
            if (t / "comm").read_text().strip().startswith("balancer-proxy"):
                tids.append(int(t.name))
        except OSError:
            pass
    return tids


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bin", action="append", required=True, help="NAME=PATH[:FLAG,FLAG...] of a balancer build")
    p.add_argument("--env", action="append", default=[], help="NAME=VAR=VALUE: environment for build NAME")
    p.add_argument("--modes", default="shared,reuseport", help="balancer --mode values (proxy included)")
    p.add_argument("--loads", default="close50")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--nginx", action="store_true", help="also nginx `stream` in front of direct's two workers")
    p.add_argument("--node", action="store_true", help="Node workers; the reference is Node's own cluster")
    p.add_argument("--strace", action="store_true", help="also a strace pass per target (accepts per process/thread)")
    p.add_argument("--strace-seconds", type=float, default=3.0)
    a = p.parse_args()
    procs = ProcessSet(log)
    tmp = Path(tempfile.mkdtemp(prefix="bench-accept-"))
    modes = a.modes.split(",")
    try:
        targets: list[Target] = []
        builds = []
        for spec in a.bin:
            name, _, rest = spec.partition("=")
            path, _, flags = rest.partition(":")
            extra = [f for f in flags.split(",") if f]
            env = dict(e.partition("=")[2].partition("=")[::2] for e in a.env if e.partition("=")[0] == name)
            builds.append((name, Path(path), extra, env))
        if a.node:
            import node_cluster

            def node_target(tname: str, setup: str, binary: Path, env: dict[str, str]) -> Target:
                port = node_cluster.free_port()
                proc = node_cluster.start(procs, setup, port, tmp, binary, env, tname)
                workers = sorted(machine.descendants(proc.pid))
                log(f"{tname}: port {port}, primary {proc.pid}, workers {workers}")
                return Target(tname, f"http://127.0.0.1:{port}/", proc.pid, workers)

            direct = node_target("node-cluster", "node-cluster", builds[0][1], {})
            for name, path, extra, env in builds:
                if extra:
                    raise SystemExit("--node takes no extra flags per build (node_cluster.py fixes them)")
                for mode in modes:
                    if mode in ("shared", "handoff"):
                        targets.append(node_target(f"{name}-{mode}-node", f"balancer-{mode}", path, env))
        else:
            for name, path, extra, env in builds:
                for mode in modes:
                    tname = f"{name}-{mode}"
                    b = start_balancer(procs, path, tmp, tname, 2, ["--mode", mode, *PATIENT, *extra], env)
                    workers = [pid for _, (pid, _) in sorted(b.ready_workers().items())]
                    targets.append(Target(tname, f"http://{b.listen}/", b.pid, workers))
                    log(f"{tname}: {b.listen}, master {b.pid}, workers {workers}")
            d = start_balancer(procs, builds[0][1], tmp, "direct-host", 2, ["--mode", "proxy", *PATIENT])
            pid0, addr0 = sorted(d.ready_workers().items())[0][1]
            direct = Target("direct", f"http://{addr0}/", None, [pid0])

            def follow(t: Target = direct, d=d) -> None:
                # A replaced worker comes back on a new port: follow slot 0.
                slot0 = dict(d.ready_workers()).get(0)
                if slot0 and slot0[0] != t.workers[0]:
                    log(f"direct: worker 0 is now {slot0}")
                    t.workers, t.url = [slot0[0]], f"http://{slot0[1]}/"

            direct.refresh = follow
            if a.nginx:
                ng = start_nginx(procs, tmp, [addr for _, (_, addr) in sorted(d.ready_workers().items())])
                pids = ng.proxy_pids()
                targets.append(Target("nginx", ng.url, pids[0], pids[1:]))
        targets.insert(0, direct)
        for load in a.loads.split(","):
            for r in range(a.rounds):
                for t in targets:
                    t.runs.setdefault(load, []).append(one_run(t, load, a.seconds))
                log(f"{load} round {r + 1}: " + ", ".join(f"{t.name} {t.runs[load][-1]['rps']:.0f}" for t in targets))
            print(f"\n## {load}: {a.rounds} rounds x {a.seconds:g} s, load average {machine.loadavg()[0]:.1f}")
            print("| target | req/s | ×reference (paired median) | p99 ms | p99 ×reference | master CPU µs/req | workers CPU µs/req | worker CPU split | errors |")
            print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
            for t in targets:
                runs = t.runs[load]
                ratio = statistics.median(x["rps"] / max(dx["rps"], 1e-9) for x, dx in zip(runs, direct.runs[load]))
                p99r = statistics.median(x["p99"] / max(dx["p99"], 1e-9) for x, dx in zip(runs, direct.runs[load]))
                split = " / ".join(f"{statistics.median(x['worker_share'][i] for x in runs):.2f}" for i in range(len(t.workers)))
                print(
                    f"| {t.name} | {statistics.median(x['rps'] for x in runs):,.0f} | {ratio:.3f} | "
                    f"{statistics.median(x['p99'] for x in runs):.2f} | {p99r:.2f} | "
                    f"{statistics.median(x['master_us'] for x in runs):.1f} | {statistics.median(x['workers_us'] for x in runs):.1f} | "
                    f"{split} | {sum(x['errors'] for x in runs)} |"
                )
            for t in targets:
                if t.runs[load] and t.runs[load][0]["threads"]:
                    print(f"\n{t.name} proxy threads per run (CPU ticks, voluntary, involuntary switches):")
                    for i, x in enumerate(t.runs[load]):
                        print(f"- round {i + 1}: " + "; ".join(f"{k} {v}" for k, v in sorted(x["threads"].items())))
            if a.strace:
                print(f"\nstrace -c per process/thread ({a.strace_seconds:g} s, {load})")
                print("| target | traced | accepted | accept EAGAIN | syscalls/request | epoll_wait/request |")
                print("|---|---|---:|---:|---:|---:|")
                for t in targets:
                    tids = proxy_threads(t.master) if t.master and t.name.endswith("-proxy") else t.workers
                    reqs, outs = strace_each(tids, t.url, load, a.strace_seconds)
                    r = max(reqs, 1)
                    for tid, o in zip(tids, outs):
                        calls, errs = o.get("accept4", (0, 0))
                        total = sum(c for c, _ in o.values())
                        print(
                            f"| {t.name} | {tid} | {calls - errs} | {errs} | {total / r:.2f} | "
                            f"{o.get('epoll_wait', (0, 0))[0] / r:.3f} |"
                        )
            sys.stdout.flush()
        return 0
    finally:
        procs.stop_all()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
