#!/usr/bin/env python3
"""The cost curve (#15): how a proxy's cost grows as the work grows. At 10, 100, 1,000 and
10,000 concurrent keep-alive connections, for balancer `proxy`, balancer `handoff`, nginx
`stream` and HAProxy `mode tcp`: requests/s, the proxy's CPU per request, p99 latency and its
resident memory (VmRSS sampled during the run, and the peak). Writes docs/cost-curve.md,
docs/cost-curve.csv and docs/cost-curve.png, and the table into README.md.

    python3 bench/cost_curve.py                      # 3 rounds x 5 s per target and level
    python3 bench/cost_curve.py --quick              # 1 round x 2 s, to target/cost-curve-quick/
    python3 bench/cost_curve.py --levels 10,1000 --rounds 2

Needs (installed if missing, like bench/run.py): `apt-get install wrk nginx
libnginx-mod-stream haproxy`, `pip install matplotlib`, and `ss` (iproute2). It is a
benchmark, not a test: CI does not run it.

nginx, HAProxy and balancer `proxy` all forward to the same two built-in workers (those of the
`proxy` balancer); balancer `handoff` passes each accepted socket to two built-in workers of its
own, since a handed-off socket can only go to the master's own children. Runs are interleaved:
within a round, each level runs every target in turn (the order rotates from level to level),
then the next level; each round starts all four on fresh processes. Every wrk run is bounded in time, rounds and levels in count; every process
started is stopped by PID at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import resource
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import cost_report
import machine
import prepare
import wrk
from prepare import REPO, log
from processes import ProcessSet
from targets import Balancer, start_balancer, start_haproxy, start_nginx

#: Concurrent keep-alive connections per point of the curve.
LEVELS = (10, 100, 1_000, 10_000)
#: Built-in workers behind every proxy, as in bench/run.py.
WORKERS = 2
#: wrk threads: the machine has two CPUs.
WRK_THREADS = 2
#: How often the sampler reads the proxy's VmRSS and the workers' open fds.
SAMPLE_PERIOD = 0.25
#: How often it asks `ss` how many client connections are established (netlink: cheap, but
#: not free with 10,000 sockets open).
ESTABLISHED_PERIOD = 1.0
#: Longest wait, after a run, for the workers to close the run's connections, so the next
#: run's count of connections that reached a worker starts from a clean base.
SETTLE_TIMEOUT = 20.0
#: Share of a level's connections the workers must hold for the ramp to count as done.
RAMPED = 0.99
#: Worker fds above their idle count that still mean "settled" (a straggler or two).
SETTLE_SLACK = 4
#: nginx's `worker_connections` counts both legs of a proxied connection; one worker may win
#: most accepts, so each may need room for all of them. Capped by the open-file limit.
NGINX_CONNECTIONS = 2 * max(LEVELS) + 100
#: The listen queue every proxy gets: balancer's own (src/bind.rs), HAProxy's default here
#: (its maxconn, capped by net.core.somaxconn = 4096); nginx is given the same.
BACKLOG = 4096
#: At least this many seconds of run per 1,000 connections: at 10,000, connects that overflow
#: the listen queue are retried by the kernel after 1 s, 3 s, 7 s (SYN retransmits), so a short
#: run would measure the ramp more than the load.
SECONDS_PER_1000_CONNS = 1.0
#: Connect timeout towards the workers, the same for every proxy: long enough to wait out the
#: SYN retransmits (1, 3, 7 s) of a connect that a full worker accept queue dropped, rather
#: than fail it (balancer's default is 1 s, the bench's nginx and HAProxy 2 s).
CONNECT_TIMEOUT = "10s"
#: Accepting: under a saturating load nginx (`multi_accept off`, one accept per event) and
#: HAProxy (`tune.maxaccept`) accept new connections slowly while they serve the open ones: in a
#: 10 s run at 10,000 connections only ~7,600 (nginx) and ~6,700 (HAProxy) reached a worker.
#: The curve is about holding many connections, so both are told to accept all that wait.
NGINX_MULTI_ACCEPT = True
HAPROXY_MAXACCEPT = -1
#: Warm-up run per target at the start of each round (connections, seconds).
WARMUP = (100, 1.0)


@dataclass
class Target:
    """One proxy under test and the processes its cost is read from."""

    name: str
    port: int
    #: The proxy's own processes (balancer: the master only).
    proxy_pids: Callable[[], list[int]]
    #: The built-in workers that answer its requests.
    worker_pids: Callable[[], list[int]]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


class Sampler(threading.Thread):
    """Samples, while one wrk run lasts: the proxy's VmRSS (summed over its processes), the
    workers' open fds above their idle count (= connections that reached a worker), and the
    client connections `ss` sees established to the proxy's port."""

    def __init__(self, t: Target, worker_fds_idle: int, conns: int):
        super().__init__(name=f"sample-{t.name}", daemon=True)
        self.t = t
        self.base = worker_fds_idle
        self.stop_ = threading.Event()
        self.rss: list[int] = []
        self.reached = 0
        self.established = 0
        #: Seconds from the start until the workers held (nearly) every connection.
        self.ramp_s: float | None = None
        self.conns = conns
        self.began = time.monotonic()

    def run(self) -> None:
        next_ss = 0.0
        while not self.stop_.wait(SAMPLE_PERIOD):
            pids = self.t.proxy_pids()
            if pids:
                self.rss.append(sum(machine.rss_kib(p) or 0 for p in pids))
            held = sum(machine.fd_count(p) or 0 for p in self.t.worker_pids()) - self.base
            self.reached = max(self.reached, held)
            if self.ramp_s is None and held >= RAMPED * self.conns:
                self.ramp_s = time.monotonic() - self.began
            if time.monotonic() >= next_ss:
                next_ss = time.monotonic() + ESTABLISHED_PERIOD
                self.established = max(self.established, machine.established(self.t.port) or 0)

    def finish(self) -> None:
        self.stop_.set()
        self.join(5)


