#!/usr/bin/env python3
"""The benchmark harness, in one command: builds balancer (release), installs wrk, nginx
(+ stream module) and HAProxy from apt if missing, points wrk at one worker directly,
balancer, nginx and HAProxy (the proxies in front of the same two workers) in interleaved
rounds, measures balancer's memory per idle connection and how fast a killed worker is
replaced, and writes docs/bench-results.md, docs/bench-results.csv, docs/bench-runs.csv and
docs/bench.png.

    python3 bench/run.py             # full run: 3 rounds x 8 s per target and load
    python3 bench/run.py --quick     # smoke run: 1 round x 2 s, written to target/bench-quick/

Every process it starts is stopped by PID at the end, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import machine
import goals
import memory
import node_cluster
import prepare
import readme
import report
import respawn
import wrk
from prepare import REPO, log
from processes import ProcessSet
from targets import Target, balancer_modes, free_port, has_flag, start_balancer, start_haproxy, start_nginx

#: name -> (label, connections, new connection per request)
LOADS: dict[str, tuple[str, int, bool]] = {
    "ka50": ("keep-alive, 50 conns", 50, False),
    "ka200": ("keep-alive, 200 conns", 200, False),
    "close50": ("new connection per request, 50 conns", 50, True),
}
#: Node's own cluster primary and balancer as the primary of the same Node workers
#: (bench/node/app.js), for #15's "`shared` and `handoff` >= 1.0x Node's own cluster".
NODE_TARGETS = ("node-cluster", "balancer-shared-node", "balancer-handoff-node")
#: The loads the Node targets run: keep-alive and a new connection per request.
NODE_LOADS = ("ka50", "close50")
#: The name of this script's block in README.md (see readme.py).
README_BLOCK = "bench"
#: Built-in workers behind every proxy: one per CPU of the reference machine.
WORKERS = 2
#: The balancer whose workers nginx and HAProxy also proxy to checks them once a minute: on
#: a loaded box a health probe that times out would have it replace a worker under the
#: other proxies' feet (bench/NOTES.md, the epoll engine's counts.py runs). The `balancer`
#: and `balancer-epoll` targets both run with it, so their CPU figures stay comparable.
QUIET_HEALTH = ["--health-interval", "60s"]
#: wrk threads: the machine has two CPUs.
WRK_THREADS = 2
#: Length of the unrecorded warm-up run per target.
WARMUP_SECONDS = 1.0
#: Before the respawn test, wait until fewer TCP sockets than this are in TIME_WAIT: the
#: master's admission check reads /proc/net/tcp, and with 50,000 TIME_WAIT sockets a worker's
#: replacement took 10x longer (~125 ms instead of ~13 ms) on the reference machine.
TIME_WAIT_QUIET = 5_000
#: Longest wait for that: TIME_WAIT lasts 60 s on Linux.
TIME_WAIT_MAX_WAIT = 70.0
#: A foreign process using at least this share of one CPU before a run is listed in the results.
FOREIGN_NOTABLE = 0.1
#: Timeout of the one-request check of each target.
CHECK_TIMEOUT = 5.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round of 2 s, 5 respawns, output in target/bench-quick/")
    p.add_argument("--rounds", type=int, help="rounds of all targets and loads (default 3; quick 1)")
    p.add_argument("--duration", type=float, help="seconds per wrk run (default 8; quick 2)")
    p.add_argument("--targets", help="comma-separated subset of direct,balancer,nginx,haproxy,balancer-MODE,balancer-epoll,"
                   + ",".join(NODE_TARGETS))
    p.add_argument("--no-node", action="store_true", help="leave out the Node cluster comparison")
    p.add_argument("--loads", help=f"comma-separated subset of {','.join(LOADS)}")
    p.add_argument("--out", type=Path, help="output directory (default docs/; quick: target/bench-quick/)")
    p.add_argument("--memory-conns", type=int, default=10_000, help="idle connections for the memory test (0 skips it)")
    p.add_argument("--respawn-kills", type=int, help="workers to kill for the respawn test (default 20; quick 5; 0 skips it)")
    p.add_argument("--quiet-idle", type=float, default=0.85, help="share of all CPUs that must be idle before a run (default 0.85)")
    p.add_argument("--quiet-wait", type=float, help="longest wait for that, in seconds (default 30; quick 5)")
    p.add_argument("--no-build", action="store_true", help="use target/release/balancer as it is")
    p.add_argument("--binary", type=Path, help="measure this balancer binary (no build); e.g. a debug build for a smoke run")
    p.add_argument("--no-install", action="store_true", help="fail instead of installing missing tools")
    p.add_argument("--no-readme", action="store_true", help="do not write the figures into README.md")
    a = p.parse_args(argv)
    quick = a.quick
    a.rounds = a.rounds or (1 if quick else 3)
    a.duration = a.duration or (2.0 if quick else 8.0)
    a.respawn_kills = a.respawn_kills if a.respawn_kills is not None else (5 if quick else 20)
    a.quiet_wait = a.quiet_wait if a.quiet_wait is not None else (5.0 if quick else 30.0)
    a.out = a.out or (REPO / "target" / "bench-quick" if quick else REPO / "docs")
    a.loads = a.loads.split(",") if a.loads else list(LOADS)
    unknown = [l for l in a.loads if l not in LOADS]
    if unknown:
        p.error(f"unknown load(s) {unknown}; choose from {list(LOADS)}")
    a.targets = a.targets.split(",") if a.targets else None
    return a


# ---------------------------------------------------------------------------------------
# Measuring


@dataclass
class Outcome:
    runs: list[report.Run] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    memory: memory.MemoryResult | None = None
    respawns: list[respawn.Respawn] = field(default_factory=list)
    #: TCP sockets in TIME_WAIT on the machine when the respawn test began.
    respawn_time_wait: int | None = None
    foreign_seen: dict[str, int] = field(default_factory=dict)


def check_target(t: Target) -> None:
    """One GET: the target must answer like a built-in worker before it is measured."""
    with urllib.request.urlopen(t.url, timeout=CHECK_TIMEOUT) as res:
        body = res.read().decode(errors="replace")
    if res.status != 200 or "child worker run" not in body:
        raise RuntimeError(f"{t.name} answered {res.status} {body[:80]!r}")


def start_node_targets(procs: ProcessSet, bin_path: Path, tmp: Path, wanted: list[str] | None, out: Outcome) -> list[Target]:
    """Node's own cluster and balancer `shared`/`handoff` as the primary of 2 Node workers
    each (bench/node_cluster.py's setups), kept running through the rounds."""
    if shutil.which("node") is None:
        out.skipped.append("Node cluster comparison: no `node` on PATH (apt-get install nodejs)")
        return []
    found = []
    logdir = tmp / "node"  # node_cluster names its logs like the built-in targets'
    logdir.mkdir(exist_ok=True)
    for name in NODE_TARGETS:
        if wanted is not None and name not in wanted:
            continue
        port = free_port()
        setup = {"balancer-shared-node": "balancer-shared", "balancer-handoff-node": "balancer-handoff"}.get(name, name)
        try:
            proc = node_cluster.start(procs, setup, port, logdir, bin_path)
        except (Exception, SystemExit) as e:  # node_cluster exits when nothing answers
            out.skipped.append(f"{name}: did not start ({e})")
            log(f"skipping {name}: {e}")
            continue
        # The primary's CPU: Node's primary process, or balancer's master (not the workers).
        found.append(Target(name, f"http://127.0.0.1:{port}/", lambda proc=proc: [proc.pid] if proc.alive() else []))
    return found


def start_targets(procs: ProcessSet, bin_path: Path, tmp: Path, wanted: list[str] | None, no_node: bool, out: Outcome) -> list[Target]:
    bal = start_balancer(procs, bin_path, tmp, "balancer", WORKERS, QUIET_HEALTH)
    backends = [addr for _, (_, addr) in sorted(bal.ready_workers().items())]
    log(f"balancer {bal.listen} (pid {bal.pid}), workers {backends}")
    targets = [
        Target("direct", f"http://{backends[0]}/", lambda: []),
        Target("balancer", f"http://{bal.listen}/", lambda: [bal.pid] if bal.proc.alive() else []),
    ]
    if wanted is None or "nginx" in wanted:
        targets.append(start_nginx(procs, tmp, backends))
    if wanted is None or "haproxy" in wanted:
        targets.append(start_haproxy(procs, tmp, backends, WORKERS))
    modes = balancer_modes(bin_path)
    if not modes:
        out.skipped.append("balancer --mode shared|reuseport|handoff: this balancer has no `--mode` flag")
    for mode in modes:
        name = f"balancer-{mode}"
        if mode == "proxy" or (wanted is not None and name not in wanted):
            continue
        try:
            b = start_balancer(procs, bin_path, tmp, name, WORKERS, ["--mode", mode])
            targets.append(Target(name, f"http://{b.listen}/", lambda b=b: [b.pid] if b.proc.alive() else []))
        except Exception as e:  # a mode that does not start is skipped, not fatal
            out.skipped.append(f"{name}: did not start ({e})")
            log(f"skipping {name}: {e}")
    # #15's first lead: the tcp path on balancer's own edge-triggered loop, beside the default.
    if has_flag(bin_path, "--engine") and (wanted is None or "balancer-epoll" in wanted):
        try:
            b = start_balancer(procs, bin_path, tmp, "balancer-epoll", WORKERS, ["--engine", "epoll", *QUIET_HEALTH])
            targets.append(Target("balancer-epoll", f"http://{b.listen}/", lambda b=b: [b.pid] if b.proc.alive() else []))
        except Exception as e:  # an engine that does not start is skipped, not fatal
            out.skipped.append(f"balancer-epoll: did not start ({e})")
            log(f"skipping balancer-epoll: {e}")
    targets = [t for t in targets if wanted is None or t.name in wanted]
    if not no_node:
        targets += start_node_targets(procs, bin_path, tmp, wanted, out)
    for t in list(targets):
        if t.name in NODE_TARGETS:
            continue  # node_cluster.start has seen it answer 200; its body is Node's
        try:
            check_target(t)
        except Exception as e:
            if not t.name.startswith("balancer-"):
                raise RuntimeError(f"{t.name} does not answer GET /: {e}") from e
            out.skipped.append(f"{t.name}: does not answer GET / ({e})")
            targets.remove(t)
    return targets


def one_run(t: Target, load: str, rnd: int, a: argparse.Namespace, procs: ProcessSet, out: Outcome) -> None:
    label, conns, close = LOADS[load]
    quiet = machine.wait_quiet(a.quiet_idle, a.quiet_wait, procs.pids, log)
    for name in {n.split("(")[0] for n, cpus in quiet.foreign if cpus >= FOREIGN_NOTABLE}:
        out.foreign_seen[name] = out.foreign_seen.get(name, 0) + 1
    pids, ours = t.proxy_pids(), procs.pids()
    cpu0, ours0 = machine.total_cpu_seconds(pids), machine.total_cpu_seconds(ours)
    busy0, _ = machine.system_cpu()
    load1 = machine.loadavg()[0]
    started, m0 = time.time(), time.monotonic()
    try:
        res, _ = wrk.run(t.url, conns, WRK_THREADS, a.duration, close)
    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
        out.failures.append(f"round {rnd}, {load}, {t.name}: {e}")
        log(f"run failed: round {rnd} {load} {t.name}: {e}")
        return
    cpu1, ours1 = machine.total_cpu_seconds(pids), machine.total_cpu_seconds(ours)
    busy1, _ = machine.system_cpu()
    wall = time.monotonic() - m0
    foreign = max(0.0, ((busy1 - busy0) / machine.CLK_TCK - res.wrk_cpu - (ours1 - ours0)) / wall)
    run = report.Run(
        round=rnd,
        load=load,
        target=t.name,
        started=started,
        rps=res.rps,
        p50_ms=res.p50_ms,
        p99_ms=res.p99_ms,
        requests=res.requests,
        socket_errors=res.socket_errors,
        non_2xx=res.non_2xx,
        proxy_cpu_s=(cpu1 - cpu0) if pids else None,
        wrk_cpu_s=res.wrk_cpu,
        idle_before=quiet.idle,
        waited_s=quiet.waited,
        foreign_cpus=foreign,
        load1=load1,
    )
    out.runs.append(run)
    cpu = "NA" if run.cpu_us_per_req is None else f"{run.cpu_us_per_req:6.1f}"
    log(
        f"round {rnd} {load:7} {t.name:10} {res.rps:9,.0f} req/s  p50 {res.p50_ms:6.2f} ms  p99 {res.p99_ms:7.2f} ms  "
        f"errors {res.errors:<4} proxy CPU {cpu} µs/req  (idle before {quiet.idle:.0%}, foreign {foreign:.2f} CPUs, load {load1:.1f})"
    )


def throughput(procs: ProcessSet, bin_path: Path, tmp: Path, a: argparse.Namespace, out: Outcome) -> None:
    targets = start_targets(procs, bin_path, tmp, a.targets, a.no_node, out)
    out.targets = [t.name for t in targets]
    log(f"targets: {', '.join(out.targets)}; loads: {', '.join(a.loads)}; {a.rounds} round(s) of {a.duration:g} s")
    for t in targets:
        try:
            wrk.run(t.url, 50, WRK_THREADS, WARMUP_SECONDS, False)
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
            log(f"warm-up of {t.name} failed: {e}")
    for rnd in range(1, a.rounds + 1):
        for load in a.loads:
            for t in targets:
                if t.name in NODE_TARGETS and load not in NODE_LOADS:
                    continue
                one_run(t, load, rnd, a, procs, out)
    # The throughput setup is done: stop it so the next tests run on a quieter box.
    for p in list(reversed(procs.started)):
        procs.stop(p)


def footprint(procs: ProcessSet, bin_path: Path, tmp: Path, a: argparse.Namespace, out: Outcome) -> None:
    """Memory per idle connection and worker replacement time, on a fresh balancer."""
    if a.memory_conns <= 0 and a.respawn_kills <= 0:
        return
    bal = start_balancer(procs, bin_path, tmp, "balancer-footprint", WORKERS, ["--max-conns", str(max(10_000, a.memory_conns))])
    try:
        # Respawn first: the memory test's 10,000 closes leave TIME_WAIT sockets behind, and
        # they slow down reading /proc/net/tcp, which the master's admission check does
        # (see TIME_WAIT_QUIET).
        if a.respawn_kills > 0:
            machine.wait_time_wait(TIME_WAIT_QUIET, TIME_WAIT_MAX_WAIT, log)
            machine.wait_quiet(a.quiet_idle, a.quiet_wait, procs.pids, log)
            out.respawn_time_wait = machine.time_wait_sockets()
            out.respawns = respawn.measure(bal, a.respawn_kills, log)
        if a.memory_conns > 0:
            machine.wait_quiet(a.quiet_idle, a.quiet_wait, procs.pids, log)
            out.memory = memory.measure(bal, a.memory_conns, log)
    finally:
        procs.stop(bal.proc)


# ---------------------------------------------------------------------------------------
# Writing


def write_outputs(a: argparse.Namespace, out: Outcome, meta: dict[str, str], chart_ok: bool) -> None:
    a.out.mkdir(parents=True, exist_ok=True)
    loads = {l: LOADS[l][0] for l in a.loads}
    rows = report.summarize(out.runs, a.loads, [t for t in out.targets if t not in NODE_TARGETS])
    report.write_runs_csv(out.runs, a.out / "bench-runs.csv")
    report.write_rows_csv(rows, a.out / "bench-results.csv")
    chart = a.out / "bench.png"
    if chart_ok and out.runs:
        kind = "quick smoke run" if a.quick else f"{a.rounds} rounds × {a.duration:g} s"
        report.chart(out.runs, rows, loads, [t for t in out.targets if t not in NODE_TARGETS], chart,
                     f"balancer vs nginx vs HAProxy on loopback, 2 built-in workers ({kind}, {meta['date']})")
    (a.out / "bench-results.md").write_text(markdown(a, out, rows, loads, meta, chart_ok and chart.exists()))
    # Only a full run into docs/ updates the README; a quick or redirected run never does.
    if not a.quick and a.out == REPO / "docs" and rows and not a.no_readme:
        readme.splice(REPO / "README.md", README_BLOCK, readme_block(a, out, rows, meta), "### Latest full run")
    log(f"wrote {a.out}/bench-results.md, bench-results.csv, bench-runs.csv" + (", bench.png" if chart_ok else ""))


def markdown(a, out: Outcome, rows, loads, meta, has_chart: bool) -> str:
    s = ["# balancer benchmark results", ""]
    if a.quick:
        s += ["**Quick smoke run** (one short round): it shows the harness works, not how fast anything is.", ""]
    s += [
        f"Made by `{meta['command']}` on {meta['date']}: "
        f"{a.rounds} round(s), each target and load for {a.duration:g} s, interleaved "
        f"(all targets in turn for one load, then the next load; then the next round).",
        "",
        f"- Machine: {meta['machine']}. It is shared and noisy: compare the ratios within this run, not absolute numbers across runs.",
        f"- Versions: balancer {meta['balancer']}; nginx {meta['nginx']}; HAProxy {meta['haproxy']}; wrk {meta['wrk']}; Python {meta['python']}.",
        f"- Setup: {WORKERS} built-in balancer workers (single-threaded hyper servers) on loopback. `direct` is wrk against "
        f"one worker (the ceiling); `balancer` (its proxy mode), nginx (`stream`, round-robin, `worker_processes auto`) and "
        f"HAProxy (`mode tcp`, `balance roundrobin`, `nbthread {WORKERS}`) all proxy to the same two workers; "
        f"`balancer-epoll` is the proxy mode on its own edge-triggered loop (`--engine epoll`), in front of two built-in workers of its own. "
        f"`balancer` and `balancer-epoll` run with `{' '.join(QUIET_HEALTH)}`.",
        f"- Load: wrk, {WRK_THREADS} threads, `--latency`, per load: "
        + "; ".join(f"`{k}` = {v[0]}" + (" (`-H 'Connection: close'`)" if v[2] else "") for k, v in LOADS.items() if k in loads)
        + ".",
        "",
        "## #15's targets in this run",
        "",
        goals.markdown(goals.check(out.runs, rows, a.loads, out.memory, out.respawns)),
        "",
        "Ratios are medians of per-round ratios (below). The http-mode target is measured by "
        "`bench/http_mode.py`, not here.",
        "",
        "## Throughput, latency, proxy CPU",
        "",
        report.markdown_table(rows, {k: f"`{k}`" for k in loads}) if rows else "_no runs completed_",
        "",
        "- req/s, p50, p99, CPU: medians over rounds. errors: wrk socket errors + non-2xx responses, summed over rounds.",
        "- ×nginx, ×HAProxy, ×direct: median over rounds of this target's value divided by the reference's in the same "
        "round (paired, so slow drift of the shared box cancels out). For req/s higher is better; for CPU lower is better.",
        "- CPU µs/req: utime+stime from `/proc/<pid>/stat` of the proxy's processes over the run, divided by the "
        "requests wrk completed. balancer: the master only (not its workers); nginx: master + workers; HAProxy: its "
        "process (all threads). `direct` has no proxy: NA. 10 ms tick resolution.",
        "",
    ]
    if has_chart:
        s += ["![requests/s and proxy CPU per request, per target and load](bench.png)", ""]
    s += ["Raw runs: [bench-runs.csv](bench-runs.csv); this table as CSV: [bench-results.csv](bench-results.csv).", ""]

    s += node_section(out)
    s += ["## Memory per connection (balancer master)", ""]
    m = out.memory
    if m is None:
        s += ["Not measured in this run.", ""]
    else:
        per = m.master_bytes_per_conn
        wper = m.workers_bytes_per_conn
        s += [
            f"A fresh balancer (2 workers); this script opens {m.wanted:,} TCP connections to it and leaves them idle.",
            "",
            "| | value |",
            "|---|---:|",
            f"| client connections opened | {m.opened:,} |",
            f"| proxied (master holds both legs, a worker accepted) | {m.proxied:,} |",
            f"| master VmRSS idle | {m.master_rss_idle_kib / 1024:.1f} MiB |",
            f"| master VmRSS with the connections open | {m.master_rss_loaded_kib / 1024:.1f} MiB |",
            f"| **master memory per proxied connection** | **{per / 1024:.1f} KiB** |" if per is not None else "| master memory per proxied connection | NA |",
            f"| workers' VmRSS (both) idle → loaded | {m.workers_rss_idle_kib / 1024:.1f} → {m.workers_rss_loaded_kib / 1024:.1f} MiB |",
            f"| workers' memory per connection | {wper / 1024:.1f} KiB |" if wper is not None else "| workers' memory per connection | NA |",
            "",
        ]
        if m.note:
            s += [f"Note: {m.note}.", ""]

    s += ["## Worker replacement after `kill -9`", ""]
    if not out.respawns:
        s += ["Not measured in this run.", ""]
    else:
        ready = [r.ready_ms for r in out.respawns]
        s += [
            f"{len(ready)} kills of a worker (alternating slots, each after both workers were ready again). Time from the "
            "kill (this script's clock) to balancer's log line (its own timestamp). TCP sockets in TIME_WAIT on the "
            f"machine when the test began: {out.respawn_time_wait if out.respawn_time_wait is not None else '?'} "
            "(the master's admission check reads `/proc/net/tcp`, so `worker ready` comes later the more sockets "
            "the machine has; see `bench/NOTES.md`).",
            "",
            "| | median | min | max |",
            "|---|---:|---:|---:|",
        ]
        for attr, what in (("noticed_ms", "`worker exited` (noticed)"), ("spawned_ms", "`worker spawned` (replacement started)"),
                           ("ready_ms", "**`worker ready` (replacement in rotation)**")):
            xs = [getattr(r, attr) for r in out.respawns]
            s.append(f"| {what} | {statistics.median(xs):.1f} ms | {min(xs):.1f} ms | {max(xs):.1f} ms |")
        s.append("")

    s += ["## Noise", ""]
    if out.runs:
        idle = [r.idle_before for r in out.runs]
        busy = [r for r in out.runs if r.idle_before < a.quiet_idle]
        foreign = [r.foreign_cpus for r in out.runs]
        s += [
            f"Before each run the script waited (at most {a.quiet_wait:g} s) until at least {a.quiet_idle:.0%} of all CPUs "
            f"were idle over 0.5 s. Idle before runs: median {statistics.median(idle):.0%}, lowest {min(idle):.0%}; "
            f"{len(busy)} of {len(out.runs)} runs started without reaching the threshold. "
            f"Foreign CPU during runs (busy time not from wrk or our processes, in CPUs): median "
            f"{statistics.median(foreign):.2f}, highest {max(foreign):.2f}. Busy time that no live process explains is "
            "listed as `unattributed`: processes of other sessions that this one cannot see, or that came and went.",
            "",
        ]
        loadavg = [r.load1 for r in out.runs]
        s += [f"Load average (1 min) at the start of the runs: median {statistics.median(loadavg):.1f}, lowest "
              f"{min(loadavg):.1f}, highest {max(loadavg):.1f} (2 CPUs; other sessions were compiling).", ""]
        if out.foreign_seen:
            top = sorted(out.foreign_seen.items(), key=lambda kv: -kv[1])[:8]
            s += [f"Using at least {FOREIGN_NOTABLE:.0%} of a CPU just before a run (number of runs): "
                  + ", ".join(f"{k} ({n})" for k, n in top) + ".", ""]
    if out.skipped or out.failures:
        s += ["## Skipped and failed", ""]
        s += [f"- skipped: {x}" for x in out.skipped] + [f"- failed: {x}" for x in out.failures] + [""]
    return "\n".join(s)


def readme_block(a, out: Outcome, rows, meta) -> str:
    """README's figures from this run: #15's targets, the main table, the Node comparison
    and the footprint, with the command, the date and the load average."""
    loadavg = [r.load1 for r in out.runs]
    s = [
        f"Run of {meta['date']}, `{meta['command']}` ({a.rounds} rounds × {a.duration:g} s per target and load, "
        f"interleaved; load average (1 min) at the start of the runs: median {statistics.median(loadavg):.1f}, "
        f"{min(loadavg):.1f}–{max(loadavg):.1f}, on 2 CPUs shared with other builds); balancer "
        f"{meta['balancer']}. Method, noise and every run: [docs/bench-results.md](docs/bench-results.md).",
        "",
        goals.markdown(goals.check(out.runs, rows, a.loads, out.memory, out.respawns)),
        "",
        report.markdown_table(rows, {k: f"`{k}`" for k in a.loads}),
        "",
    ]
    s += node_section(out)[4:]  # the table without the section's heading and prose
    m = out.memory
    if m is not None and m.master_bytes_per_conn is not None:
        s += [f"Master RSS idle {m.master_rss_idle_kib / 1024:.1f} MiB; {m.master_bytes_per_conn / 1024:.1f} KiB per idle "
              f"proxied connection ({m.proxied:,} of {m.wanted:,} proxied).", ""]
    if out.respawns:
        ready = [r.ready_ms for r in out.respawns]
        s += [f"`kill -9` of a worker → replacement in rotation: median {statistics.median(ready):.1f} ms, "
              f"max {max(ready):.1f} ms ({len(ready)} kills).", ""]
    s.append("![requests/s and proxy CPU per request, per target and load](docs/bench.png)")
    return "\n".join(s)


def node_section(out: Outcome) -> list[str]:
    """Node's own cluster primary vs balancer `shared` and `handoff` as the primary of the
    same Node workers, with ratios paired per round."""
    present = [t for t in NODE_TARGETS if any(r.target == t for r in out.runs)]
    if not present:
        return []
    s = [
        "## Node.js cluster: Node's own primary vs balancer",
        "",
        "2 Node hello-world workers (`bench/node/app.js`) behind each: `node-cluster` is Node's own primary "
        "(round-robin), `balancer-shared-node` hands the workers its listening socket (`--mode shared "
        "--node-cluster on`), `balancer-handoff-node` accepts and hands each socket over (`--mode handoff`). "
        "Same rounds as the table above. CPU: the primary only (Node's primary, or balancer's master).",
        "",
        "| load | target | req/s | ×node-cluster | p99 ms | ×node-cluster p99 | primary CPU µs/req | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for load in NODE_LOADS:
        for t in present:
            rs = [r for r in out.runs if r.load == load and r.target == t]
            if not rs:
                continue
            cpus = [r.cpu_us_per_req for r in rs if r.cpu_us_per_req is not None]
            x = goals.paired(out.runs, load, t, "node-cluster")
            xp = goals.paired(out.runs, load, t, "node-cluster", "p99_ms")
            s.append(
                f"| `{load}` | {t} | {statistics.median(r.rps for r in rs):,.0f} | "
                f"{'1×' if t == 'node-cluster' else ('—' if x is None else f'{x:.2f}×')} | "
                f"{statistics.median(r.p99_ms for r in rs):.2f} | "
                f"{'1×' if t == 'node-cluster' else ('—' if xp is None else f'{xp:.2f}×')} | "
                f"{statistics.median(cpus) if cpus else float('nan'):.1f} | {sum(r.socket_errors + r.non_2xx for r in rs)} |"
            )
    return s + [""]


# ---------------------------------------------------------------------------------------


def _interrupt(signum: int, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python then keeps it so.
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _interrupt)
    procs = ProcessSet(log)
    tmp = Path(tempfile.mkdtemp(prefix="balancer-bench-"))
    ok = False
    try:
        prepare.ensure_tools(a.no_install)
        bin_path = a.binary or (prepare.binary() if a.no_build else prepare.build())
        chart_ok = prepare.ensure_matplotlib()
        hard = prepare.raise_fd_limit()
        log(f"open-file limit {hard}; logs in {tmp}")
        meta = prepare.versions(bin_path) | {
            "machine": prepare.machine_summary(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["python3", f"bench/{Path(__file__).name}", *argv]),
        }
        out = Outcome()
        # Footprint first, on a box this script has not yet filled with TIME_WAIT sockets.
        footprint(procs, bin_path, tmp, a, out)
        throughput(procs, bin_path, tmp, a, out)
        write_outputs(a, out, meta, chart_ok)
        ok = not out.failures
        return 0 if ok else 1
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'Ctrl-C'}); stopping everything")
        return 130
    finally:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        procs.stop_all()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"process logs kept in {tmp}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
