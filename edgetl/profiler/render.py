"""The memory report as text: a per-unit table (KiB), the whole step per method, and the step timeline.

Bytes stay integers in :class:`~edgetl.profiler.report.MemoryReport`; they become KiB / MiB here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from edgetl._format import format_size
from edgetl.profiler.estimate import StepPeakEstimate
from edgetl.profiler.report import LABELS, METHOD_ORDER, MemoryReport, MemoryRow, MethodTotals
from edgetl.profiler.timeline import PHASES, StepTimeline
from edgetl.train.optim import state_floats


def _shape(s: Sequence[int]) -> str:
    return "x".join(str(v) for v in s)


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f}"


def format_reduction(v: float | None, digits: int = 1) -> str:
    """A reduction in percent as the paper writes it (-46.3%); no sign for a zero, "-" for none."""
    if v is None:
        return "-"
    if round(v, digits) == 0:
        return f"{0:.{digits}f}%"
    return f"{-v:+.{digits}f}%"


def _unit_label(r: MemoryRow) -> str:
    if r.role == "head":
        return "head (pool + classifier)"
    if r.block_index is not None:
        return f"{r.name} (IRB {r.block_index})"
    return r.name


#: the per-unit table's columns: the unit's description (left-aligned), then its figures (right-aligned)
DESCRIPTION = ["unit", "kind", "input NxCxHxW", "t", "k", "s", "SE", "act", "trains"]
FIGURES = [f"{m} {kind}" for m in METHOD_ORDER for kind in ("pred", "meas")] + ["reduction", "paper acct.", "trained params"]


def _saved(predicted: dict[str, int], measured: dict[str, int]) -> list[str]:
    return [_kib(by_method[m]) for m in METHOD_ORDER for by_method in (predicted, measured)]


def _unit_table(report: MemoryReport, collapse_frozen: bool) -> list[str]:
    """Bytes stored for backward per unit (KiB), predicted and measured per method; a total line."""
    table: list[list[str]] = []
    rows = list(report.rows)
    frozen = [r for r in rows if r.role == "frozen"]
    if collapse_frozen and len(frozen) > 1:
        first, last = frozen[0], frozen[-1]
        nblocks = sum(r.block_index is not None for r in frozen)
        label = [f"{first.name}-{last.name.rsplit('.', 1)[-1]}", f"frozen: stem + {nblocks} IRBs", _shape(first.in_shape)]
        table.append(label + [""] * 5 + ["no"] + ["0"] * (2 * len(METHOD_ORDER)) + ["-", "-", "0"])
        rows = [r for r in rows if r.role != "frozen"]
    for r in rows:
        table.append(
            [
                _unit_label(r),
                r.kind,
                _shape(r.in_shape),
                "" if r.expand_ratio is None else f"{r.expand_ratio:g}",
                "" if r.kernel is None else str(r.kernel),
                "" if r.stride is None else str(r.stride),
                "" if r.se is None else ("yes" if r.se else "no"),
                r.activation or "",
                "yes" if r.trains else "no",
                *_saved(r.predicted, r.measured),
                format_reduction(r.reduction_pct),
                format_reduction(r.paper_reduction_pct),
                _kib(r.trainable_param_bytes["mobiletl"]) if r.trains else "0",
            ]
        )
    t = report.totals
    table.append(
        ["total"]
        + [""] * (len(DESCRIPTION) - 1)
        + _saved({m: t[m].saved_predicted for m in t}, {m: t[m].saved_measured for m in t})
        + [format_reduction(report.reduction_pct), format_reduction(report.paper_reduction_pct), _kib(t["mobiletl"].trainable_params)]
    )
    header = DESCRIPTION + FIGURES
    widths = [max(len(header[c]), *(len(row[c]) for row in table)) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.rjust(w) if c >= len(DESCRIPTION) else cell.ljust(w) for c, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = line(["-" * w for w in widths])
    return [line(header), rule, *(line(row) for row in table[:-1]), rule, line(table[-1])]


def _step_table(report: MemoryReport) -> list[str]:
    """Whole-step figures per method (sizes), the process's RSS when it was measured."""
    t = report.totals
    body: list[list[str]] = []

    def add(label: str, getter: Callable[[MethodTotals], int]) -> None:
        body.append([label] + [format_size(getter(t[m])) for m in METHOD_ORDER])

    add("saved for backward (autograd, exact)", lambda x: x.saved_measured)
    add("saved for backward (paper accounting)", lambda x: x.saved_paper)
    add("weights (all params + buffers, fp32)", lambda x: x.weights)
    add("trained parameters", lambda x: x.trainable_params)
    add("gradients", lambda x: x.gradients)
    add(f"optimizer state ({report.optimizer})", lambda x: x.optimizer_state)
    add("predicted step peak (estimate, excl. runtime)", lambda x: x.step_peak.model_bytes)
    if _measured_process(report):
        add("process: runtime baseline RSS (after imports)", lambda x: x.process.runtime_rss)
        add("process: RSS after model load + prepare", lambda x: x.process.loaded_rss)
        add("process: peak RSS (lifetime)", lambda x: x.process.peak_rss)
        add("process: peak RSS - RSS after load (step delta)", lambda x: x.process.step_delta)
        add("process: peak RSS - RSS after a warm-up step (warm delta)", lambda x: x.process.warm_delta)
        add("process: peak RSS - runtime baseline (vs. estimate)", lambda x: x.process.model_delta)
    header = ["", *METHOD_ORDER]
    widths = [max(len(header[c]), *(len(r[c]) for r in body)) for c in range(len(header))]
    return [
        "  " + "  ".join(cell.rjust(w) if c else cell.ljust(w) for c, (cell, w) in enumerate(zip(r, widths, strict=True)))
        for r in [header, *body]
    ]


