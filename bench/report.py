"""From runs to outputs: medians and paired ratios per (load, target), the Markdown table,
the CSV files and the chart."""

from __future__ import annotations

import csv
import statistics
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

#: Targets the ratio columns compare against, with their column titles.
REFERENCES = (("nginx", "×nginx"), ("haproxy", "×HAProxy"), ("direct", "×direct"))


@dataclass
class Run:
    """One wrk run against one target."""

    round: int
    load: str
    target: str
    #: Unix time the run started.
    started: float
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    socket_errors: int
    non_2xx: int
    #: CPU seconds of the proxy's processes during the run; None for the direct target.
    proxy_cpu_s: float | None
    #: CPU seconds of wrk itself.
    wrk_cpu_s: float
    #: Share of all CPUs idle in the half second before the run.
    idle_before: float
    #: Seconds spent waiting for quiet before the run.
    waited_s: float
    #: CPUs' worth of busy time during the run that was neither wrk nor a process we
    #: started (other users; loopback softirq work may show up here too).
    foreign_cpus: float
    #: 1-minute load average when the run started.
    load1: float = 0.0

    @property
    def cpu_us_per_req(self) -> float | None:
        if self.proxy_cpu_s is None or self.requests == 0:
            return None
        return self.proxy_cpu_s * 1e6 / self.requests


@dataclass
class Row:
    """Medians over rounds for one (load, target)."""

    load: str
    target: str
    rounds: int
    rps: float
    p50_ms: float
    p99_ms: float
    #: Socket errors plus non-2xx responses, summed over all rounds.
    errors: int
    cpu_us_per_req: float | None
    #: Reference target -> median over rounds of (this rps / reference rps in the same round).
    rps_ratio: dict[str, float | None]
    #: Reference target -> median over rounds of (this CPU/request / reference CPU/request).
    cpu_ratio: dict[str, float | None]


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _paired_ratio(mine: dict[int, float | None], ref: dict[int, float | None]) -> float | None:
    """Median over rounds of mine/ref, using only rounds where both ran: runs of one round are
    minutes apart at most, so the box's drift cancels out better than in a ratio of medians."""
    return _median([mine[r] / ref[r] for r in mine if mine[r] and ref.get(r)])


def summarize(runs: list[Run], loads: list[str], targets: list[str]) -> list[Row]:
    rows = []
    for load in loads:
        by_target = {t: [r for r in runs if r.load == load and r.target == t] for t in targets}
        rps = {t: {r.round: r.rps for r in rs} for t, rs in by_target.items()}
        cpu = {t: {r.round: r.cpu_us_per_req for r in rs} for t, rs in by_target.items()}
        for t, rs in by_target.items():
            if not rs:
                continue
            cpus = [r.cpu_us_per_req for r in rs if r.cpu_us_per_req is not None]
            rows.append(
                Row(
                    load=load,
                    target=t,
                    rounds=len(rs),
                    rps=statistics.median(r.rps for r in rs),
                    p50_ms=statistics.median(r.p50_ms for r in rs),
                    p99_ms=statistics.median(r.p99_ms for r in rs),
                    errors=sum(r.socket_errors + r.non_2xx for r in rs),
                    cpu_us_per_req=_median(cpus),
                    rps_ratio={ref: _paired_ratio(rps[t], rps.get(ref, {})) for ref, _ in REFERENCES},
                    cpu_ratio={ref: _paired_ratio(cpu[t], cpu.get(ref, {})) for ref, _ in REFERENCES[:2]},
                )
            )
    return rows


# ---------------------------------------------------------------------------------------
# Files


def write_runs_csv(runs: list[Run], path: Path) -> None:
    names = [f.name for f in fields(Run)] + ["cpu_us_per_req"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        for r in runs:
            d = asdict(r) | {"cpu_us_per_req": r.cpu_us_per_req}
            w.writerow([_csv(d[n]) for n in names])


def write_rows_csv(rows: list[Row], path: Path) -> None:
    names = ["load", "target", "rounds", "rps", "p50_ms", "p99_ms", "errors", "cpu_us_per_req"]
    names += [f"rps_x_{ref}" for ref, _ in REFERENCES] + [f"cpu_x_{ref}" for ref, _ in REFERENCES[:2]]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        for r in rows:
            values = [r.load, r.target, r.rounds, r.rps, r.p50_ms, r.p99_ms, r.errors, r.cpu_us_per_req]
            values += [r.rps_ratio[ref] for ref, _ in REFERENCES] + [r.cpu_ratio[ref] for ref, _ in REFERENCES[:2]]
            w.writerow([_csv(v) for v in values])


def _csv(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"
    return v


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _num(v: float | None, digits: int = 1) -> str:
    return "NA" if v is None else f"{v:,.{digits}f}"


def markdown_table(rows: list[Row], loads: dict[str, str]) -> str:
    head = ["load", "target", "req/s", *(t for _, t in REFERENCES), "p50 ms", "p99 ms", "errors",
            "CPU µs/req", "CPU ×nginx", "CPU ×HAProxy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in rows:
        cells = [loads.get(r.load, r.load), f"**{r.target}**" if r.target.startswith("balancer") else r.target,
                 _num(r.rps, 0)]
        cells += [_x(r.rps_ratio[ref]) if ref != r.target else "1×" for ref, _ in REFERENCES]
        cells += [_num(r.p50_ms, 2), _num(r.p99_ms, 2), str(r.errors), _num(r.cpu_us_per_req, 1)]
        cells += [_x(r.cpu_ratio[ref]) if ref != r.target else "1×" for ref, _ in REFERENCES[:2]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(runs: list[Run], rows: list[Row], loads: dict[str, str], targets: list[str], path: Path, title: str) -> None:
    """Requests/s and proxy CPU µs/request per target, one column per load; bars are medians,
    whiskers the lowest and highest round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colours = {"direct": "#9e9e9e", "balancer": "#d62728", "nginx": "#2ca02c", "haproxy": "#1f77b4"}
    fig, axes = plt.subplots(2, len(loads), figsize=(4.2 * len(loads), 7.5), squeeze=False)
    for col, (load, label) in enumerate(loads.items()):
        for row, (metric, ylabel) in enumerate((("rps", "requests/s"), ("cpu_us_per_req", "proxy CPU µs / request"))):
            ax = axes[row][col]
            names, meds, lo, hi, cols = [], [], [], [], []
            for t in targets:
                vals = [getattr(r, metric) for r in runs if r.load == load and r.target == t]
                vals = [v for v in vals if v is not None]
                if not vals:
                    continue
                med = statistics.median(vals)
                names.append(t)
                meds.append(med)
                lo.append(med - min(vals))
                hi.append(max(vals) - med)
                cols.append(colours.get(t, "#ff7f0e"))
            ax.bar(range(len(names)), meds, yerr=[lo, hi], color=cols, capsize=3)
            ax.set_xticks(range(len(names)), names, rotation=20)
            ax.set_ylabel(ylabel)
            ax.grid(axis="y", alpha=0.3)
            if row == 0:
                ax.set_title(label, fontsize=10)
            if metric == "rps":
                ax.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
            for i, v in enumerate(meds):
                # Above the whisker, so the label never sits on it.
                ax.annotate(f"{v:,.0f}" if metric == "rps" else f"{v:.1f}", (i, v + hi[i]), ha="center",
                            va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
            ax.margins(y=0.12)
    fig.suptitle(f"{title}\nbars: median over rounds; whiskers: lowest and highest round", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
