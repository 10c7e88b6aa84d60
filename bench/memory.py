"""balancer master's memory: resident size idle and with many idle proxied connections open,
and so the memory one proxied connection costs."""

from __future__ import annotations

import resource
import socket
import time
from dataclasses import dataclass
from typing import Callable

import machine
from targets import Balancer, parse_log_line

#: Timeout of one client connect; loopback connects into a listen backlog are immediate.
CONNECT_TIMEOUT = 2.0
#: How long the master may take to accept and connect upstream for every client connection.
SETTLE_TIMEOUT = 30.0
#: Counts unchanged this long mean the master has taken all it will take.
SETTLED_AFTER = 2.0


@dataclass
class MemoryResult:
    wanted: int
    #: Client sockets this script connected.
    opened: int
    #: Connections with both legs open: the master holds a client and an upstream socket, and
    #: a worker holds the accepted one.
    proxied: int
    master_rss_idle_kib: int
    master_rss_loaded_kib: int
    workers_rss_idle_kib: int
    workers_rss_loaded_kib: int
    #: Why fewer than `wanted` were proxied, if so.
    note: str

    @property
    def master_bytes_per_conn(self) -> float | None:
        if self.proxied <= 0:
            return None
        return (self.master_rss_loaded_kib - self.master_rss_idle_kib) * 1024 / self.proxied

    @property
    def workers_bytes_per_conn(self) -> float | None:
        if self.proxied <= 0:
            return None
        return (self.workers_rss_loaded_kib - self.workers_rss_idle_kib) * 1024 / self.proxied


def _fds(pids: list[int]) -> int:
    return sum(machine.fd_count(p) or 0 for p in pids)


def _rss(pids: list[int]) -> int:
    return sum(machine.rss_kib(p) or 0 for p in pids)


def _settle(master: int, workers: list[int], done: Callable[[int, int], bool]) -> tuple[int, int]:
    """Waits until `done(master fds, worker fds)`, or until the counts stop moving."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    last, since = (-1, -1), time.monotonic()
    while True:
        now_counts = (_fds([master]), _fds(workers))
        now = time.monotonic()
        if now_counts != last:
            last, since = now_counts, now
        if done(*now_counts):
            return now_counts
        if now - since >= SETTLED_AFTER or now >= deadline:
            return now_counts
        time.sleep(0.1)


def measure(bal: Balancer, wanted: int, log: Callable[[str], None]) -> MemoryResult:
    """Opens `wanted` idle connections to `bal` from this process, measures, closes them."""
    master = bal.pid
    workers = [pid for pid, _ in bal.ready_workers().values()]
    host, port = bal.listen.rsplit(":", 1)
    rss_idle, wrss_idle = _rss([master]), _rss(workers)
    fd0, wfd0 = _fds([master]), _fds(workers)
    first_line = len(bal.proc.lines)
    socks: list[socket.socket] = []
    note = ""
    try:
        for i in range(wanted):
            try:
                socks.append(socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT))
            except OSError as e:
                note = f"client connect #{i + 1} failed: {e}"
                break
        n = len(socks)
        fds, wfds = _settle(master, workers, lambda m, w: m >= fd0 + 2 * n and w >= wfd0 + n)
        proxied = max(0, min((fds - fd0) // 2, wfds - wfd0))
        rss_loaded, wrss_loaded = _rss([master]), _rss(workers)
        log(
            f"memory: {len(socks)} client connections, {proxied} proxied; master RSS {rss_idle} -> {rss_loaded} KiB, "
            f"workers RSS {wrss_idle} -> {wrss_loaded} KiB"
        )
    finally:
        for s in socks:
            s.close()
    if proxied < wanted and not note:
        warned = [t for _, t in bal.proc.lines[first_line:] if (l := parse_log_line(t)) and l.level in ("WARN", "ERROR")]
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        note = (
            f"{proxied} of {wanted} proxied: the hard open-file limit is {hard} per process "
            f"and the master holds two fds per proxied connection"
        )
        if warned:
            first = warned[0].split(None, 1)[1]  # without the timestamp
            note += f"; the master logged {len(warned)} warnings meanwhile, the first: `{first}`"
    # Let the master and workers close their ends before anything else is measured.
    _settle(master, workers, lambda m, w: m <= fd0 and w <= wfd0)
    return MemoryResult(
        wanted, len(socks), proxied, rss_idle, rss_loaded, wrss_idle, wrss_loaded, note
    )
