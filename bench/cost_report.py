"""From the cost curve's runs to its outputs: medians per (target, level), ratios to nginx
paired per round, the CSV, the Markdown page, the README block and the chart."""

from __future__ import annotations

import csv
import statistics
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import readme

#: The target the ratio columns compare against.
REFERENCE = "nginx"
#: The name of cost_curve.py's block in README.md (see readme.py).
README_BLOCK = "cost-curve"
COLOURS = {"balancer-proxy": "#d62728", "balancer-handoff": "#ff7f0e", "nginx": "#2ca02c", "haproxy": "#1f77b4"}


@dataclass
class Point:
    """One wrk run: one target at one number of connections."""

    round: int
    conns: int
    target: str
    #: Unix time the run started.
    started: float
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    #: wrk's socket errors, by kind: connects that failed, and requests with no answer in 5 s.
    connect_errors: int
    timeouts: int
    #: Read and write errors and non-2xx answers.
    other_errors: int
    #: utime+stime of the proxy's processes over the run (balancer: the master only).
    proxy_cpu_s: float
    #: utime+stime of the workers that answered.
    workers_cpu_s: float
    wrk_cpu_s: float
    #: The proxy's VmRSS (summed over its processes) just before the run, the median of the
    #: samples taken during it, and the highest sample.
    rss_idle_kib: int
    rss_median_kib: int
    rss_peak_kib: int
    #: Most connections the workers held at once (their open fds above idle).
    reached: int
    #: Most client connections `ss` saw established to the proxy's port at once.
    established: int
    #: Seconds from the start of the run until the workers held 99% of the connections; None
    #: if they never did.
    ramp_s: float | None
    #: Connects dropped machine-wide during the run because a listen queue was full.
    listen_overflows: int | None
    #: 1-minute load average when the run started.
    load1: float
    #: Share of all CPUs idle in the half second before the run.
    idle_before: float

    @property
    def cpu_us_per_req(self) -> float:
        return self.proxy_cpu_s * 1e6 / max(1, self.requests)

    @property
    def stack_us_per_req(self) -> float:
        """Proxy plus workers: what the whole path costs, which is fair to `handoff` (its
        master steps out and its workers do the reading)."""
        return (self.proxy_cpu_s + self.workers_cpu_s) * 1e6 / max(1, self.requests)


@dataclass
class Row:
    """Medians over rounds for one (target, level); errors summed, peak and reach the worst."""

    target: str
    conns: int
    rounds: int
    rps: float
    p99_ms: float
    cpu_us_per_req: float
    stack_us_per_req: float
    rss_mib: float
    rss_peak_mib: float
    #: The fewest connections that reached the workers in any round.
    reached: int
    #: The slowest ramp of any round (seconds until 99% of the connections reached the
    #: workers); None if some round never got there.
    ramp_s: float | None
    connect_errors: int
    timeouts: int
    other_errors: int
    #: Median over rounds of this / nginx in the same round; None for nginx itself.
    rps_x_nginx: float | None
    cpu_x_nginx: float | None


def _paired(mine: dict[int, float], ref: dict[int, float]) -> float | None:
    xs = [mine[r] / ref[r] for r in mine if r in ref and ref[r] > 0]
    return statistics.median(xs) if xs else None


def summarize(points: list[Point], targets: list[str], levels: list[int]) -> list[Row]:
    rows = []
    for conns in levels:
        at = [p for p in points if p.conns == conns]
        ref = [p for p in at if p.target == REFERENCE]
        ref_rps = {p.round: p.rps for p in ref}
        ref_cpu = {p.round: p.cpu_us_per_req for p in ref}
        for t in targets:
            ps = [p for p in at if p.target == t]
            if not ps:
                continue
            other = t != REFERENCE
            rows.append(
                Row(
                    target=t,
                    conns=conns,
                    rounds=len(ps),
                    rps=statistics.median(p.rps for p in ps),
                    p99_ms=statistics.median(p.p99_ms for p in ps),
                    cpu_us_per_req=statistics.median(p.cpu_us_per_req for p in ps),
                    stack_us_per_req=statistics.median(p.stack_us_per_req for p in ps),
                    rss_mib=statistics.median(p.rss_median_kib for p in ps) / 1024,
                    rss_peak_mib=max(p.rss_peak_kib for p in ps) / 1024,
                    # A worker's other fds (an eventfd, a log pipe reopened) can add one or two.
                    reached=min(min(p.reached, p.conns) for p in ps),
                    ramp_s=None if any(p.ramp_s is None for p in ps) else max(p.ramp_s for p in ps),
                    connect_errors=sum(p.connect_errors for p in ps),
                    timeouts=sum(p.timeouts for p in ps),
                    other_errors=sum(p.other_errors for p in ps),
                    rps_x_nginx=_paired({p.round: p.rps for p in ps}, ref_rps) if other else None,
                    cpu_x_nginx=_paired({p.round: p.cpu_us_per_req for p in ps}, ref_cpu) if other else None,
                )
            )
    return rows


