"""The benchmark's output: the Markdown table, the JSON summary and the plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Ratio",
    "Row",
    "binned_rate",
    "fmt_count",
    "fmt_mb",
    "fmt_ms",
    "fmt_rate",
    "fmt_ratio",
    "markdown",
    "percentile",
    "plot",
    "ratio_text",
    "rows_as_json",
]


@dataclass(frozen=True, slots=True)
class Row:
    figure: str
    relay: str
    baseline: str = "-"
    limit: str = "-"
    ratio: str = "-"
    target: str = "-"
    verdict: str = ""


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (``q`` in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def binned_rate(arrivals_ns: Sequence[int], width: float) -> tuple[list[float], list[float]]:
    """Arrivals per second in bins of ``width`` seconds, from the first arrival."""
    if not arrivals_ns:
        return [], []
    start = arrivals_ns[0]
    counts: dict[int, int] = {}
    for t in arrivals_ns:
        index = int((t - start) / 1e9 / width)
        counts[index] = counts.get(index, 0) + 1
    last = max(counts)
    xs = [i * width for i in range(last + 1)]
    ys = [counts.get(i, 0) / width for i in range(last + 1)]
    return xs, ys


def fmt_count(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.0f}"


def fmt_rate(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.0f}/s"


def fmt_ms(value_ns: float | None) -> str:
    if value_ns is None or math.isnan(value_ns):
        return "-"
    ms = value_ns / 1e6
    return f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms"


def fmt_mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MB"


def fmt_ratio(a: float | None, b: float | None, of: str) -> str:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return "-"
    return f"{a / b:.2f}x {of}"


@dataclass(frozen=True, slots=True)
class Ratio:
    """One figure against the naive baseline's and against wrk's limit, as plain ratios."""

    figure: str
    relay: str
    vs_naive: str = "-"
    vs_limit: str = "-"


def ratio_text(a: float | None, b: float | None) -> str:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return "-"
    return f"{a / b:.2f}x"


def markdown(
    title: str,
    header_lines: Sequence[str],
    rows: Sequence[Row],
    notes: Sequence[str],
    ratios: Sequence[Ratio] = (),
) -> str:
    lines = [f"# {title}", ""]
    lines += list(header_lines)
    lines += [
        "",
        "| figure | sfox-relay | baseline (naive) | limit | ratio | target | verdict |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        cells = (r.figure, r.relay, r.baseline, r.limit, r.ratio, r.target, r.verdict)
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    if ratios:
        lines += [
            "",
            "Every figure against the naive baseline and against wrk's limit (same run):",
            "",
            "| figure | sfox-relay | / naive | / wrk limit |",
            "|---|---:|---:|---:|",
        ]
        for q in ratios:
            ratio_cells = (q.figure, q.relay, q.vs_naive, q.vs_limit)
            lines.append("| " + " | ".join(c.replace("|", "/") for c in ratio_cells) + " |")
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def rows_as_json(rows: Sequence[Row]) -> list[dict[str, str]]:
    return [asdict(r) for r in rows]


def plot(path: Path, series: dict[str, Any]) -> str | None:
    """Latency percentiles, latency over time and throughput over time in one PNG.

    Returns why the plot was skipped, or None when it was written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"

    if not any(series.get(key) for key in ("latency", "throughput")):
        return "no latency or throughput series measured: no plot"
    fig, (ax_pct, ax_lat, ax_rate) = plt.subplots(1, 3, figsize=(17, 5))
    latency: dict[str, list[int]] = series.get("latency", {})
    names = ("p50", "p95", "p99", "max")
    qs = (50.0, 95.0, 99.0, 100.0)
    width = 0.38
    for offset, (who, values) in enumerate(latency.items()):
        ordered = sorted(values)
        if not ordered:
            continue
        heights = [percentile(ordered, q) / 1e6 for q in qs]
        xs = [i + (offset - 0.5) * width for i in range(len(names))]
        bars = ax_pct.bar(xs, heights, width, label=who)
        ax_pct.bar_label(bars, fmt="%.1f", fontsize=8)
    ax_pct.set_xticks(range(len(names)), names)
    ax_pct.set_yscale("log")
    ax_pct.set_ylabel("ms (log)")
    ax_pct.set_title("Feed-to-endpoint latency at 200 events/s")
    _legend(ax_pct)

    for who, arrivals in series.get("latency_arrivals", {}).items():
        values = latency.get(who, [])
        if not arrivals or len(arrivals) != len(values):
            continue
        start = arrivals[0]
        buckets: dict[int, list[int]] = {}
        for t, v in zip(arrivals, values, strict=True):
            buckets.setdefault(int((t - start) / 1e9), []).append(v)
        seconds = sorted(buckets)
        p99 = [percentile(sorted(buckets[x]), 99) / 1e6 for x in seconds]
        p50 = [percentile(sorted(buckets[x]), 50) / 1e6 for x in seconds]
        (line,) = ax_lat.plot(seconds, p99, label=f"{who} p99")
        ax_lat.plot(seconds, p50, linestyle="--", color=line.get_color(), label=f"{who} p50")
    ax_lat.set_yscale("log")
    ax_lat.set_xlabel("s")
    ax_lat.set_ylabel("ms per 1 s window (log)")
    ax_lat.set_title("Latency over time at 200 events/s")
    _legend(ax_lat)

    for who, arrivals in series.get("throughput", {}).items():
        xs, ys = binned_rate(arrivals, 0.25)
        ax_rate.plot(xs, ys, label=who)
    limit = series.get("wrk_limit")
    if limit:
        ax_rate.axhline(limit, color="grey", linestyle=":", label="wrk limit")
    ax_rate.set_xlabel("s since first delivery")
    ax_rate.set_ylabel("deliveries/s (0.25 s bins)")
    ax_rate.set_title("Throughput over time")
    _legend(ax_rate)

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
