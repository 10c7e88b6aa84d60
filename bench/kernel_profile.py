#!/usr/bin/env python3
"""Where a proxy's CPU goes (#15's "why the rest of the gap is in the kernel, with a profile"):
balancer (any flags) and nginx `stream` in front of the same two built-in workers, each
sampled with `perf record -e cpu-clock` (all its threads) under the same wrk load, and the
samples grouped into kernel and user-space parts, side by side.

    python3 bench/kernel_profile.py                                  # --engine epoll vs tokio vs nginx, close50
    python3 bench/kernel_profile.py --load ka50 --seconds 8
    python3 bench/kernel_profile.py --bin "epoll=target/release/balancer --engine epoll"

Shares are of each proxy's own samples, so they do not depend on how busy the box is the way
req/s does. Every process it starts is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import wrk  # noqa: E402
from prepare import REPO, log  # noqa: E402
from processes import ProcessSet  # noqa: E402
from targets import start_balancer, start_nginx  # noqa: E402

#: name -> (connections, new connection per request)
LOADS = {"close50": (50, True), "ka50": (50, False), "ka200": (200, False)}
#: perf's sampling frequency: enough samples in a few seconds, little overhead.
FREQUENCY = 1999
#: How long `perf report` may take on one profile.
REPORT_TIMEOUT = 300
#: Symbol groups, first match wins: (group, regex over the symbol or its DSO).
GROUPS: list[tuple[str, str]] = [
    ("netfilter/conntrack", r"nf_|ipt_|ip6t_|conntrack|iptable|nft_"),
    ("locks/irq restore", r"_raw_spin|spin_lock|spin_unlock|queued_spin|pv_|irq_restore|irqrestore|_nolock"),
    ("scheduler/switch", r"schedule|finish_task_switch|__switch_to|pick_next|enqueue_|dequeue_|try_to_wake_up|ttwu|update_curr|select_task_rq|sched_|psi_|__wake_up"),
    ("epoll", r"ep_|epoll"),
    ("slab/page alloc", r"kmem_cache|kmalloc|kfree|__slab|slab_|___slab|page_|alloc_pages|free_pages|memcg|refill_obj"),
    ("syscall entry/exit", r"entry_SYSCALL|do_syscall|syscall_exit|syscall_return|__x64_sys_|exit_to_user|fpregs|restore_fpregs"),
    ("TCP/IP/socket/skb", r"tcp|inet|ip_|ipv4|ipv6|ip6_|sock|skb|__dev_|dev_|net_|netif|napi|loopback|__sys_|sk_|dst_|raw_|csum|fib_|neigh|__inet|release_sock|lock_sock"),
    ("other kernel", r"\[kernel|\[k\]"),
]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", action="append", help='NAME=BINARY [FLAGS...] (repeatable; default: epoll and tokio engines of target/release/balancer)')
    p.add_argument("--load", choices=sorted(LOADS), default="close50")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds of load per proxy (default 8)")
    p.add_argument("--no-nginx", action="store_true")
    p.add_argument("--out", type=Path, help="directory for perf.data files (default: a temporary one)")
    return p.parse_args(argv)


def group_of(symbol: str, dso: str) -> str:
    """The group a sample's symbol belongs to: kernel parts by name, user space by DSO."""
    kernel = dso.startswith("[kernel") or dso == "[unknown]" and symbol.startswith("0xffff")
    if kernel:
        for name, pattern in GROUPS:
            if re.search(pattern, symbol):
                return name
        return "other kernel"
    if "libc" in dso:
        return "libc"
    return "user space (the proxy's own code)"


def parse_report(text: str) -> dict[str, float]:
    """Percent per group from `perf report --stdio --sort dso,sym` lines like
    `    12.34%  [kernel.kallsyms]  [k] tcp_sendmsg`."""
    shares: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[[.kKuU]\]\s+(.+?)\s*$", line)
        if not m:
            continue
        pct, dso, sym = float(m[1]), m[2], m[3]
        g = group_of(sym, dso)
        shares[g] = shares.get(g, 0.0) + pct
    return shares


def profile(name: str, pids: list[int], url: str, load: str, seconds: float, out: Path) -> dict[str, float]:
    conns, close = LOADS[load]
    data = out / f"perf-{name}.data"
    perf = subprocess.Popen(
        ["perf", "record", "-q", "-F", str(FREQUENCY), "-e", "cpu-clock", "-o", str(data), "-p", ",".join(map(str, pids))],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        time.sleep(0.3)  # perf attaches before the load starts; the load's own length bounds the profile
        res, _ = wrk.run(url, conns, 2, seconds, close)
    finally:
        perf.send_signal(2)
        perf.wait(timeout=60)
    log(f"{name}: {res.rps:,.0f} req/s during the profile")
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "dso,sym", "--percent-limit", "0"],
        capture_output=True, text=True, timeout=REPORT_TIMEOUT,
    )
    return parse_report(report.stdout)


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    binary = REPO / "target/release/balancer"
    bins = a.bin or [f"epoll={binary} --engine epoll", f"tokio={binary}"]
    out = a.out or Path(tempfile.mkdtemp(prefix="balancer-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    procs = ProcessSet(log)
    results: dict[str, dict[str, float]] = {}
    try:
        first = None
        for spec in bins:
            name, _, cmd = spec.partition("=")
            argv_ = shlex.split(cmd)
            bal = start_balancer(procs, Path(argv_[0]), out, f"balancer-{name}", 2, [*argv_[1:], "--health-interval", "60s"])
            first = first or bal
            results[name] = profile(name, [bal.pid], f"http://{bal.listen}/", a.load, a.seconds, out)
        if not a.no_nginx and first is not None:
            backends = [addr for _, (_, addr) in sorted(first.ready_workers().items())]
            ng = start_nginx(procs, out, backends)
            results["nginx"] = profile("nginx", ng.proxy_pids(), ng.url, a.load, a.seconds, out)
    finally:
        procs.stop_all()
    groups = sorted({g for r in results.values() for g in r}, key=lambda g: -max(r.get(g, 0) for r in results.values()))
    print(f"\nshare of each proxy's own samples, {a.load} (perf record -F {FREQUENCY} -e cpu-clock)\n")
    print("| part | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for g in groups:
        print(f"| {g} | " + " | ".join(f"{r.get(g, 0):.1f} %" for r in results.values()) + " |")
    kernel = {n: sum(v for g, v in r.items() if not g.startswith(("user space", "libc"))) for n, r in results.items()}
    print("| **kernel, all parts** | " + " | ".join(f"**{v:.1f} %**" for v in kernel.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
