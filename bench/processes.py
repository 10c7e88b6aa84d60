"""The long-lived processes the bench starts (balancer, nginx, HAProxy): each one's log, kept
in a file and in memory so it can be waited on, and the guarantee that each one and whatever
it spawned is stopped by PID at the end."""

from __future__ import annotations

import os
import signal
import sys
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

import machine

T = TypeVar("T")

#: How long a process gets to stop after its stop signal before it is killed.
STOP_TIMEOUT = 10.0


class Started:
    """One process we started. Its stdout and stderr (merged) are read by a thread, written
    to `log_path` and kept as (arrival time, line) pairs in `lines`."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        stop_signal: signal.Signals,
        registry: list["Started"],
        env: dict[str, str] | None = None,
    ):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.stop_signal = stop_signal
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._eof = False
        # pid -> start time of every descendant seen, so stragglers can be killed by pid
        # without hitting a process that reused the pid.
        self._known: dict[int, int | None] = {}
        self._log = open(log_path, "w", buffering=1)
        # A process group of its own: a Ctrl-C in the terminal reaches only this script,
        # which then stops everything in order. Not a session of its own: with
        # kernel.sched_autogroup_enabled=1 (Debian's default) every session is a scheduling
        # group with one group's share of the CPUs, so a balancer and the workers it starts
        # shared one share while nginx and its backends (two sessions) had two, and wrk a
        # third. On this saturated 2-core box that made balancer's proxy threads sleep about
        # once per request (1.2 voluntary context switches per request on close50, against
        # 0.08 with every process in one group) and charged it the wake-ups. In one session,
        # every target, its backends and wrk are scheduled alike, thread by thread.
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            # `process_group` is Python 3.11+; `setpgrp` in the child does the same before.
            **({"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}),
            env=env,
        )
        registry.append(self)
        self.pid = self.popen.pid
        self._reader = threading.Thread(target=self._read, name=f"log-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            now = time.time()
            self._log.write(line)
            with self._cond:
                self.lines.append((now, line.rstrip("\n")))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for(self, match: Callable[[str], T | None], timeout: float, start: int = 0) -> tuple[int, T]:
        """Waits until a log line at index >= `start` gives a truthy `match(line)`; returns
        (index, match result). Raises if the process ends or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        i = start
        with self._cond:
            while True:
                while i < len(self.lines):
                    found = match(self.lines[i][1])
                    if found:
                        return i, found
                    i += 1
                if self._eof:
                    raise RuntimeError(
                        f"{self.name} ended (status {self.popen.wait(1)}) before the expected log line; see {self.log_path}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name}: expected log line not seen within {timeout:.0f}s; see {self.log_path}")
                self._cond.wait(left)

    def pids(self) -> list[int]:
        """This process and its live descendants (remembered for the final cleanup)."""
        if not self.alive():
            return []
        below = machine.descendants(self.pid)
        for p in below:
            self._known.setdefault(p, machine.start_time(p))
        return [self.pid, *below]

    def stop(self, log: Callable[[str], None]) -> None:
        """Stop signal, then SIGKILL after [`STOP_TIMEOUT`]; then SIGKILL to any descendant
        seen during its life that still runs."""
        if self.alive():
            self.pids()
            try:
                os.kill(self.pid, self.stop_signal)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log(f"{self.name} (pid {self.pid}) ignored {self.stop_signal.name}; killing it")
                self.popen.kill()
                self.popen.wait(STOP_TIMEOUT)
        for pid, started in self._known.items():
            if started is not None and machine.start_time(pid) == started:
                log(f"{self.name}: killing leftover pid {pid}")
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._reader.join(2)
        self._log.close()


class ProcessSet:
    """All processes started by this run, stopped in reverse order by `stop_all`."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.started: list[Started] = []

    def start(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        stop_signal: signal.Signals = signal.SIGTERM,
        env: dict[str, str] | None = None,
    ) -> Started:
        self.log(f"starting {name}: {' '.join(argv)}")
        return Started(name, argv, log_path, stop_signal, self.started, env)

    def pids(self) -> set[int]:
        """Every live process we started and everything below them."""
        return {p for s in self.started for p in s.pids()}

    def stop(self, proc: Started) -> None:
        try:
            proc.stop(self.log)
        finally:
            if proc in self.started:
                self.started.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.started)):
            try:
                self.stop(proc)
            except Exception as e:  # keep stopping the others
                self.log(f"stopping {proc.name} (pid {proc.pid}) failed: {e}")
