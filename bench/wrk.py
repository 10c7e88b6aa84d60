"""One wrk run and what it printed: requests/s, latency percentiles and errors."""

from __future__ import annotations

import re
import resource
import subprocess
from dataclasses import dataclass

#: wrk's own per-request timeout: a request slower than this counts as a timeout error.
REQUEST_TIMEOUT = "5s"
#: Extra seconds a wrk run may take beyond its duration before it is killed.
RUN_SLACK = 30.0

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    socket_errors: int
    non_2xx: int
    #: CPU seconds wrk itself used (user + system).
    wrk_cpu: float = 0.0
    #: Of `socket_errors`: connects that failed (at 10,000 connections: fd or port limits).
    connect_errors: int = 0
    #: Of `socket_errors`: requests that got no answer within [`REQUEST_TIMEOUT`].
    timeouts: int = 0

    @property
    def errors(self) -> int:
        return self.socket_errors + self.non_2xx


def _latency_ms(text: str, pct: str) -> float:
    m = re.search(rf"^\s*{pct}(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M)
    if not m:
        raise ValueError(f"no {pct}% latency in wrk output (was --latency given?)")
    return float(m[1]) * _UNIT_MS[m[2]]


def parse(text: str) -> WrkResult:
    """Reads wrk 4's report (with `--latency`)."""
    done = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m),", text, re.M)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if not done or not rps:
        raise ValueError("wrk output has no request count or Requests/sec line")
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        requests=int(done[1]),
        seconds=float(done[2]) * _UNIT_MS[done[3]] / 1000.0,
        rps=float(rps[1]),
        p50_ms=_latency_ms(text, "50"),
        p99_ms=_latency_ms(text, "99"),
        socket_errors=sum(int(x) for x in sock.groups()) if sock else 0,
        non_2xx=int(non2xx[1]) if non2xx else 0,
        connect_errors=int(sock[1]) if sock else 0,
        timeouts=int(sock[4]) if sock else 0,
    )


def run(url: str, connections: int, threads: int, duration: float, close: bool) -> tuple[WrkResult, str]:
    """Runs wrk against `url`; `close` sends `Connection: close` (a new connection per
    request). Returns the parsed result and wrk's raw output."""
    argv = [
        "wrk",
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{duration:g}s",
        "--latency",
        "--timeout",
        REQUEST_TIMEOUT,
    ]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(url)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + RUN_SLACK)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited with {done.returncode}: {out.strip()[-500:]}")
    result = parse(out)
    result.wrk_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return result, out