def _x(v: float | None) -> str:
    return "1×" if v is None else f"{v:.2f}×"


def _ramp(v: float | None) -> str:
    return "never" if v is None else f"{v:.1f} s"


def table(rows: list[Row]) -> str:
    head = ["conns", "target", "req/s", "×nginx", "p99 ms", "proxy CPU µs/req", "CPU ×nginx",
            "proxy+workers µs/req", "RSS MiB", "RSS peak MiB", "reached workers", "all reached after", "connect errors", "timeouts"]
    out = ["| " + " | ".join(head) + " |", "|---:|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        name = f"**{r.target}**" if r.target.startswith("balancer") else r.target
        cells = [f"{r.conns:,}", name, f"{r.rps:,.0f}", _x(r.rps_x_nginx), f"{r.p99_ms:.2f}",
                 f"{r.cpu_us_per_req:.1f}", _x(r.cpu_x_nginx), f"{r.stack_us_per_req:.1f}", f"{r.rss_mib:.1f}",
                 f"{r.rss_peak_mib:.1f}", f"{r.reached:,}", _ramp(r.ramp_s), str(r.connect_errors), str(r.timeouts)]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)



def load_line(series) -> str:
    loads = [p.load1 for p in series.points]
    if not loads:
        return ""
    return (f"load average (1 min) at the start of the runs: median {statistics.median(loads):.1f}, "
            f"{min(loads):.1f}–{max(loads):.1f}; at the start and end of the series "
            f"{series.load_start[0]:.1f} and {series.load_end[0]:.1f} (2 CPUs).")


def markdown(a, series, rows: list[Row], meta: dict[str, str], has_chart: bool) -> str:
    s = ["# The cost curve: cost per request as connections grow", ""]
    if a.quick:
        s += ["**Quick smoke run**: it shows the harness works, not how fast anything is.", ""]
    s += [
        f"Made by `{meta['command']}` on {meta['date']}: {a.rounds} round(s), each target and level for "
        f"{a.duration:g} s, interleaved (per level every target in turn, the order rotating; then the next level; "
        "then the next round). Every round starts fresh processes (an allocator keeps what 10,000 connections "
        "needed), and its levels go up, so a level's memory includes only what the smaller ones left.",
        "",
        f"- Machine: {meta['machine']}, shared with other builds: compare within this run; {load_line(series)}",
        f"- Versions: balancer {meta['balancer']}; nginx {meta['nginx']}; HAProxy {meta['haproxy']}; wrk {meta['wrk']}.",
        "- Setup: 2 built-in workers behind balancer `proxy`, nginx `stream` and HAProxy `mode tcp` (the same two); "
        "balancer `handoff` with 2 built-in workers of its own. wrk, 2 threads, keep-alive, `--latency`, 5 s request timeout.",
        f"- Open files: {meta['nofile']} per process, soft and hard (here root lacks `CAP_SYS_RESOURCE`, so the hard "
        "limit cannot be raised). A proxy that holds both legs in one process (balancer `proxy`, HAProxy) "
        "needs 2 fds per connection and so cannot hold 10,000; nginx spreads them over 2 worker processes; "
        "`handoff` holds none.",
        "",
        table(rows) if rows else "_no runs completed_",
        "",
        "- req/s, p99, CPU, RSS: medians over rounds; RSS peak: the highest sample of any round; reached "
        "workers: the fewest connections the workers held at once in any round (their open fds above idle, "
        "sampled every 0.25 s); all reached after: the slowest round's time from wrk's start until the workers "
        "held 99% of the connections (0.3 s is the first sample; \"never\" if some round did not get there); connect errors and timeouts: "
        "wrk's, summed over rounds.",
        "- Runs last the duration above, but at least 1 s per 1,000 connections (10 s at 10,000): connects "
        "that overflow a listen queue (4096 for every proxy here, nginx given `backlog=4096`) are retried by the "
        "kernel after 1, 3, 7 s, and a short run would measure that ramp more than the load. req/s counts the "
        "whole run, ramp included.",
        "- proxy CPU µs/req: utime+stime from `/proc/<pid>/stat` of the proxy over the run divided by the requests "
        "wrk completed; balancer: the master only; nginx: master + workers; HAProxy: its process. "
        "proxy+workers adds the two built-in workers, the fair figure for `handoff`, whose master steps out of "
        "the data path.",
        "- RSS: VmRSS of the proxy's processes (nginx: the sum over its master and workers, so shared pages count "
        "twice), sampled every 0.25 s during the run.",
        "- ×nginx: median over rounds of the ratio to nginx in the same round and level.",
        "",
    ]
    if has_chart:
        s += ["![cost per request as connections grow](cost-curve.png)", ""]
    s += ["Every run: [cost-curve.csv](cost-curve.csv).", ""]
    if series.failures:
        s += ["## Failed runs", ""] + [f"- {f}" for f in series.failures] + [""]
    return "\n".join(s)