def run_seconds(duration: float, conns: int) -> float:
    """`duration`, or longer for many connections (see [`SECONDS_PER_1000_CONNS`])."""
    return max(duration, SECONDS_PER_1000_CONNS * conns / 1000)


def worker_fds(t: Target) -> int:
    return sum(machine.fd_count(p) or 0 for p in t.worker_pids())


def settle(t: Target, idle: int) -> int:
    """Waits (bounded) until the workers hold no more fds than when idle; returns the count."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    now = worker_fds(t)
    while now > idle + SETTLE_SLACK and time.monotonic() < deadline:
        time.sleep(0.2)
        now = worker_fds(t)
    return now


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round of 2 s, output in target/cost-curve-quick/")
    p.add_argument("--rounds", type=int, help="rounds over all levels and targets (default 3; quick 1)")
    p.add_argument("--duration", type=float, help="seconds per wrk run (default 5; quick 2)")
    p.add_argument("--levels", help="comma-separated connection counts (default 10,100,1000,10000)")
    p.add_argument("--out", type=Path, help="output directory (default docs/; quick: target/cost-curve-quick/)")
    p.add_argument("--quiet-idle", type=float, default=0.85, help="share of all CPUs idle wanted before a run (default 0.85)")
    p.add_argument("--quiet-wait", type=float, default=5.0, help="longest wait for that, in seconds (default 5)")
    p.add_argument("--no-build", action="store_true", help="use target/release/balancer as it is")
    p.add_argument("--binary", type=Path, help="measure this balancer binary (no build); e.g. a debug build for a smoke run")
    p.add_argument("--no-install", action="store_true", help="fail instead of installing missing tools")
    p.add_argument("--no-readme", action="store_true", help="do not write the table into README.md")
    a = p.parse_args(argv)
    a.rounds = a.rounds or (1 if a.quick else 3)
    a.duration = a.duration or (2.0 if a.quick else 5.0)
    if a.rounds < 1 or a.duration <= 0:
        p.error("--rounds must be at least 1 and --duration above 0")
    try:
        a.levels = [int(x) for x in a.levels.split(",")] if a.levels else list(LEVELS)
    except ValueError:
        p.error(f"--levels {a.levels!r}: want comma-separated whole numbers")
    if any(n < 1 for n in a.levels):
        p.error("--levels: every level must be at least 1 connection")
    a.out = a.out or (REPO / "target" / "cost-curve-quick" if a.quick else REPO / "docs")
    # A quick run or another directory never overwrites the committed README table.
    a.readme = not a.no_readme and not a.quick and a.out == REPO / "docs"
    return a


def start_targets(procs: ProcessSet, bin_path: Path, tmp: Path) -> list[Target]:
    bal = start_balancer(procs, bin_path, tmp, "balancer-proxy", WORKERS, ["--connect-timeout", CONNECT_TIMEOUT])
    backends = [addr for _, (_, addr) in sorted(bal.ready_workers().items())]
    shared_workers = _workers_of(bal)
    hand = start_balancer(procs, bin_path, tmp, "balancer-handoff", WORKERS, ["--mode", "handoff"])
    nofile = machine_nofile()
    nginx = start_nginx(procs, tmp, backends, min(NGINX_CONNECTIONS, nofile), BACKLOG, CONNECT_TIMEOUT, NGINX_MULTI_ACCEPT)
    haproxy = start_haproxy(procs, tmp, backends, WORKERS, CONNECT_TIMEOUT, HAPROXY_MAXACCEPT)

    def port(url: str) -> int:
        return int(url.rstrip("/").rsplit(":", 1)[1])

    return [
        Target("balancer-proxy", port(f"http://{bal.listen}/"), lambda: [bal.pid] if bal.proc.alive() else [], shared_workers),
        Target("balancer-handoff", port(f"http://{hand.listen}/"), lambda: [hand.pid] if hand.proc.alive() else [], _workers_of(hand)),
        Target("nginx", port(nginx.url), nginx.proxy_pids, shared_workers),
        Target("haproxy", port(haproxy.url), haproxy.proxy_pids, shared_workers),
    ]


def _workers_of(bal: Balancer) -> Callable[[], list[int]]:
    return lambda: [pid for pid, _ in bal.ready_workers().values()]


def machine_nofile() -> int:
    """The soft open-file limit the proxies will inherit."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def one_point(t: Target, conns: int, rnd: int, a: argparse.Namespace, procs: ProcessSet, points: list, failures: list) -> None:
    quiet = machine.wait_quiet(a.quiet_idle, a.quiet_wait, procs.pids, log)
    idle_fds = worker_fds(t)
    load1 = machine.loadavg()[0]
    pids, workers = t.proxy_pids(), t.worker_pids()
    rss_idle = sum(machine.rss_kib(p) or 0 for p in pids)
    cpu0, wcpu0 = machine.total_cpu_seconds(pids), machine.total_cpu_seconds(workers)
    overflows0 = machine.listen_overflows()
    sampler = Sampler(t, idle_fds, conns)
    sampler.start()
    started = time.time()
    try:
        res, _ = wrk.run(t.url, conns, WRK_THREADS, run_seconds(a.duration, conns), False)
    except Exception as e:  # a failed point is reported, not fatal
        failures.append(f"round {rnd}, {conns} conns, {t.name}: {e}")
        log(f"run failed: round {rnd} {conns} {t.name}: {e}")
        return
    finally:
        sampler.finish()
    cpu1, wcpu1 = machine.total_cpu_seconds(pids), machine.total_cpu_seconds(workers)
    overflows1 = machine.listen_overflows()
    p = cost_report.Point(
        round=rnd,
        conns=conns,
        target=t.name,
        started=started,
        rps=res.rps,
        p50_ms=res.p50_ms,
        p99_ms=res.p99_ms,
        requests=res.requests,
        connect_errors=res.connect_errors,
        timeouts=res.timeouts,
        other_errors=res.socket_errors - res.connect_errors - res.timeouts + res.non_2xx,
        proxy_cpu_s=cpu1 - cpu0,
        workers_cpu_s=wcpu1 - wcpu0,
        wrk_cpu_s=res.wrk_cpu,
        rss_idle_kib=rss_idle,
        rss_median_kib=int(statistics.median(sampler.rss)) if sampler.rss else 0,
        rss_peak_kib=max(sampler.rss, default=0),
        reached=sampler.reached,
        established=sampler.established,
        ramp_s=sampler.ramp_s,
        listen_overflows=None if overflows0 is None or overflows1 is None else overflows1 - overflows0,
        load1=load1,
        idle_before=quiet.idle,
    )
    points.append(p)
    log(
        f"round {rnd} {conns:>6} conns {t.name:16} {res.rps:9,.0f} req/s  p99 {res.p99_ms:8.2f} ms  "
        f"CPU {p.cpu_us_per_req:6.1f} µs/req  RSS {p.rss_median_kib / 1024:6.1f} MiB (peak {p.rss_peak_kib / 1024:.1f})  "
        f"reached {p.reached}/{conns} (ramp {'—' if p.ramp_s is None else f'{p.ramp_s:.1f} s'})  connect errors {p.connect_errors}  timeouts {p.timeouts}  listen overflows {p.listen_overflows}  load {load1:.1f}"
    )
    left = settle(t, idle_fds)
    if left > idle_fds + SETTLE_SLACK:
        log(f"{t.name}: workers still hold {left - idle_fds} more fds than idle after {SETTLE_TIMEOUT:g} s")


