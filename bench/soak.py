#!/usr/bin/env python3
"""Chaos soak (issue 16): balancer under steady load for a long time while faults keep coming,
recording what clients saw and how the master's resources evolve.

    python3 bench/soak.py                     # 10 minutes in tcp (proxy) mode, into docs/ and README.md
    python3 bench/soak.py --protocol http     # the same in http mode (its own files and README block)
    python3 bench/soak.py --duration 60 --out target/soak-quick --no-readme

Load (all on loopback): `--new-conn` threads that each open a new connection per request
(`Connection: close`), and `--keep-alive` threads that each reuse one connection. Faults, on a
schedule: `kill -9` of a random worker in rotation every 2 s (only while two or more are in
rotation, so one healthy worker always remains: the promise's premise), `SIGSTOP` of a worker
for 1.5 s every 10 s, a rolling reload (SIGHUP) every 20 s, and whatever this build supports
of: an in-place upgrade every 60 s, a remote upstream that goes away and comes back, a DNS
answer that changes (each detected from `balancer --help`; reported as "not in this build"
otherwise).

What is recorded:
- **failed new requests**, by kind: a request that failed and was not an in-flight casualty.
- **in-flight casualties**, by cause: a request open while a worker it may have reached was
  killed or stopped; one cut when the master closed a retired backend's connections (an
  address that left DNS, `--grace` after: in tcp mode the master cannot tell where a
  request ends, so the cut can land mid-response, by design); one on a reused connection
  cut by an in-place upgrade's exec.
- A keep-alive connection closed under the client with **zero response bytes** (a dead
  worker's end, a retired backend's cut between two requests) is retried once on a new
  connection, as HTTP clients do for idempotent requests (urllib3, curl, browsers); the
  retry counts as a new request, and the closes are counted in a row of their own.
- the master's RSS, open fds, threads and children, sampled every second.

Outputs, per protocol P: `soak-P-results.md` (the table), `soak-P-samples.csv`,
`soak-P-requests.csv` (failures only) and `soak-P.png` (matplotlib, installed with pip if
missing) or `soak-P.svg` (written by hand when matplotlib cannot be had) in `--out`; and the
table and chart between README.md's `soak:P:begin`/`soak:P:end` markers ("Reliability").
Every process it starts is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import machine  # noqa: E402
import readme  # noqa: E402
from processes import ProcessSet  # noqa: E402
from targets import Balancer, balancer_env, parse_log_line  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
#: Timeout of each step (connect, send, receive) of one request.
REQUEST_TIMEOUT = 5.0
#: Pause after each request of one load thread: steady load that leaves CPU for the faults.
PACE = 0.005
#: Fault schedule, seconds.
KILL_EVERY = 2.0
STOP_EVERY = 10.0
STOP_FOR = 1.5
RELOAD_EVERY = 20.0
UPGRADE_EVERY = 60.0
#: The first upgrade this long after the first period: midway between two rolling reloads
#: (every 20 s), since the master refuses an upgrade while a reload is under way.
UPGRADE_OFFSET = 10.0
#: A refused upgrade (a worker not ready: one was just killed) is asked again this often,
#: at most UPGRADE_TRIES times, as an operator would.
UPGRADE_RETRY = 0.3
UPGRADE_TRIES = 10
UPSTREAM_EVERY = 30.0
UPSTREAM_DOWN_FOR = 5.0
#: After a kill is sent, how long a failure still counts as the kill's casualty (the victim's
#: sockets are reset as it dies; the master notices its exit within milliseconds).
KILL_WINDOW = 0.5
#: Same after a SIGCONT (requests the stopped worker held finish or fail just after).
STOP_WINDOW = 0.5
BUILD_TIMEOUT = 1800
START_TIMEOUT = 60.0


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Requests


@dataclass
class Attempt:
    start: float
    end: float
    kind: str  # ok, refused, timeout, reset, empty, short, status, other
    sent: bool
    #: "new" (a fresh connection) or "reused" (a keep-alive connection's later request).
    conn: str


def classify(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(e, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "reset"
    return "other"


class Conn:
    """One client connection speaking HTTP/1.1 with content-length responses."""

    def __init__(self, host: str, port: int):
        self.sock = socket.create_connection((host, port), timeout=REQUEST_TIMEOUT)
        self.buf = b""

    def request(self, close: bool) -> str:
        hdr = b"Connection: close\r\n" if close else b""
        self.sock.sendall(b"GET / HTTP/1.1\r\nHost: soak\r\n" + hdr + b"\r\n")
        return self.response()

    def response(self) -> str:
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                return "empty" if not self.buf else "short"
            self.buf += data
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            return "short"
        length = 0
        for h in lines[1:]:
            name, _, value = h.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            data = self.sock.recv(65536)
            if not data:
                return "short"
            rest += data
        self.buf = rest[length:]
        return "ok" if status == 200 else "status"

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def one_new(host: str, port: int) -> Attempt:
    start, sent, c = time.time(), False, None
    try:
        c = Conn(host, port)
        c.sock.sendall(b"GET / HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
        sent = True
        kind = c.response()
    except OSError as e:
        kind = classify(e)
    finally:
        if c:
            c.close()
    return Attempt(start, time.time(), kind, sent, "new")


class Load:
    def __init__(self, host: str, port: int, new_conn: int, keep_alive: int, until: float):
        self.host, self.port, self.until = host, port, until
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.attempts: list[Attempt] = []
        self.ok = 0
        self.retried = 0
        self.threads = [threading.Thread(target=self._new_loop, daemon=True) for _ in range(new_conn)]
        self.threads += [threading.Thread(target=self._ka_loop, daemon=True) for _ in range(keep_alive)]

    def _record(self, a: Attempt) -> None:
        with self.lock:
            if a.kind == "ok":
                self.ok += 1
            self.attempts.append(a)

    def _running(self) -> bool:
        return not self.stop.is_set() and time.time() < self.until

    def _new_loop(self) -> None:
        while self._running():
            self._record(one_new(self.host, self.port))
            time.sleep(PACE)

    def _ka_loop(self) -> None:
        conn: Conn | None = None
        while self._running():
            if conn is None:
                start = time.time()
                try:
                    conn = Conn(self.host, self.port)
                    kind = conn.request(close=False)
                except OSError as e:
                    kind = classify(e)
                self._record(Attempt(start, time.time(), kind, True, "new"))
                if kind != "ok" and conn:
                    conn.close()
                    conn = None
            else:
                start = time.time()
                try:
                    kind = conn.request(close=False)
                except OSError as e:
                    kind = classify(e)
                if kind in ("empty", "reset"):
                    # The connection was closed under us (its worker died between requests):
                    # retry once on a new connection, as a client does for a GET.
                    with self.lock:
                        self.retried += 1
                    conn.close()
                    conn = None
                    continue
                self._record(Attempt(start, time.time(), kind, True, "reused"))
                if kind != "ok":
                    conn.close()
                    conn = None
            time.sleep(PACE)
        if conn:
            conn.close()

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(REQUEST_TIMEOUT * 3)


# ---------------------------------------------------------------------------------------------
# Faults


@dataclass
class Faults:
    kills: list[tuple[float, float]] = field(default_factory=list)  # (sent, seen dead)
    stops: list[tuple[float, float]] = field(default_factory=list)  # (SIGSTOP, SIGCONT)
    reloads: list[float] = field(default_factory=list)
    upgrades: list[float] = field(default_factory=list)
    upstream_outages: list[tuple[float, float]] = field(default_factory=list)
    dns_flips: list[float] = field(default_factory=list)
    skipped_kills: int = 0
    #: When the master closed a retired backend's connections (`grace period over`, from its
    #: log): a keep-alive connection to an address that left DNS is cut --grace after.
    retired_cuts: list[float] = field(default_factory=list)
    #: In-place upgrades, from the log: (SIGUSR2 sent, the new image `listening`), and how
    #: many the master refused (a worker not ready, a mode it cannot carry).
    upgrade_windows: list[tuple[float, float]] = field(default_factory=list)
    upgrades_refused: int = 0


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def in_rotation(bal: Balancer) -> list[int]:
    return [pid for pid, _ in bal.ready_workers().values() if alive(pid)]


@dataclass
class Remote:
    """What the fault loop can do to the remote backends."""

    procs: ProcessSet
    tmp: Path
    static_port: int
    dns_port: int
    dns: Dns | None = None
    static: object = None

    def start_static(self) -> None:
        self.static = self.procs.start(
            "upstream", [sys.executable, "-c", UPSTREAM_SERVER, STATIC_UPSTREAM, str(self.static_port)], self.tmp / "upstream.log"
        )

    def stop_static(self) -> None:
        if self.static is not None:
            self.procs.stop(self.static)
            self.static = None


def fault_loop(
    bal: Balancer,
    faults: Faults,
    until: float,
    stop: threading.Event,
    features: set[str],
    remote: Remote | None,
    upgrade_every: float,
) -> None:
    rng = random.Random(int(time.time()))
    t0 = time.time()
    next_kill, next_stop, next_reload = t0 + KILL_EVERY, t0 + STOP_EVERY / 2, t0 + RELOAD_EVERY
    next_upgrade = t0 + upgrade_every + UPGRADE_OFFSET
    next_outage, next_flip, outage_since = t0 + UPSTREAM_EVERY / 2, t0 + DNS_FLIP_EVERY, None
    stopped: tuple[int, float] | None = None
    while not stop.is_set() and time.time() < until:
        now = time.time()
        if stopped and now >= stopped[1] + STOP_FOR:
            if alive(stopped[0]):
                os.kill(stopped[0], signal.SIGCONT)
            faults.stops.append((stopped[1], time.time()))
            stopped = None
        if now >= next_kill:
            next_kill += KILL_EVERY
            pids = [p for p in in_rotation(bal) if not stopped or p != stopped[0]]
            if len(pids) >= 2:
                victim = rng.choice(pids)
                sent = time.time()
                os.kill(victim, signal.SIGKILL)
                while alive(victim) and time.time() < sent + 2:
                    time.sleep(0.001)
                faults.kills.append((sent, time.time()))
            else:
                faults.skipped_kills += 1
        if now >= next_stop and not stopped:
            next_stop += STOP_EVERY
            pids = in_rotation(bal)
            if len(pids) >= 2:
                victim = rng.choice(pids)
                os.kill(victim, signal.SIGSTOP)
                stopped = (victim, time.time())
        if now >= next_reload:
            next_reload += RELOAD_EVERY
            os.kill(bal.pid, signal.SIGHUP)
            faults.reloads.append(time.time())
        if remote and outage_since is None and now >= next_outage:
            next_outage += UPSTREAM_EVERY
            remote.stop_static()
            outage_since = time.time()
        if remote and outage_since is not None and now >= outage_since + UPSTREAM_DOWN_FOR:
            remote.start_static()
            faults.upstream_outages.append((outage_since, time.time()))
            outage_since = None
        if remote and remote.dns and now >= next_flip:
            next_flip += DNS_FLIP_EVERY
            remote.dns.ip = DNS_UPSTREAMS[1] if remote.dns.ip == DNS_UPSTREAMS[0] else DNS_UPSTREAMS[0]
            faults.dns_flips.append(time.time())
        if "upgrade" in features and upgrade_every > 0 and now >= next_upgrade:
            next_upgrade += upgrade_every
            ask_upgrade(bal, faults)
        time.sleep(0.01)
    if stopped and alive(stopped[0]):
        os.kill(stopped[0], signal.SIGCONT)
        faults.stops.append((stopped[1], time.time()))
    if remote and outage_since is not None:
        remote.start_static()
        faults.upstream_outages.append((outage_since, time.time()))


def ask_upgrade(bal: Balancer, faults: Faults) -> None:
    """SIGUSR2, asked again while the master refuses it (its log says at once)."""
    for _ in range(UPGRADE_TRIES):
        seen = len(bal.proc.lines)
        os.kill(bal.pid, signal.SIGUSR2)
        faults.upgrades.append(time.time())
        deadline = time.time() + 1.0
        refused = False
        while time.time() < deadline:
            new = [t for _, t in list(bal.proc.lines)[seen:]]
            if any("upgrade refused" in t for t in new):
                refused = True
                break
            if any("upgrading in place" in t for t in new):
                return
            time.sleep(0.02)
        if not refused:
            return
        time.sleep(UPGRADE_RETRY)


# ---------------------------------------------------------------------------------------------
# Remote upstreams and a DNS server (only when this build has --upstream / --resolver)

#: A static upstream that goes away and comes back, and two behind a DNS name whose answer
#: flips between them. Loopback addresses of their own, so each is one backend.
STATIC_UPSTREAM = "127.0.0.2"
DNS_UPSTREAMS = ("127.0.0.3", "127.0.0.4")
DNS_NAME = "soak.test"
DNS_FLIP_EVERY = 30.0

UPSTREAM_SERVER = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"upstream %s\n" % sys.argv[1].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer.allow_reuse_address = True
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Dns:
    """A DNS server on 127.0.0.1 (UDP) answering A queries for DNS_NAME with one address,
    TTL 1 s; AAAA and other names get an empty NOERROR answer."""

    def __init__(self, ip: str):
        self.ip = ip
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                q, peer = self.sock.recvfrom(512)
            except OSError:
                continue
            if len(q) < 17:
                continue
            i, labels = 12, []
            while i < len(q) and q[i] != 0:
                labels.append(q[i + 1 : i + 1 + q[i]].decode(errors="replace"))
                i += 1 + q[i]
            qend = i + 5
            if qend > len(q):
                continue
            qtype = int.from_bytes(q[i + 1 : i + 3], "big")
            match = ".".join(labels).lower() == DNS_NAME and qtype == 1
            head = q[:2] + b"\x81\x80" + b"\x00\x01" + (b"\x00\x01" if match else b"\x00\x00") + b"\x00\x00\x00\x00"
            answer = b""
            if match:
                answer = b"\xc0\x0c\x00\x01\x00\x01" + (1).to_bytes(4, "big") + b"\x00\x04" + socket.inet_aton(self.ip)
            self.sock.sendto(head + q[12:qend] + answer, peer)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(1)
        self.sock.close()


# ---------------------------------------------------------------------------------------------
# Sampling the master


def proc_threads(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def children(pid: int) -> int:
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                total += len(f.read().split())
        return total
    except OSError:
        return 0


def sample_loop(pid: int, samples: list[tuple[float, int, int, int, int]], until: float, stop: threading.Event) -> None:
    while not stop.is_set() and time.time() < until:
        rss, fds, thr = machine.rss_kib(pid), machine.fd_count(pid), proc_threads(pid)
        if rss is not None and fds is not None and thr is not None:
            samples.append((time.time(), rss, fds, thr, children(pid)))
        stop.wait(1.0)


# ---------------------------------------------------------------------------------------------
# Analysis and output


def casualty(a: Attempt, faults: Faults) -> bool:
    """Whether a failed request was open while a worker it may have reached died or stood
    still (and had its request out)."""
    if not a.sent:
        return False
    windows = [(s, d + KILL_WINDOW) for s, d in faults.kills]
    windows += [(s, c + STOP_WINDOW) for s, c in faults.stops]
    return any(a.start <= hi and a.end >= lo for lo, hi in windows)


def retired_cut(a: Attempt, faults: Faults) -> bool:
    """Whether a failed request was open when the master closed a retired backend's
    connections (the log's timestamp, to the millisecond)."""
    return any(a.start - 0.1 <= t <= a.end + 0.1 for t in faults.retired_cuts)


def upgrade_cut(a: Attempt, faults: Faults) -> bool:
    """Whether a failed request on a reused connection was open across an in-place
    upgrade (its drain, then the exec, closes the connections still open). A request on a
    new connection has no such excuse: the listen backlog holds it through the exec."""
    return a.conn == "reused" and any(a.start <= hi + KILL_WINDOW and a.end >= lo for lo, hi in faults.upgrade_windows)


def backlog_timeout(a: Attempt, faults: Faults) -> bool:
    """Whether a failed request on a new connection timed out while an in-place upgrade had
    the master stop accepting: it waited in the listen backlog through the drain. Such a
    request is a failed new request whatever else happened meanwhile (a kill, a stop): its
    wait overlapped an upgrade window, and no worker ever saw it."""
    return a.conn == "new" and a.kind == "timeout" and any(a.start <= hi and a.end >= lo for lo, hi in faults.upgrade_windows)


def casualty_cause(a: Attempt, faults: Faults) -> str | None:
    """Why a failed request is an in-flight casualty, or None: a failed new request."""
    if backlog_timeout(a, faults):
        return None
    if casualty(a, faults):
        return "kill or stop of their worker"
    if retired_cut(a, faults):
        return "cut at a retired backend's --grace"
    if upgrade_cut(a, faults):
        return "reused connection cut by an in-place upgrade"
    return None


def failed_new_kind(a: Attempt, faults: Faults) -> str:
    """The row label of a failed new request."""
    if backlog_timeout(a, faults):
        return "timeout in the listen backlog during an upgrade's drain"
    return f"{a.kind} on a {a.conn} connection"


def slope_per_min(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 60.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def series_rows(samples: list[tuple[float, int, int, int, int]]) -> list[list[str]]:
    if not samples:
        return []
    t0 = samples[0][0]
    names = [("RSS (MiB)", 1, 1 / 1024), ("open fds", 2, 1), ("threads", 3, 1), ("children", 4, 1)]
    rows = []
    # "start → end" are the first and last samples; the medians of the first and last
    # minute say the same without one sample's noise (a replacement worker being spawned).
    for name, i, scale in names:
        xs = [s[0] - t0 for s in samples]
        ys = [s[i] * scale for s in samples]
        first = [y for x, y in zip(xs, ys) if x <= 60] or ys[:1]
        last = [y for x, y in zip(xs, ys) if x >= xs[-1] - 60] or ys[-1:]
        # The first minute includes start-up growth; the trend is fitted after it.
        steady = [(x, y) for x, y in zip(xs, ys) if x >= 60] or list(zip(xs, ys))
        slope = slope_per_min([x for x, _ in steady], [y for _, y in steady])
        rows.append(
            [
                name,
                f"{ys[0]:.1f} → {ys[-1]:.1f}",
                f"{statistics.median(first):.1f} → {statistics.median(last):.1f}",
                f"{min(ys):.1f}",
                f"{max(ys):.1f}",
                f"{slope:+.3f}",
            ]
        )
    return rows


def md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def ensure_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401

        return True
    except ImportError:
        pass
    log("installing matplotlib with pip (for the chart)")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"], timeout=600)
    return done.returncode == 0


def chart_png(
    path: Path, samples, fails: list[Attempt], casualties: list[Attempt], faults: Faults, t0: float, protocol: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(5, 1, figsize=(10, 11), sharex=True)
    xs = [(s[0] - t0) / 60 for s in samples]
    for ax, (label, i, scale) in zip(
        axes, [("master RSS (MiB)", 1, 1 / 1024), ("open fds", 2, 1), ("threads", 3, 1), ("children", 4, 1)]
    ):
        ax.plot(xs, [s[i] * scale for s in samples], lw=1)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ax = axes[4]
    bins = max(1, int((samples[-1][0] - t0) // 10) + 1) if samples else 1
    for group, colour, label in ((fails, "red", "failed new (per 10 s)"), (casualties, "orange", "in-flight casualties (per 10 s)")):
        counts = [0] * bins
        for a in group:
            counts[min(bins - 1, max(0, int((a.start - t0) // 10)))] += 1
        ax.step([i * 10 / 60 for i in range(bins)], counts, where="post", color=colour, label=label)
    for r in faults.reloads:
        ax.axvline((r - t0) / 60, color="grey", alpha=0.2, lw=0.8)
    for lo, _ in faults.upgrade_windows:
        ax.axvline((lo - t0) / 60, color="green", alpha=0.4, lw=0.8)
    ax.set_ylim(bottom=0, top=max(1, ax.get_ylim()[1]))
    ax.set_ylabel("requests")
    ax.set_xlabel("minutes (grey lines: rolling reloads; green: in-place upgrades)")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.suptitle(f"balancer chaos soak, {protocol} mode: master resources and client failures")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def chart_svg(path: Path, samples, t0: float) -> None:
    """The four resource series as polylines, without matplotlib."""
    w, h, pad = 800, 130, 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{4 * h + 20}" font-family="sans-serif" font-size="11">']
    span = max(1.0, samples[-1][0] - t0) if samples else 1.0
    for k, (label, i, scale) in enumerate([("RSS MiB", 1, 1 / 1024), ("fds", 2, 1), ("threads", 3, 1), ("children", 4, 1)]):
        ys = [s[i] * scale for s in samples] or [0]
        top = max(ys) * 1.1 or 1
        y0 = k * h + 10
        pts = " ".join(
            f"{pad + (s[0] - t0) / span * (w - 2 * pad):.1f},{y0 + h - 20 - s[i] * scale / top * (h - 30):.1f}" for s in samples
        )
        parts.append(f'<text x="4" y="{y0 + 12}">{label} (max {max(ys):.1f})</text>')
        parts.append(f'<line x1="{pad}" y1="{y0 + h - 20}" x2="{w - pad}" y2="{y0 + h - 20}" stroke="#999"/>')
        parts.append(f'<polyline fill="none" stroke="#1f77b4" points="{pts}"/>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))


def write_readme(block: str, protocol: str) -> None:
    """Puts `block` between this protocol's markers (each mode keeps its own run)."""
    readme.splice(REPO / "README.md", f"soak:{protocol}", block, f"### Chaos soak, {protocol} mode")


# ---------------------------------------------------------------------------------------------


def features_of(binary: Path) -> set[str]:
    text = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=30).stdout
    found = set()
    upgrade = subprocess.run([str(binary), "upgrade", "--help"], capture_output=True, timeout=30)
    if "SIGUSR2" in text or upgrade.returncode == 0:
        found.add("upgrade")
    if "--upstream" in text:
        found.add("upstream")
    if "--resolver" in text:
        found.add("dns")
    if "--protocol" in text:
        found.add("http")
    return found


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--new-conn", type=int, default=4, help="load threads with a new connection per request")
    p.add_argument("--keep-alive", type=int, default=2, help="load threads reusing one connection")
    p.add_argument("--protocol", choices=["tcp", "http"], default="tcp", help="tcp (proxy mode, the default) or http")
    p.add_argument(
        "--upgrade-every",
        type=float,
        default=UPGRADE_EVERY,
        help=f"seconds between in-place upgrades (SIGUSR2) when this build has them; 0: none (default {UPGRADE_EVERY:.0f})",
    )
    p.add_argument("--binary", type=Path, help="default: target/release/balancer (built if missing)")
    p.add_argument("--out", type=Path, default=REPO / "docs")
    p.add_argument("--no-readme", action="store_true", help="do not write README.md")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    binary = a.binary or REPO / "target" / "release" / "balancer"
    if not binary.exists():
        log("cargo build --release")
        subprocess.run(["cargo", "build", "--release"], cwd=REPO, check=True, timeout=BUILD_TIMEOUT)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    features = features_of(binary)
    a.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"balancer-soak-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    procs = ProcessSet(log)
    faults = Faults()
    extra: list[str] = []
    if a.protocol == "http":
        if "http" not in features:
            sys.exit("--protocol http: this build of balancer has no --protocol")
        extra += ["--protocol", "http"]
    remote: Remote | None = None
    try:
        if "upstream" in features:
            remote = Remote(procs, tmp, free_port(STATIC_UPSTREAM), 0)
            remote.start_static()
            extra += ["--upstream", f"{STATIC_UPSTREAM}:{remote.static_port}"]
            if "dns" in features:
                port = free_port(DNS_UPSTREAMS[0])
                for ip in DNS_UPSTREAMS:
                    procs.start(f"upstream-{ip}", [sys.executable, "-c", UPSTREAM_SERVER, ip, str(port)], tmp / f"upstream-{ip}.log")
                remote.dns = Dns(DNS_UPSTREAMS[0])
                extra += ["--upstream", f"{DNS_NAME}:{port}", "--resolver", f"127.0.0.1:{remote.dns.port}", "--resolve-interval", "1s"]
            time.sleep(0.5)  # Pacing: let the upstream servers bind before balancer checks them.
        argv_b = [str(binary), "--listen", "127.0.0.1:0", "--cpus", str(a.workers), *extra]
        proc = procs.start("balancer", argv_b, tmp / "balancer.log", env=balancer_env())

        def msg(m):
            return lambda t: (lambda l: l if l is not None and l.message == m else None)(parse_log_line(t))

        _, listening = proc.wait_for(msg("listening"), START_TIMEOUT)
        proc.wait_for(msg("all workers ready"), START_TIMEOUT)
        bal = Balancer(proc, listening.fields["addr"])
        host, port = bal.listen.rsplit(":", 1)
        log(f"balancer pid {bal.pid} on {bal.listen}; {a.duration:.0f} s; features {sorted(features) or 'none'}")

        t0 = time.time()
        until = t0 + a.duration
        stop = threading.Event()
        samples: list[tuple[float, int, int, int, int]] = []
        load = Load(host, int(port), a.new_conn, a.keep_alive, until)
        sampler = threading.Thread(target=sample_loop, args=(bal.pid, samples, until, stop), daemon=True)
        chaos = threading.Thread(target=fault_loop, args=(bal, faults, until, stop, features, remote, a.upgrade_every), daemon=True)
        sampler.start()
        load.start()
        chaos.start()
        while time.time() < until and proc.alive():
            time.sleep(min(10.0, max(0.0, until - time.time())))
            with load.lock:
                n, bad = len(load.attempts), sum(1 for x in load.attempts if x.kind != "ok")
            log(f"{time.time() - t0:5.0f} s: {n} requests, {bad} not ok, {len(faults.kills)} kills, {len(faults.reloads)} reloads")
        stop.set()
        chaos.join(10)
        load.finish()
        sampler.join(5)
        master_survived = proc.alive()
        os.kill(bal.pid, signal.SIGTERM)
        try:
            status = proc.popen.wait(60)
        except subprocess.TimeoutExpired:
            status = None
    finally:
        if remote and remote.dns:
            remote.dns.close()
        procs.stop_all()

    upgrade_sent = sorted(faults.upgrades)
    for _, text in proc.lines:
        line = parse_log_line(text)
        if line is None:
            continue
        if line.message.startswith("grace period over; closing the retired backend"):
            faults.retired_cuts.append(line.ts)
        elif line.message == "listening" and line.fields.get("upgraded") == "true":
            # The new image serving: the window opened at the last SIGUSR2 before it.
            sent = [t for t in upgrade_sent if t <= line.ts]
            if sent:
                faults.upgrade_windows.append((sent[-1], line.ts))
        elif "upgrade" in line.message and line.level in ("WARN", "ERROR"):
            faults.upgrades_refused += 1
    attempts = sorted(load.attempts, key=lambda x: x.start)
    failed = [x for x in attempts if x.kind != "ok"]
    cause: dict[int, str] = {}
    for x in failed:
        c = casualty_cause(x, faults)
        if c is not None:
            cause[id(x)] = c
    casualties = [x for x in failed if id(x) in cause]
    failed_new = [x for x in failed if id(x) not in cause]

    def counts(xs, key) -> str:
        c: dict[str, int] = {}
        for x in xs:
            c[key(x)] = c.get(key(x), 0) + 1
        return ", ".join(f"{k}: {v}" for k, v in sorted(c.items()))

    elapsed = (attempts[-1].end - attempts[0].start) if attempts else 0.0
    panics = sum(1 for _, l in proc.lines if "panicked" in l)
    upgrades = "not in this build"
    if "upgrade" in features:
        upgrades = (
            f"{len(faults.upgrade_windows)} done (one every {a.upgrade_every:.0f} s, asked again {UPGRADE_RETRY} s after a refusal); {len(faults.upgrades)} SIGUSR2 sent, "
            f"{faults.upgrades_refused} refused or failed (log)"
            if a.upgrade_every > 0
            else "off (--upgrade-every 0)"
        )

    summary = [
        ["duration", f"{a.duration:.0f} s ({a.workers} workers, {a.protocol} mode, {a.new_conn} new-connection + {a.keep_alive} keep-alive client threads)"],
        ["requests", f"{len(attempts)} ({len(attempts) / elapsed:.0f}/s)" if elapsed else "0"],
        ["**failed new requests**", f"**{len(failed_new)}**" + (f" ({counts(failed_new, lambda x: failed_new_kind(x, faults))})" if failed_new else "")],
        ["in-flight casualties", f"{len(casualties)}" + (f" ({counts(casualties, lambda x: cause[id(x)])})" if casualties else "")],
        ["in-flight casualties by kind", counts(casualties, lambda x: x.kind) or "-"],
        ["keep-alive connections closed under the client with zero response bytes, retried on a new connection", str(load.retried)],
        ["retired backends' connections closed at --grace (master log)", str(len(faults.retired_cuts))],
        ["kill -9 of a worker", f"{len(faults.kills)} (every {KILL_EVERY:.0f} s; {faults.skipped_kills} skipped with < 2 in rotation)"],
        ["SIGSTOP/SIGCONT of a worker", f"{len(faults.stops)} ({STOP_FOR} s each, every {STOP_EVERY:.0f} s)"],
        ["rolling reloads", f"{len(faults.reloads)} (every {RELOAD_EVERY:.0f} s)"],
        ["in-place upgrades", upgrades],
        ["remote upstream gone and back", f"{len(faults.upstream_outages)} ({UPSTREAM_DOWN_FOR:.0f} s down every {UPSTREAM_EVERY:.0f} s)" if "upstream" in features else "not in this build"],
        ["DNS answer changed", f"{len(faults.dns_flips)} (every {DNS_FLIP_EVERY:.0f} s, TTL 1 s)" if "dns" in features else "not in this build"],
        ["master at the end", f"{'alive' if master_survived else 'DIED'}; SIGTERM exit status {status}; panics in log: {panics}"],
    ]
    table = md_table(["what", "result"], summary)
    resources = md_table(
        ["master", "start → end", "median, first → last minute", "min", "max", "trend after minute 1 (per min)"],
        series_rows(samples),
    )
    stem = f"soak-{a.protocol}"
    chart_name = f"{stem}.png"
    t_start = samples[0][0] if samples else time.time()
    if ensure_matplotlib():
        chart_png(a.out / chart_name, samples, failed_new, casualties, faults, t_start, a.protocol)
    else:
        chart_name = f"{stem}.svg"
        chart_svg(a.out / chart_name, samples, t_start)
    with open(a.out / f"{stem}-samples.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", "rss_kib", "fds", "threads", "children"])
        for s in samples:
            w.writerow([f"{s[0] - t_start:.1f}", *s[1:]])
    with open(a.out / f"{stem}-requests.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["start", "end", "kind", "sent", "conn", "class"])
        for x in failed:
            w.writerow([f"{x.start - t_start:.3f}", f"{x.end - t_start:.3f}", x.kind, x.sent, x.conn, cause.get(id(x), f"failed-new: {failed_new_kind(x, faults)}")])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0))
    cmd = "python3 bench/soak.py" + ("" if a.protocol == "tcp" else f" --protocol {a.protocol}")
    cmd += "" if a.duration == 600 else f" --duration {a.duration:.0f}"
    cmd += "" if a.upgrade_every == UPGRADE_EVERY else f" --upgrade-every {a.upgrade_every:.0f}"
    rel = os.path.relpath(a.out / chart_name, REPO)
    block = f"Run of {when}, `{cmd}` (release build, 2-core machine shared with other work):\n\n{table}\n\n{resources}\n\n![soak chart, {a.protocol} mode]({rel})"
    (a.out / f"{stem}-results.md").write_text(f"# Chaos soak, {a.protocol} mode\n\n{block.replace(rel, chart_name)}\n")
    if not a.no_readme:
        write_readme(block, a.protocol)
    print(block)
    return 0 if master_survived and not failed_new else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
