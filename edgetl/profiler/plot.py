"""Pictures: bytes saved for backward per trained unit (bar chart), and live bytes over a step (timeline)."""

from __future__ import annotations

import os

from edgetl.errors import EdgetlError
from edgetl.profiler.estimate import StepPeakEstimate
from edgetl.profiler.render import format_reduction
from edgetl.profiler.report import MemoryReport, MemoryRow
from edgetl.profiler.timeline import PHASES, StepTimeline


def _short_label(r: MemoryRow) -> str:
    if r.role == "head":
        return "head"
    if r.block_index is not None:
        return f"IRB {r.block_index}\nt{r.expand_ratio:g} s{r.stride}" + (" SE" if r.se else "")
    return "stem" if r.index == 0 else "final conv"


def plot_report(report: MemoryReport, path: str | os.PathLike) -> None:
    """Write a PNG bar chart: bytes saved for backward per trained unit, vanilla against MobileTL.

    Needs matplotlib (``pip install 'edgetl[plot]'``); uses the Agg backend, no display.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise EdgetlError("plotting needs matplotlib: pip install 'edgetl[plot]'") from None

    rows = [r for r in report.rows if r.trains]
    labels = [_short_label(r) for r in rows]
    mib = 2**20
    van = [r.measured["vanilla"] / mib for r in rows]
    mob = [r.measured["mobiletl"] / mib for r in rows]
    fig = Figure(figsize=(min(16.0, max(7.0, 0.55 * len(rows) + 3.0)), 5.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(rows)))
    ax.bar([x - 0.2 for x in xs], van, width=0.4, label="vanilla (FT-BLKs)", color="#c0504d")
    ax.bar([x + 0.2 for x in xs], mob, width=0.4, label="MobileTL", color="#4f81bd")
    for x, r, top in zip(xs, rows, van, strict=True):
        if r.reduction_pct is not None:
            ax.annotate(format_reduction(r.reduction_pct, 0), (x, top), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=7 if len(rows) > 12 else 8)
    ax.set_ylabel("MiB saved for backward (autograd, measured)")
    red = report.reduction_pct
    ax.set_title(
        f"{report.model}: top K={report.blocks} blocks, batch {report.batch_size}, {report.image_size} px"
        + (f"\nMobileTL {format_reduction(red)} bytes saved for backward (total)" if red is not None else ""),
        fontsize=10,
    )
    ax.legend(frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.fspath(path))


def plot_timelines(timelines: dict[str, StepTimeline], estimates: dict[str, StepPeakEstimate], path: str | os.PathLike) -> None:
    """Write a PNG: live tensor bytes over one training step per method on a phase-aligned axis, each
    peak marked and broken down (runtime baseline and allocator slack from the OS, the rest from
    the prediction of the phase it falls in). Needs matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise EdgetlError("plotting needs matplotlib: pip install 'edgetl[plot]'") from None

    mib = 2**20
    colors = {"vanilla": "#c0504d", "mobiletl": "#4f81bd"}
    names = {"vanilla": "vanilla (FT-BLKs)", "mobiletl": "MobileTL"}
    fig = Figure(figsize=(12.0, 6.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for k, (method, t) in enumerate(timelines.items()):
        xs, ys = t.phase_progress(), [t.total(i) / mib for i in range(len(t.live))]
        ax.step(xs, ys, where="post", color=colors.get(method), label=names.get(method, method), linewidth=1.2)
        i = t.peak_index
        ax.plot([xs[i]], [ys[i]], "o", color=colors.get(method))
        parts = {"runtime baseline (OS)": t.runtime_rss} if t.runtime_rss else {}
        parts.update(estimates[method].breakdown(t.peak_phase))
        if t.runtime_rss:
            parts["allocator slack (OS)"] = t.allocator_slack
        text = f"{names.get(method, method)} peak {t.peak_bytes / mib:.1f} MiB in {t.peak_phase}\n" + "\n".join(
            f"  {name} {v / mib:.1f}" for name, v in parts.items() if v
        )
        ax.text(0.01 + 0.5 * k, 0.98, text, transform=ax.transAxes, va="top", fontsize=7, family="monospace", color=colors.get(method))
    ax.set_xticks([i + 0.5 for i in range(len(PHASES))])
    ax.set_xticklabels(PHASES, fontsize=8)
    for i in range(1, len(PHASES)):
        ax.axvline(i, color="#cccccc", linewidth=0.6)
    ax.set_xlim(0, len(PHASES))
    top = max(t.peak_bytes for t in timelines.values()) / mib
    ax.set_ylim(0, top * 1.6)
    ax.set_ylabel("live tensor MiB (torch's allocation events)")
    first = next(iter(timelines.values()))
    ax.set_title(
        f"{first.model}: one training step, top K={first.blocks} blocks, batch {first.batch_size}, {first.image_size} px", fontsize=10
    )
    ax.legend(frameon=False, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
