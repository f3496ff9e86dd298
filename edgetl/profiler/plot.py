"""The memory report as a bar chart: bytes saved for backward per trained unit, vanilla against MobileTL."""

from __future__ import annotations

import os

from edgetl.errors import EdgetlError
from edgetl.profiler.render import format_reduction
from edgetl.profiler.report import MemoryReport, MemoryRow


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
