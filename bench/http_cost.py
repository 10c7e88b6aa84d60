#!/usr/bin/env python3
"""Where http mode's CPU goes, per request, next to nginx in the same run (#15).

Starts balancer `--protocol http` and nginx `http` (upstream keepalive) in front of the
same two built-in workers, then for each load (keep-alive, `Connection: close`) and each
proxy:

- `cpu`: proxy CPU µs per request from /proc utime+stime over one wrk run;
- `strace`: `strace -c -f` attached to the proxy's processes during one wrk run, the
  syscalls per request by name (strace slows the proxy; the counts per request are what
  count, not the rate);
- `callgrind` (balancer only, `--callgrind`): balancer's master runs under
  `valgrind --tool=callgrind` (its workers natively); counters are zeroed after warm-up
  and dumped after the load, so instructions per request exclude start-up. The output
  file is kept for `callgrind_annotate`.

    python3 bench/http_cost.py [--duration 5] [--conns 50] [--strace] [--callgrind DIR]

Loopback only; every run is bounded in time; every process is stopped by pid.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import machine  # noqa: E402
import wrk  # noqa: E402
from processes import ProcessSet  # noqa: E402
from targets import BALANCER_START_TIMEOUT, Balancer, Target, _message, balancer_env, parse_log_line, start_balancer, start_nginx_http  # noqa: E402

WRK_THREADS = 2
#: Bound on callgrind_control and strace's exit after its tracee is detached.
TOOL_TIMEOUT = 60
LOADS = [("keep-alive", False), ("close", True)]


def log(msg: str) -> None:
    print(f"[http-cost {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_per_request(t: Target, conns: int, duration: float, close: bool) -> tuple[int, float]:
    pids = t.proxy_pids()
    cpu0 = machine.total_cpu_seconds(pids)
    res, _ = wrk.run(t.url, conns, WRK_THREADS, duration, close)
    cpu1 = machine.total_cpu_seconds(pids)
    return res.requests, (cpu1 - cpu0) / max(res.requests, 1) * 1e6


def syscalls_per_request(t: Target, conns: int, duration: float, close: bool, tmp: Path) -> tuple[int, dict[str, float]]:
    out = tmp / f"strace-{t.name}-{int(close)}.txt"
    argv = ["strace", "-c", "-f", "-o", str(out)]
    for pid in t.proxy_pids():
        argv += ["-p", str(pid)]
    tracer = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # strace attaches asynchronously; a late attach only lowers counts
        res, _ = wrk.run(t.url, conns, WRK_THREADS, duration, close)
    finally:
        tracer.send_signal(2)
        tracer.wait(TOOL_TIMEOUT)
    counts: dict[str, float] = {}
    for line in out.read_text().splitlines():
        f = line.split()
        if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
            calls = int(f[3])
            counts[f[-1]] = calls / max(res.requests, 1)
    return res.requests, counts


def callgrind(binary: Path, procs: ProcessSet, tmp: Path, outdir: Path, conns: int, duration: float) -> None:
    """Built-in workers run the master's own image, `/proc/self/exe`, which under valgrind
    is valgrind's tool, not balancer (since d9a794d): so the workers come from a native
    balancer, and the master under callgrind reaches the same two workers as `--upstream`
    addresses (static, so no DNS; a remote backend's responses also watch its retirement,
    a small cost the built-in path does not have)."""
    outdir.mkdir(parents=True, exist_ok=True)
    provider = start_balancer(procs, binary, tmp, "balancer-workers", 2, ["--protocol", "http"])
    addrs = [addr for _, (_, addr) in sorted(provider.ready_workers().items())]
    upstreams = [arg for a in addrs for arg in ("--upstream", a)]
    for load, close in LOADS:
        prefix = outdir / f"callgrind.{load}"
        wrapper = tmp / "vg.sh"
        wrapper.write_text(
            "#!/bin/sh\nexec valgrind --tool=callgrind --trace-children=no "
            f"--callgrind-out-file={prefix}.%p {binary} \"$@\"\n"
        )
        wrapper.chmod(0o755)
        name = f"balancer-vg-{load}"
        argv = [str(wrapper), "--listen", "127.0.0.1:0", "--cpus", "0", "--protocol", "http", *upstreams]
        proc = procs.start(name, argv, tmp / f"{name}.log", env=balancer_env())
        _, listening = proc.wait_for(_message("listening"), BALANCER_START_TIMEOUT)
        proc.wait_for(_all_upstreams_up(len(addrs)), BALANCER_START_TIMEOUT)
        bal = Balancer(proc, listening.fields["addr"])
        url = f"http://{bal.listen}/"
        wrk.run(url, conns, WRK_THREADS, 2.0, close)  # warm-up: pool filled, code paged in
        subprocess.run(["callgrind_control", "-z", str(bal.pid)], check=True, timeout=TOOL_TIMEOUT, capture_output=True)
        res, _ = wrk.run(url, conns, WRK_THREADS, duration, close)
        subprocess.run(["callgrind_control", "-d", str(bal.pid)], check=True, timeout=TOOL_TIMEOUT, capture_output=True)
        dumps = sorted(outdir.glob(f"callgrind.{load}.{bal.pid}.*"), key=lambda p: p.stat().st_mtime)
        text = dumps[-1].read_text(errors="replace") if dumps else ""
        m = re.search(r"^summary:\s+(\d+)", text, re.M) or re.search(r"^totals:\s+(\d+)", text, re.M)
        ir = int(m[1]) if m else 0
        log(f"callgrind {load}: {res.requests} requests, {res.errors} errors, {ir / max(res.requests, 1):,.0f} instructions/request ({dumps[-1] if dumps else 'no dump'})")
        procs.stop(bal.proc)


def _all_upstreams_up(n: int):
    def match(text: str):
        line = parse_log_line(text)
        ok = line is not None and line.message == "upstream backend up"
        return line if ok and int(line.fields.get("in_rotation", 0)) >= n else None

    return match


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--strace", action="store_true")
    ap.add_argument("--callgrind", type=Path, help="directory for callgrind's output (balancer only)")
    ap.add_argument("--binary", default=str(HERE.parent / "target" / "release" / "balancer"))
    a = ap.parse_args()
    procs = ProcessSet(log)
    try:
        with tempfile.TemporaryDirectory(prefix="balancer-http-cost-") as d:
            tmp = Path(d)
            if a.callgrind:
                callgrind(Path(a.binary).resolve(), procs, tmp, a.callgrind.resolve(), a.conns, a.duration)
                return 0
            bal = start_balancer(procs, Path(a.binary), tmp, "balancer-http", 2, ["--protocol", "http"])
            backends = [addr for _, (_, addr) in sorted(bal.ready_workers().items())]
            targets = [
                Target("balancer-http", f"http://{bal.listen}/", lambda: [bal.pid]),
                start_nginx_http(procs, tmp, backends),
            ]
            for t in targets:
                wrk.run(t.url, a.conns, WRK_THREADS, 1.0, False)
            for load, close in LOADS:
                for t in targets:
                    n, cpu = cpu_per_request(t, a.conns, a.duration, close)
                    log(f"cpu {load:10} {t.name:13} {n:8} requests {cpu:6.1f} µs/request")
                if not a.strace:
                    continue
                per = {}
                for t in targets:
                    _, per[t.name] = syscalls_per_request(t, a.conns, a.duration, close, tmp)
                names = sorted(set().union(*per.values()), key=lambda s: -max(p.get(s, 0) for p in per.values()))
                print(f"\nsyscalls per request, {load}:\n| syscall | balancer-http | nginx-http |\n|---|---|---|")
                for s in names:
                    b, n = per["balancer-http"].get(s, 0), per["nginx-http"].get(s, 0)
                    if max(b, n) >= 0.01:
                        print(f"| {s} | {b:.2f} | {n:.2f} |")
                print(f"| total | {sum(per['balancer-http'].values()):.2f} | {sum(per['nginx-http'].values()):.2f} |")
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
