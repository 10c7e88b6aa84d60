#!/usr/bin/env python3
"""balancer `--protocol http` against nginx's HTTP reverse proxy (`proxy_pass` with an
upstream `keepalive` pool), in front of the same two built-in workers (#12).

Starts balancer in http mode (release build), reads its workers' addresses from its log,
puts nginx (http, upstream keepalive) in front of the same workers, and runs wrk against
both, interleaved, for a keep-alive load and a `Connection: close` load. Reports req/s
and the proxy's CPU per request (balancer: the master process; nginx: master + workers)
as a Markdown table, medians over rounds.

    python3 bench/http_mode.py [--rounds 3] [--duration 5] [--conns 50] [--binary target/release/balancer]

Loopback only; every run is bounded in time; every process is stopped by pid.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import machine  # noqa: E402
import wrk  # noqa: E402
from processes import ProcessSet  # noqa: E402
from targets import Target, start_balancer, start_nginx_http  # noqa: E402

WRK_THREADS = 2


def log(msg: str) -> None:
    print(f"[http-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measure(t: Target, conns: int, duration: float, close: bool) -> tuple[float, float | None, int]:
    """One wrk run: (req/s, proxy CPU µs per request, errors)."""
    pids = t.proxy_pids()
    cpu0 = machine.total_cpu_seconds(pids)
    res, _ = wrk.run(t.url, conns, WRK_THREADS, duration, close)
    cpu1 = machine.total_cpu_seconds(pids)
    per_req = (cpu1 - cpu0) / res.requests * 1e6 if res.requests else None
    return res.rps, per_req, res.errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--binary", default=str(HERE.parent / "target" / "release" / "balancer"))
    a = ap.parse_args()
    procs = ProcessSet(log)
    results: dict[tuple[str, str], list[tuple[float, float | None, int]]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="balancer-http-bench-") as d:
            tmp = Path(d)
            bal = start_balancer(procs, Path(a.binary), tmp, "balancer-http", 2, ["--protocol", "http"])
            backends = [addr for _, (_, addr) in sorted(bal.ready_workers().items())]
            targets = [
                Target("balancer-http", f"http://{bal.listen}/", lambda: [bal.pid]),
                start_nginx_http(procs, tmp, backends),
            ]
            loads = [("keep-alive", False), ("close", True)]
            for t in targets:  # warm-up, unrecorded
                wrk.run(t.url, a.conns, WRK_THREADS, 1.0, False)
            for rnd in range(1, a.rounds + 1):
                for load, close in loads:
                    for t in targets:
                        r = measure(t, a.conns, a.duration, close)
                        results.setdefault((load, t.name), []).append(r)
                        cpu = "NA" if r[1] is None else f"{r[1]:.1f}"
                        log(f"round {rnd} {load:10} {t.name:13} {r[0]:9,.0f} req/s  CPU {cpu} µs/req  errors {r[2]}")
    finally:
        procs.stop_all()
    print(f"balancer --protocol http vs nginx http (proxy_pass, upstream keepalive 64), 2 built-in "
          f"workers, wrk {a.conns} connections x {WRK_THREADS} threads, {a.rounds} rounds x {a.duration:g} s, "
          f"medians ({time.strftime('%Y-%m-%d')}):\n")
    print("| load | proxy | req/s | CPU µs/req | errors | req/s ×nginx | CPU ×nginx |")
    print("|---|---|---|---|---|---|---|")
    for load, _ in [("keep-alive", 0), ("close", 0)]:
        med = {}
        for name in ("balancer-http", "nginx-http"):
            runs = results.get((load, name), [])
            rps = statistics.median(r[0] for r in runs)
            cpus = [r[1] for r in runs if r[1] is not None]
            med[name] = (rps, statistics.median(cpus) if cpus else None, sum(r[2] for r in runs))
        n_rps, n_cpu, _ = med["nginx-http"]
        for name, (rps, cpu, errs) in med.items():
            x_rps = f"{rps / n_rps:.2f}" if n_rps else "NA"
            x_cpu = f"{cpu / n_cpu:.2f}" if cpu and n_cpu else "NA"
            cpu_s = "NA" if cpu is None else f"{cpu:.1f}"
            print(f"| {load} | {name} | {rps:,.0f} | {cpu_s} | {errs} | {x_rps} | {x_cpu} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
