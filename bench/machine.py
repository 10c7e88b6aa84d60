"""What the machine is doing, read from /proc: system CPU use, one process's CPU time,
memory and open files, its descendants, and waiting until the box is quiet. Linux only."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Iterable

#: Clock ticks per second: the unit of utime/stime in /proc/<pid>/stat and of /proc/stat.
CLK_TCK = os.sysconf("SC_CLK_TCK")


def system_cpu() -> tuple[int, int]:
    """(busy, total) clock ticks summed over all CPUs since boot (iowait counts as idle)."""
    with open("/proc/stat") as f:
        first = f.readline().split()
    # user nice system idle iowait irq softirq steal (guest time is already inside user).
    ticks = [int(x) for x in first[1:9]]
    total = sum(ticks)
    return total - ticks[3] - ticks[4], total


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (after the command name, which may contain spaces)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rindex(")") + 2 :].split()


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def cpu_seconds(pid: int) -> float | None:
    """utime + stime (fields 14 and 15) of all threads of `pid`, in seconds; None if gone."""
    rest = _stat_fields(pid)
    if rest is None:
        return None
    # rest[0] is field 3, so field 14 is rest[11] and field 15 is rest[12].
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def total_cpu_seconds(pids: Iterable[int]) -> float:
    """Sum of [`cpu_seconds`] over `pids`; a vanished pid counts 0."""
    return sum(cpu_seconds(p) or 0.0 for p in pids)


def start_time(pid: int) -> int | None:
    """Field 22 (start time in ticks since boot): tells a pid from a later reuse of it."""
    rest = _stat_fields(pid)
    return None if rest is None else int(rest[19])


def parent(pid: int) -> int | None:
    rest = _stat_fields(pid)
    return None if rest is None else int(rest[1])


def all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def descendants(root: int) -> list[int]:
    """Every live process below `root` (children, grandchildren, ...), not `root` itself."""
    by_parent: dict[int, list[int]] = {}
    for pid in all_pids():
        pp = parent(pid)
        if pp is not None:
            by_parent.setdefault(pp, []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rss_kib(pid: int) -> int | None:
    """VmRSS from /proc/<pid>/status, in KiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def time_wait_sockets() -> int | None:
    """TCP sockets in TIME_WAIT on the whole machine, from /proc/net/sockstat (cheap to read,
    unlike /proc/net/tcp, whose cost grows with this number)."""
    try:
        with open("/proc/net/sockstat") as f:
            for line in f:
                if line.startswith("TCP:"):
                    parts = line.split()
                    return int(parts[parts.index("tw") + 1])
    except (OSError, ValueError):
        return None
    return None


def wait_time_wait(limit: int, max_wait: float, log: Callable[[str], None]) -> int | None:
    """Waits (at most `max_wait` s; TIME_WAIT lasts 60 s on Linux) until fewer than `limit`
    TCP sockets are in TIME_WAIT; returns the count then."""
    deadline = time.monotonic() + max_wait
    count = time_wait_sockets()
    if count is not None and count >= limit:
        log(f"waiting for TIME_WAIT sockets to expire: {count} (want < {limit})")
    while count is not None and count >= limit and time.monotonic() < deadline:
        time.sleep(1)
        count = time_wait_sockets()
    return count


def _cpu_table() -> dict[int, int]:
    """pid -> utime+stime ticks, for every process readable now."""
    table = {}
    for pid in all_pids():
        rest = _stat_fields(pid)
        if rest is not None:
            table[pid] = int(rest[11]) + int(rest[12])
    return table


@dataclass
class Quiet:
    """What the box looked like just before a run."""

    #: Fraction of all CPUs idle in the last sample (0..1).
    idle: float
    #: Seconds spent waiting for quiet.
    waited: float
    #: The busiest processes that are not ours in the last sample as ("comm(pid)", CPUs used),
    #: and ("unattributed", CPUs) for busy time that no live process explains.
    foreign: list[tuple[str, float]]

    def describe(self) -> str:
        return ", ".join(f"{name} {cpus:.0%}" for name, cpus in self.foreign) or "none visible"


