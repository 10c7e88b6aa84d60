#!/usr/bin/env python3
"""Node's own cluster primary vs balancer as the primary, driving the same Node workers.

    python3 bench/node_cluster.py [--rounds 3] [--duration 6]

Targets, each with 2 Node hello-world workers (bench/node/app.js) on one loopback port:
`node-cluster` (Node's primary, round-robin by default on Linux), `balancer-proxy` (balancer
copies bytes to workers that listen themselves), `balancer-handoff` (balancer accepts and
hands each socket over as Node's `newconn`), `balancer-shared` (balancer hands its listening
socket to the workers). Loads: keep-alive with 50 connections, and a new connection per
request with 50. Interleaved in rounds; medians and ratios to Node's own cluster go to
docs/bench-node.md. CPU is the primary's (Node's primary process, or balancer's master).
Everything on loopback; every process started is stopped by pid.
"""

import argparse
import os
import re
import signal
import socket
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import machine  # noqa: E402
import wrk  # noqa: E402
from processes import ProcessSet  # noqa: E402

APP = HERE / "node" / "app.js"
BIN = ROOT / "target" / "release" / "balancer"
LOADS = {"ka50": (50, False), "close50": (50, True)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"nothing answered on port {port}")


def start(procs: ProcessSet, name: str, port: int, logdir: Path, binary: Path = BIN, extra_env: dict | None = None, label: str | None = None):
    """Starts setup `name` on `port`; `extra_env` is added to its environment and `label`
    names its log (default `name`)."""
    env = dict(os.environ, PORT=str(port), NODE_WORKERS="2", **(extra_env or {}))
    node = "node"
    common = [str(binary), "--listen", f"127.0.0.1:{port}", "--cpus", "2", "--worker-output", "ignore"]
    argv = {
        "node-cluster": [node, str(APP)],
        "balancer-proxy": common + ["--node-cluster", "off", "--", node, str(APP)],
        "balancer-handoff": common + ["--mode", "handoff", "--", node, str(APP)],
        "balancer-shared": common + ["--mode", "shared", "--node-cluster", "on", "--", node, str(APP)],
    }[name]
    if name == "balancer-proxy":
        env["BENCH_READY"] = "1"
    proc = procs.start(label or name, argv, logdir / f"{label or name}.log", env=env)
    wait_port(port)
    if name != "node-cluster":
        proc.wait_for(lambda l: True if "all workers ready" in l else None, 20.0)
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=6.0)
    args = ap.parse_args()
    if not BIN.exists():
        os.system(f"cd {ROOT} && cargo build --release")
    logdir = ROOT / "target" / "bench-node"
    logdir.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)
    procs = ProcessSet(log)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    targets = ["node-cluster", "balancer-proxy", "balancer-handoff", "balancer-shared"]
    runs: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    try:
        for rnd in range(args.rounds):
            for load, (conns, close) in LOADS.items():
                for name in targets:
                    port = free_port()
                    proc = start(procs, name, port, logdir)
                    machine.wait_quiet(0.85, 15.0, procs.pids, log)
                    cpu0 = machine.cpu_seconds(proc.pid) or 0.0
                    res, _ = wrk.run(f"http://127.0.0.1:{port}/", conns, 2, args.duration, close)
                    cpu1 = machine.cpu_seconds(proc.pid) or 0.0
                    us = (cpu1 - cpu0) * 1e6 / max(res.requests, 1)
                    runs.setdefault((load, name), []).append((res.rps, res.p99_ms, us))
                    log(f"round {rnd + 1} {load:8} {name:17} {res.rps:>9,.0f} req/s  p99 {res.p99_ms:7.2f} ms  "
                        f"primary CPU {us:6.1f} µs/req  errors {res.errors}")
                    procs.stop(proc)
    finally:
        procs.stop_all()
    lines = [
        "# Node cluster: Node's own primary vs balancer",
        "",
        f"Made by `python3 bench/node_cluster.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"{args.rounds} rounds × {args.duration:g} s per target and load, interleaved. 2 Node "
        f"{os.popen('node --version').read().strip()} hello-world workers (`bench/node/app.js`) per target; "
        "wrk, 2 threads, 50 connections; 2 shared CPUs, so compare ratios within the run.",
        "",
        "| load | target | req/s | ×node-cluster | p99 ms | primary CPU µs/req |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for load in LOADS:
        base = runs[(load, "node-cluster")]
        for name in targets:
            r = runs[(load, name)]
            ratio = statistics.median(a[0] / b[0] for a, b in zip(r, base))
            lines.append(
                f"| `{load}` | {name} | {statistics.median(x[0] for x in r):,.0f} | {ratio:.2f}× | "
                f"{statistics.median(x[1] for x in r):.2f} | {statistics.median(x[2] for x in r):.1f} |"
            )
    lines += [
        "",
        "- ×node-cluster: median over rounds of the per-round ratio to Node's own cluster.",
        "- primary CPU: Node's primary process, or balancer's master (not the workers).",
        "- `ka50` keep-alive, 50 connections; `close50` a new connection per request, 50 connections.",
    ]
    out = ROOT / "docs" / "bench-node.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