def readme_block(a, series, rows: list[Row], meta: dict[str, str]) -> str:
    """The compact table for README.md: one line per level and target."""
    head = ["conns", "target", "req/s", "×nginx", "p99 ms", "proxy CPU µs/req", "CPU ×nginx", "RSS MiB (peak)", "reached", "all reached after", "connect err."]
    out = [
        f"Run of {meta['date']}, `{meta['command']}` ({a.rounds} rounds × {a.duration:g} s, interleaved; "
        f"{load_line(series)} Full table and method: [docs/cost-curve.md](docs/cost-curve.md).",
        "",
        "| " + " | ".join(head) + " |",
        "|---:|---|" + "---:|" * (len(head) - 2),
    ]
    for r in rows:
        name = f"**{r.target}**" if r.target.startswith("balancer") else r.target
        out.append("| " + " | ".join([
            f"{r.conns:,}", name, f"{r.rps:,.0f}", _x(r.rps_x_nginx), f"{r.p99_ms:.2f}", f"{r.cpu_us_per_req:.1f}",
            _x(r.cpu_x_nginx), f"{r.rss_mib:.1f} ({r.rss_peak_mib:.1f})", f"{r.reached:,}", _ramp(r.ramp_s), str(r.connect_errors),
        ]) + " |")
    out += ["", "![cost per request as connections grow](docs/cost-curve.png)"]
    return "\n".join(out)


def write_csv(points: list[Point], path: Path) -> None:
    names = [f.name for f in fields(Point)] + ["cpu_us_per_req", "stack_us_per_req"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        for p in points:
            d = asdict(p) | {"cpu_us_per_req": p.cpu_us_per_req, "stack_us_per_req": p.stack_us_per_req}
            w.writerow([f"{d[n]:.4g}" if isinstance(d[n], float) and abs(d[n]) < 1e6 and n != "started" else d[n] for n in names])


def chart(points: list[Point], targets: list[str], levels: list[int], path: Path, title: str) -> None:
    """Four panels against the number of connections (log scale): req/s, proxy CPU per
    request, p99 and RSS. Lines join the medians; whiskers span the lowest and highest round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = (
        ("rps", "requests/s", False, lambda p: p.rps),
        ("cpu", "proxy CPU µs / request", False, lambda p: p.cpu_us_per_req),
        ("p99", "p99 latency, ms (log)", True, lambda p: p.p99_ms),
        ("rss", "proxy RSS, MiB (dotted: peak)", False, lambda p: p.rss_median_kib / 1024),
    )
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, label, logy, value) in zip(axes.flat, panels):
        for t in targets:
            xs, med, lo, hi, peak = [], [], [], [], []
            for n in levels:
                vals = [value(p) for p in points if p.target == t and p.conns == n]
                if not vals:
                    continue
                m = statistics.median(vals)
                xs.append(n)
                med.append(m)
                lo.append(m - min(vals))
                hi.append(max(vals) - m)
                peak.append(max(p.rss_peak_kib for p in points if p.target == t and p.conns == n) / 1024)
            if not xs:
                continue
            colour = COLOURS.get(t, "#7f7f7f")
            ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, color=colour, label=t)
            if key == "rss":
                ax.plot(xs, peak, linestyle=":", color=colour)
        ax.set_xscale("log")
        ax.set_xticks(levels, [f"{n:,}" for n in levels])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if logy:
            ax.set_yscale("log")
        elif key == "rps":
            ax.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
        ax.set_ylim(bottom=None if logy else 0)
        ax.set_xlabel("concurrent keep-alive connections")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=9)
    fig.suptitle(f"{title}\npoints: median over rounds; whiskers: lowest and highest round", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(a, series, targets: list[str], meta: dict[str, str], chart_ok: bool) -> None:
    from prepare import REPO, log

    a.out.mkdir(parents=True, exist_ok=True)
    rows = summarize(series.points, targets, a.levels)
    write_csv(series.points, a.out / "cost-curve.csv")
    png = a.out / "cost-curve.png"
    if chart_ok and series.points:
        kind = "quick smoke run" if a.quick else f"{a.rounds} rounds × {a.duration:g} s"
        chart(series.points, targets, a.levels, png, f"cost as keep-alive connections grow, 2 built-in workers, loopback ({kind}, {meta['date']})")
    (a.out / "cost-curve.md").write_text(markdown(a, series, rows, meta, chart_ok and png.exists()))
    if a.readme and rows:
        readme.splice(REPO / "README.md", README_BLOCK, readme_block(a, series, rows, meta), "### The cost curve")
    log(f"wrote {a.out}/cost-curve.md, cost-curve.csv" + (", cost-curve.png" if png.exists() else "") + (" and README.md" if a.readme else ""))
