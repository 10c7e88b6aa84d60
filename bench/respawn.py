"""How long balancer takes to replace a worker killed with SIGKILL: from the kill (this
script's clock) to the replacement's `worker ready` log line (balancer's own timestamp;
both clocks are the machine's realtime clock)."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Callable

import machine
from targets import Balancer, LogLine, parse_log_line

#: How long one replacement may take before the measurement gives up.
REPLACE_TIMEOUT = 15.0


@dataclass
class Respawn:
    slot: int
    old_pid: int
    new_pid: int
    #: Kill → balancer logs `worker exited` (it noticed).
    noticed_ms: float
    #: Kill → balancer logs `worker spawned` for the replacement.
    spawned_ms: float
    #: Kill → balancer logs `worker ready` for the replacement (back in rotation).
    ready_ms: float


def _line(pred: Callable[[LogLine], bool]) -> Callable[[str], LogLine | None]:
    def match(text: str) -> LogLine | None:
        line = parse_log_line(text)
        return line if line is not None and pred(line) else None

    return match


def measure(bal: Balancer, kills: int, log: Callable[[str], None]) -> list[Respawn]:
    """Kills a worker of `bal` `kills` times (alternating slots), each time after every slot
    is ready again, and times its replacement."""
    out: list[Respawn] = []
    slots_wanted = len(bal.ready_workers())
    for i in range(kills):
        workers = bal.ready_workers()
        if len(workers) != slots_wanted:
            # The previous replacement is in rotation; the other slot must be too.
            bal.proc.wait_for(lambda _: len(bal.ready_workers()) == slots_wanted, REPLACE_TIMEOUT)
            workers = bal.ready_workers()
        slot = sorted(workers)[i % len(workers)]
        pid = workers[slot][0]
        if machine.parent(pid) != bal.pid:
            raise RuntimeError(f"pid {pid} (slot {slot}) is not a child of balancer {bal.pid}; not killing it")
        start = len(bal.proc.lines)
        t_kill = time.time()
        os.kill(pid, signal.SIGKILL)
        at, exited = bal.proc.wait_for(
            _line(lambda l: l.message == "worker exited" and l.fields.get("pid") == str(pid)), REPLACE_TIMEOUT, start
        )
        at, spawned = bal.proc.wait_for(
            _line(lambda l: l.message == "worker spawned" and l.fields.get("slot") == str(slot)), REPLACE_TIMEOUT, at
        )
        _, ready = bal.proc.wait_for(
            _line(lambda l: l.message == "worker ready" and l.fields.get("pid") == spawned.fields["pid"]), REPLACE_TIMEOUT, at
        )
        ms = lambda line: (line.ts - t_kill) * 1000
        r = Respawn(slot, pid, int(spawned.fields["pid"]), ms(exited), ms(spawned), ms(ready))
        log(
            f"respawn {i + 1}/{kills}: slot {slot} pid {pid} -> {r.new_pid}: noticed {r.noticed_ms:.1f} ms, "
            f"spawned {r.spawned_ms:.1f} ms, ready {r.ready_ms:.1f} ms"
        )
        out.append(r)
    return out