def _measured_process(report: MemoryReport) -> bool:
    return all(report.totals[m].process for m in METHOD_ORDER)


def render_report(report: MemoryReport, *, collapse_frozen: bool = True) -> str:
    """``report`` as text: the per-unit table, then whole-step figures per method, then notes.

    ``collapse_frozen`` folds the frozen bottom into one line.
    """
    out = [
        f"edgetl profile: {report.model}, K={report.blocks} of {report.num_blocks} blocks, batch {report.batch_size}, "
        f"{report.image_size} px, {report.num_classes} classes, optimizer {report.optimizer} "
        f"({state_floats(report.optimizer)} state floats per trained parameter), MobileTL masks: {report.activation_mask}",
        "",
        "Bytes stored for backward per unit, KiB. " + LABELS["saved"] + ".",
        "reduction = MobileTL vs vanilla on the measured bytes; " + LABELS["paper"] + ".",
        "trained params = bytes of the parameters MobileTL trains in the unit (vanilla also trains internal BN scales).",
        "",
        *_unit_table(report, collapse_frozen),
        "",
        "Whole step, per method:",
        *_step_table(report),
        "",
        "Notes: " + LABELS["estimate"] + ".",
    ]
    if _measured_process(report):
        p = report.totals["mobiletl"].process
        out.append(
            f"       {LABELS['process']}: one fresh child process per method, {p.steps} training steps "
            f"(forward, backward, {report.optimizer} step), {p.platform}, torch {p.torch_version}"
            + ("" if p.hwm_reset else "; the peak could not be reset after loading, so it is the process's lifetime peak")
            + "."
        )
    else:
        out.append("       process peak RSS not measured (edgetl profile --process / profile(..., measure_process=True)).")
    return "\n".join(out)


def render_timelines(timelines: dict[str, StepTimeline], estimates: dict[str, StepPeakEstimate]) -> str:
    """The whole step, phase by phase: measured live bytes against the prediction, per method."""
    first = next(iter(timelines.values()))
    lines = [
        f"whole step: {first.model}, K={first.blocks}, batch {first.batch_size}, {first.image_size} px, {first.optimizer}",
        "  live tensor bytes: measured = torch's allocation events over one real step; predicted = predict_step_peak (pure)",
        f"  {'phase':18s}" + "".join(f"{m + ' measured':>20s}{'predicted':>11s}" for m in timelines),
    ]
    measured = {m: t.phase_peaks() for m, t in timelines.items()}
    for phase in PHASES:
        row = f"  {phase:18s}"
        for m in timelines:
            predicted = estimates[m].phases().get(phase)
            row += f"{format_size(measured[m].get(phase, 0)):>20s}{format_size(predicted) if predicted is not None else '':>11s}"
        lines.append(row)
    lines.append(
        f"  {'step peak':18s}"
        + "".join(f"{format_size(t.peak_bytes):>20s}{format_size(estimates[m].live_peak):>11s}" for m, t in timelines.items())
    )
    if {"vanilla", "mobiletl"} <= set(timelines):
        v, b = timelines["vanilla"], timelines["mobiletl"]
        lines.append(
            f"  MobileTL / vanilla: step peak {b.peak_bytes / v.peak_bytes:.3f}, "
            f"peak over the loaded model {(b.peak_bytes - _resident(b)) / max(v.peak_bytes - _resident(v), 1):.3f}"
        )
    for m, t in timelines.items():
        parts = ", ".join(f"{k} {format_size(v)}" for k, v in estimates[m].breakdown(t.peak_phase).items() if v)
        lines.append(f"  {m} peak in {t.peak_phase}: {parts}")
        if t.runtime_rss:
            lines.append(
                f"    process (OS): runtime baseline {format_size(t.runtime_rss)}, peak RSS {format_size(t.peak_rss)}, "
                f"allocator slack {format_size(t.allocator_slack)}"
            )
    return "\n".join(lines)


def _resident(t: StepTimeline) -> int:
    """Live bytes before the step's batch: the loaded model and its optimizer state."""
    return t.total(0)