def wait_quiet(
    min_idle: float,
    max_wait: float,
    ours: Callable[[], set[int]],
    log: Callable[[str], None],
    sample: float = 0.5,
) -> Quiet:
    """Samples CPU use over `sample` seconds until at least `min_idle` of all CPUs were idle,
    or `max_wait` seconds have passed; logs who else was using the CPU while it waits."""
    began = time.monotonic()
    last_log = -1e9
    me = os.getpid()
    while True:
        busy0, total0 = system_cpu()
        procs0 = _cpu_table()
        time.sleep(sample)
        busy1, total1 = system_cpu()
        procs1 = _cpu_table()
        idle = 1.0 - (busy1 - busy0) / max(1, total1 - total0)
        mine = ours() | {me}
        deltas = {p: procs1[p] - procs0[p] for p in procs1 if p in procs0 and procs1[p] > procs0[p]}
        hogs = sorted(((t, p) for p, t in deltas.items() if p not in mine), reverse=True)[:4]
        foreign = [(f"{_comm(p)}({p})", t / CLK_TCK / sample) for t, p in hogs]
        # Busy time no live process explains: processes that came and went (compiler jobs)
        # or live in another pid namespace.
        unexplained = max(0, (busy1 - busy0) - sum(deltas.values())) / CLK_TCK / sample
        if unexplained >= 0.1:
            foreign.append(("unattributed", unexplained))
        waited = time.monotonic() - began
        quiet = Quiet(idle, waited, foreign)
        if idle >= min_idle:
            return quiet
        if waited >= max_wait:
            log(f"box still busy after {waited:.0f}s (idle {idle:.0%} < {min_idle:.0%}); running anyway. foreign CPU: {quiet.describe()}")
            return quiet
        if waited - last_log >= 5:
            last_log = waited
            log(f"waiting for quiet: idle {idle:.0%}; foreign CPU: {quiet.describe()}")


def parse_tcp_out_segments(snmp: str) -> int | None:
    """`Tcp: OutSegs` from the text of /proc/net/snmp (a header line, then a value line)."""
    rows = [line.split() for line in snmp.splitlines() if line.startswith("Tcp:")]
    if len(rows) < 2 or "OutSegs" not in rows[0]:
        return None
    try:
        return int(rows[1][rows[0].index("OutSegs")])
    except (IndexError, ValueError):
        return None


def tcp_out_segments() -> int | None:
    """TCP segments the machine has sent (all sockets, retransmits excepted): under one load
    on loopback, their count per request says how many packets each proxy makes the kernel
    carry, handshakes, ACKs and FINs included, and it does not move with the box's load."""
    try:
        with open("/proc/net/snmp") as f:
            return parse_tcp_out_segments(f.read())
    except OSError:
        return None


def loadavg() -> tuple[float, float, float]:
    """The 1-, 5- and 15-minute load averages from /proc/loadavg: on a box shared with other
    builders, the figure that says how busy it was while a result was taken."""
    with open("/proc/loadavg") as f:
        one, five, fifteen = f.read().split()[:3]
    return float(one), float(five), float(fifteen)


def established(port: int) -> int | None:
    """Established TCP connections whose remote port is `port` (the client legs into a proxy
    listening there), counted by `ss` over netlink: reading /proc/net/tcp costs more the
    more sockets the box has, and this runs while 10,000 are open. None without `ss`."""
    try:
        done = subprocess.run(
            ["ss", "-Htn", "state", "established", f"( dport = :{port} )"],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return sum(1 for line in done.stdout.splitlines() if line.strip())


def listen_overflows() -> int | None:
    """TcpExt ListenOverflows from /proc/net/netstat: connects dropped because a listen
    queue was full, machine-wide (the kernel retries them after 1, 3, 7 s)."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines, lines[1:]):
        if names.startswith("TcpExt:") and values.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            return int(table["ListenOverflows"]) if "ListenOverflows" in table else None
    return None