@dataclass
class Series:
    points: list = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    load_start: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_end: tuple[float, float, float] = (0.0, 0.0, 0.0)


def measure(procs: ProcessSet, bin_path: Path, tmp: Path, a: argparse.Namespace) -> tuple[Series, list[str]]:
    """Every round on fresh processes: an allocator keeps what a proxy needed at 10,000
    connections (nginx stayed at 130 MiB at 10 connections after it), so a second round on
    the same processes would measure the first round's peak, not the level's memory."""
    s = Series(load_start=machine.loadavg())
    names: list[str] = []
    turn = 0
    for rnd in range(1, a.rounds + 1):
        logs = tmp / f"round-{rnd}"
        logs.mkdir()
        targets = start_targets(procs, bin_path, logs)
        names = [t.name for t in targets]
        log(f"round {rnd}: targets {', '.join(names)}; levels {a.levels}; {a.duration:g} s each")
        for t in targets:
            try:
                wrk.run(t.url, WARMUP[0], WRK_THREADS, WARMUP[1], False)
            except Exception as e:
                log(f"warm-up of {t.name} failed: {e}")
        for conns in a.levels:
            # Rotate the order so that no target always runs right after the heaviest one.
            order = targets[turn % len(targets):] + targets[: turn % len(targets)]
            turn += 1
            for t in order:
                one_point(t, conns, rnd, a, procs, s.points, s.failures)
        procs.stop_all()
    s.load_end = machine.loadavg()
    return s, names


def _interrupt(signum: int, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    procs = ProcessSet(log)
    tmp = Path(tempfile.mkdtemp(prefix="balancer-cost-curve-"))
    try:
        prepare.ensure_tools(a.no_install)
        bin_path = a.binary or (prepare.binary() if a.no_build else prepare.build())
        chart_ok = prepare.ensure_matplotlib()
        nofile = prepare.raise_fd_limit()
        log(f"open-file limit {nofile} (wrk, the proxies and the workers inherit it); logs in {tmp}")
        meta = prepare.versions(bin_path) | {
            "machine": prepare.machine_summary(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["python3", f"bench/{Path(__file__).name}", *argv]),
            "nofile": str(nofile),
        }
        series, names = measure(procs, bin_path, tmp, a)
        procs.stop_all()
        cost_report.write(a, series, names, meta, chart_ok)
        return 0 if not series.failures else 1
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'Ctrl-C'}); stopping everything")
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        procs.stop_all()
        log(f"process logs in {tmp}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
