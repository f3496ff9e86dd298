"""The memory report: per-block bytes stored for backward, predicted and measured, vanilla against MobileTL.

:func:`profile` computes it for one model, K, batch size and image size, always for **both**
methods. Figures are integers in bytes; KiB / MiB appear only when printing.

Which figure is which:

* **saved for backward (autograd, exact)**: ``predicted`` is
  :func:`edgetl.profiler.predict.predict_units` (pure functions of shapes and policy);
  ``measured`` is :func:`edgetl.profiler.measure.measure_saved_bytes`, autograd's own
  saved-tensor hooks during a real forward, deduplicated by storage. They agree to the byte.
* **paper accounting**: the same blocks under the paper's (TinyTL's) analytic convention
  (:func:`edgetl.profiler.analytic.paper_saved_for_backward`), to compare with MobileTL's published
  per-block reductions (-46.3% for a MobileNetV2 IRB, -53.3% for a MobileNetV3 IRB). Where edgetl's
  figure differs: PyTorch's vanilla ReLU6 keeps a full fp32 copy of its input where the paper counts
  1 bit, so for ReLU6 blocks (MobileNetV2) the PyTorch reduction is much larger (-63% against
  -45.5% for an expansion-6, stride-1 block); Hard-Swish keeps fp32 in both accountings, so for
  MobileNetV3 blocks the two agree within about a point (PyTorch's train-mode batch norm also keeps
  2 x C statistics, and edgetl's ``reuse`` masks cost 0 bytes where the paper counts 1 bit).
* **predicted step peak (estimate)**: :func:`edgetl.profiler.peak.predict_step_peak`.
* **process peak RSS (OS, includes allocator + framework)**: optional, one fresh child process
  per method (:func:`edgetl.profiler.peak.measure_process_peak`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from edgetl._format import format_size
from edgetl.errors import EdgetlError
from edgetl.models.blocks import block_spec, feature_units, find_blocks, is_irb, layer_specs
from edgetl.profiler.analytic import paper_saved_for_backward, total_bytes
from edgetl.profiler.measure import HEAD, measure_saved_bytes
from edgetl.profiler.peak import (
    OPTIMIZER_STATE_FLOATS,
    ProcessPeak,
    StepPeakEstimate,
    check_optimizer,
    param_bytes,
    predict_step_peak,
    trainable_shapes_problem,
    unit_layers,
    unit_param_bytes,
)
from edgetl.profiler.predict import UnitPrediction, predict_units
from edgetl.train.policy import TrainPolicy
from edgetl.train.prepare import TransferModel, prepare

METHODS: tuple[str, str] = ("vanilla", "mobiletl")

LABELS = {
    "saved": "saved for backward (autograd, exact): predicted = analytic over shapes; measured = saved-tensor hooks, one count per storage",
    "paper": "paper acct. = the paper's/TinyTL's analytic convention (ReLU/ReLU6 1 bit, no BN statistics, MobileTL masks 1 bit)",
    "estimate": "predicted step peak (estimate: pure function of shapes, see edgetl.profiler.peak.predict_step_peak)",
    "process": "process peak RSS (OS, includes interpreter, framework libraries, allocator)",
}


@dataclass(frozen=True)
class MemoryRow:
    """One unit of the network (stem, block, final conv stage) or the head. Bytes per method."""

    index: int  # position in forward order; the head is last
    name: str  # qualified module name ("features.3") or "head"
    kind: str  # module class (InvertedResidual, MBConv, Conv2dNormActivation) or "head"
    role: str  # "frozen", "block" (a trained IRB), "stage" (a trained non-IRB unit), "head"
    block_index: int | None  # index among the model's IRBs, bottom to top
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    expand_ratio: float | None
    kernel: int | None
    stride: int | None
    se: bool | None
    residual: bool | None
    activation: str | None
    predicted: dict[str, int]  # saved for backward, analytic (PyTorch's rules)
    measured: dict[str, int]  # saved for backward, autograd hooks
    paper: dict[str, int]  # saved for backward, the paper's accounting
    trainable_param_bytes: dict[str, int]

    @property
    def trains(self) -> bool:
        return self.role != "frozen"

    @property
    def reduction_pct(self) -> float | None:
        """MobileTL's saving over vanilla on the measured bytes, in percent (None if vanilla keeps nothing)."""
        return _reduction(self.measured)

    @property
    def paper_reduction_pct(self) -> float | None:
        return _reduction(self.paper)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["in_shape"], d["out_shape"] = list(self.in_shape), list(self.out_shape)
        d["reduction_pct"], d["paper_reduction_pct"] = self.reduction_pct, self.paper_reduction_pct
        return d


@dataclass(frozen=True)
class MethodTotals:
    """Whole-network figures for one method. Bytes."""

    saved_predicted: int
    saved_measured: int
    saved_paper: int
    weights: int  # every parameter and buffer of the prepared network
    trainable_params: int  # bytes of the parameters that train
    trainable_count: int
    gradients: int
    optimizer_state: int
    step_peak: StepPeakEstimate
    process: ProcessPeak | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("step_peak", "process")}
        d["step_peak_estimate"] = self.step_peak.to_dict()
        d["process"] = self.process.to_dict() if self.process else None
        return d


def _reduction(by_method: dict[str, int]) -> float | None:
    vanilla = by_method["vanilla"]
    return None if vanilla == 0 else 100.0 * (vanilla - by_method["mobiletl"]) / vanilla


@dataclass(frozen=True)
class MemoryReport:
    """Per-unit memory of training one network, vanilla against MobileTL (see the module docstring)."""

    model: str
    blocks: int  # K
    num_blocks: int
    batch_size: int
    image_size: int
    num_classes: int
    optimizer: str
    activation_mask: str
    rows: tuple[MemoryRow, ...]
    totals: dict[str, MethodTotals]
    torch_version: str = field(default_factory=lambda: torch.__version__)

    @property
    def reduction_pct(self) -> float | None:
        """MobileTL's saving of saved-for-backward bytes over the whole network, measured."""
        return _reduction({m: t.saved_measured for m, t in self.totals.items()})

    @property
    def paper_reduction_pct(self) -> float | None:
        return _reduction({m: t.saved_paper for m, t in self.totals.items()})

    def row(self, name: str) -> MemoryRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "blocks": self.blocks,
            "num_blocks": self.num_blocks,
            "batch_size": self.batch_size,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "optimizer": self.optimizer,
            "optimizer_state_floats_per_param": OPTIMIZER_STATE_FLOATS[self.optimizer],
            "activation_mask": self.activation_mask,
            "torch_version": self.torch_version,
            "units": "bytes",
            "labels": dict(LABELS),
            "reduction_pct": self.reduction_pct,
            "paper_reduction_pct": self.paper_reduction_pct,
            "rows": [r.to_dict() for r in self.rows],
            "totals": {m: t.to_dict() for m, t in self.totals.items()},
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def render(self, *, collapse_frozen: bool = True) -> str:
        """The report as a text table. ``collapse_frozen`` folds the frozen bottom into one line."""
        return _render(self, collapse_frozen=collapse_frozen)

    def __str__(self) -> str:
        return self.render()


# --- building the report ---------------------------------------------------------------------------


def _shape(s: Sequence[int]) -> str:
    return "x".join(str(v) for v in s)


def _describe(name: str, unit: nn.Module | None) -> dict[str, Any]:
    if unit is None:
        return dict(kind="head", expand_ratio=None, kernel=None, stride=None, se=None, residual=None, activation=None)
    if is_irb(unit):
        spec = block_spec(name, unit)
        act = next((layer.kind for layer in spec.layers if layer.op == "act"), None)
        return dict(
            kind=spec.kind,
            expand_ratio=round(spec.expand_ratio, 4),
            kernel=spec.kernel,
            stride=spec.stride,
            se=spec.use_se,
            residual=spec.use_residual,
            activation=act,
        )
    layers = layer_specs(unit)
    conv = next((layer for layer in layers if layer.op == "conv"), None)
    act = next((layer.kind for layer in layers if layer.op == "act"), None)
    return dict(
        kind=type(unit).__name__,
        expand_ratio=None,
        kernel=conv.kernel if conv else None,
        stride=conv.stride if conv else None,
        se=False,
        residual=False,
        activation=act,
    )


def _paper_bytes(model: nn.Module, row: UnitPrediction, method: str) -> int:
    if row.role == "frozen":
        return 0
    if row.name == HEAD:
        layers = layer_specs(nn.Sequential(nn.AdaptiveAvgPool2d(1), model.classifier))
        return total_bytes(paper_saved_for_backward(layers, row.in_shape)[0])
    unit = model.get_submodule(row.name)
    mobiletl = method == "mobiletl" and is_irb(unit)
    return total_bytes(paper_saved_for_backward(unit_layers(row.name, unit), row.in_shape, mobiletl=mobiletl)[0])


def _resolve_model(model_or_name: str | nn.Module, num_classes: int, seed: int) -> tuple[str, nn.Module]:
    if isinstance(model_or_name, TransferModel):
        raise EdgetlError("profile() needs the original torchvision-layout model, not a prepared TransferModel")
    if isinstance(model_or_name, nn.Module):
        return type(model_or_name).__name__, model_or_name
    if not isinstance(model_or_name, str):
        raise TypeError(f"model_or_name must be a model name or an nn.Module, got {type(model_or_name).__name__}")
    from edgetl.models.zoo import load_model

    with torch.random.fork_rng(devices=[]):  # random weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        return model_or_name, load_model(model_or_name, num_classes=num_classes)


def _check_args(policy: TrainPolicy, batch_size: int, image_size: int, num_classes: int, optimizer: str) -> None:
    if not isinstance(policy, TrainPolicy):
        raise TypeError(f"policy must be a TrainPolicy, got {type(policy).__name__}")
    for label, value, low in (("batch size", batch_size, 1), ("image size", image_size, 8), ("num_classes", num_classes, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise EdgetlError(f"{label} must be an integer >= {low}, got {value!r}")
    check_optimizer(optimizer)


def profile(
    model_or_name: str | nn.Module,
    policy: TrainPolicy,
    *,
    batch_size: int,
    image_size: int,
    num_classes: int = 1000,
    optimizer: str = "adam",
    measure_process: bool = False,
    seed: int = 0,
) -> MemoryReport:
    """Profile the memory of training the top ``policy.blocks`` blocks, vanilla and MobileTL.

    Args:
        model_or_name: the original torchvision-layout network, or a name for
            :func:`edgetl.load_model` (built with random weights: memory does not depend on them).
            A module keeps its own classifier, so ``num_classes`` then does not apply.
        policy: K (``policy.blocks``) and the activation-mask storage. ``policy.method`` is
            ignored: the report always covers both methods.
        batch_size, image_size: the input batch, ``batch_size x 3 x image_size x image_size``.
        num_classes: classifier outputs for a model given by name.
        optimizer: whose state to count: ``"adam"``/``"adamw"`` (2 floats a trained parameter),
            ``"sgd"`` (with momentum, 1) or ``"sgd_nomomentum"`` (0).
        measure_process: also run a real training step in a fresh child process per method and
            report its peak RSS (slow: seconds per method).
        seed: for the random weights and the random input batch.

    Raises:
        EdgetlError: an unknown model, K larger than the model's block count, bad sizes, or a
            configuration that cannot train (a train-mode batch norm on a single value).
    """
    _check_args(policy, batch_size, image_size, num_classes, optimizer)
    name, model = _resolve_model(model_or_name, num_classes, seed)
    if isinstance(model_or_name, nn.Module):
        from edgetl.models.zoo import classifier_linear

        try:
            num_classes = classifier_linear(model)[2].out_features  # the module's own head
        except ValueError as exc:
            raise EdgetlError(str(exc)) from None
    try:
        num_blocks = len(find_blocks(model))
    except ValueError as exc:
        raise EdgetlError(str(exc)) from None
    if num_blocks == 0:
        raise EdgetlError(f"{name} has no inverted-residual blocks")
    if policy.blocks > num_blocks:
        raise EdgetlError(f"K={policy.blocks} blocks requested but {name} has only {num_blocks} inverted-residual blocks")
    units = dict(feature_units(model))
    block_index = {n: i for i, (n, _) in enumerate(find_blocks(model))}
    x = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))

    predicted: dict[str, list[UnitPrediction]] = {}
    measured: dict[str, dict] = {}
    totals: dict[str, MethodTotals] = {}
    for method in METHODS:
        pol = replace(policy, method=method)
        rows = predict_units(model, pol, batch_size=batch_size, image_size=image_size)
        problem = trainable_shapes_problem(rows)
        if problem:
            raise EdgetlError(f"cannot train at batch size {batch_size}, {image_size} px: {problem}")
        net = prepare(model, pol)
        # the hooks attribute each saved tensor to the innermost running unit; the head is the rest
        measured[method] = measure_saved_bytes(net, {n: net.get_submodule(n) for n in net.bottom_names + net.top_names}, x)
        del net
        predicted[method] = rows
        params = param_bytes(model, pol, rows)
        totals[method] = MethodTotals(
            saved_predicted=sum(r.nbytes for r in rows),
            saved_measured=sum(m.nbytes for m in measured[method].values()),
            saved_paper=sum(_paper_bytes(model, r, method) for r in rows),
            weights=params.weights,
            trainable_params=params.trainable,
            trainable_count=params.trainable_count,
            gradients=params.trainable,
            optimizer_state=OPTIMIZER_STATE_FLOATS[optimizer] * params.trainable,
            step_peak=predict_step_peak(model, pol, batch_size=batch_size, image_size=image_size, optimizer=optimizer, rows=rows),
        )

    rows_out: list[MemoryRow] = []
    for i, base in enumerate(predicted["vanilla"]):
        unit = units.get(base.name)
        tp = {}
        for method in METHODS:
            role = predicted[method][i].role
            if base.name == HEAD:
                tp[method] = unit_param_bytes(model.classifier, trains=True, mobiletl=False)[1]
            else:
                tp[method] = unit_param_bytes(unit, trains=role != "frozen", mobiletl=method == "mobiletl")[1]
        rows_out.append(
            MemoryRow(
                index=i,
                name=base.name,
                role=base.role,
                block_index=block_index.get(base.name),
                in_shape=tuple(base.in_shape),
                out_shape=tuple(base.out_shape),
                predicted={m: predicted[m][i].nbytes for m in METHODS},
                measured={m: measured[m][base.name].nbytes for m in METHODS},
                paper={m: _paper_bytes(model, predicted[m][i], m) for m in METHODS},
                trainable_param_bytes=tp,
                **_describe(base.name, unit),
            )
        )

    if measure_process:
        from edgetl.profiler.peak import measure_process_peak

        for method in METHODS:
            peak = measure_process_peak(
                model_or_name,
                replace(policy, method=method),
                batch_size=batch_size,
                image_size=image_size,
                num_classes=num_classes,
                optimizer=optimizer,
            )
            totals[method] = replace(totals[method], process=peak)

    return MemoryReport(
        model=name,
        blocks=policy.blocks,
        num_blocks=num_blocks,
        batch_size=batch_size,
        image_size=image_size,
        num_classes=num_classes,
        optimizer=optimizer,
        activation_mask=policy.activation_mask,
        rows=tuple(rows_out),
        totals=totals,
    )


# --- rendering ------------------------------------------------------------------------------------


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f}"


def _pct(v: float | None, digits: int = 1) -> str:
    """A reduction as the paper writes it (-46.3%); no sign for a zero."""
    if v is None:
        return "-"
    if round(v, digits) == 0:
        return f"{0:.{digits}f}%"
    return f"{-v:+.{digits}f}%"


def _short_label(r: MemoryRow) -> str:
    if r.role == "head":
        return "head"
    if r.block_index is not None:
        return f"IRB {r.block_index}\nt{r.expand_ratio:g} s{r.stride}" + (" SE" if r.se else "")
    return "stem" if r.index == 0 else "final conv"


def _unit_label(r: MemoryRow) -> str:
    if r.role == "head":
        return "head (pool + classifier)"
    if r.block_index is not None:
        return f"{r.name} (IRB {r.block_index})"
    return r.name


def _render(report: MemoryReport, *, collapse_frozen: bool) -> str:
    header = [
        "unit",
        "kind",
        "input NxCxHxW",
        "t",
        "k",
        "s",
        "SE",
        "act",
        "trains",
        "vanilla pred",
        "vanilla meas",
        "mobiletl pred",
        "mobiletl meas",
        "reduction",
        "paper acct.",
        "trained params",
    ]
    right = set(range(9, 16))
    table: list[list[str]] = []
    rows = list(report.rows)
    frozen = [r for r in rows if r.role == "frozen"]
    if collapse_frozen and len(frozen) > 1:
        first, last = frozen[0], frozen[-1]
        nblocks = sum(r.block_index is not None for r in frozen)
        table.append(
            [
                f"{first.name}-{last.name.rsplit('.', 1)[-1]}",
                f"frozen: stem + {nblocks} IRBs",
                _shape(first.in_shape),
                "",
                "",
                "",
                "",
                "",
                "no",
                "0",
                "0",
                "0",
                "0",
                "-",
                "-",
                "0",
            ]
        )
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
                _kib(r.predicted["vanilla"]),
                _kib(r.measured["vanilla"]),
                _kib(r.predicted["mobiletl"]),
                _kib(r.measured["mobiletl"]),
                _pct(r.reduction_pct),
                _pct(r.paper_reduction_pct),
                _kib(r.trainable_param_bytes["mobiletl"]) if r.trains else "0",
            ]
        )
    t = report.totals
    table.append(
        [
            "total",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            _kib(t["vanilla"].saved_predicted),
            _kib(t["vanilla"].saved_measured),
            _kib(t["mobiletl"].saved_predicted),
            _kib(t["mobiletl"].saved_measured),
            _pct(report.reduction_pct),
            _pct(report.paper_reduction_pct),
            _kib(t["mobiletl"].trainable_params),
        ]
    )
    widths = [max(len(header[c]), *(len(row[c]) for row in table)) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.rjust(widths[c]) if c in right else cell.ljust(widths[c]) for c, cell in enumerate(cells)).rstrip()

    out = [
        f"edgetl profile: {report.model}, K={report.blocks} of {report.num_blocks} blocks, batch {report.batch_size}, "
        f"{report.image_size} px, {report.num_classes} classes, optimizer {report.optimizer} "
        f"({OPTIMIZER_STATE_FLOATS[report.optimizer]} state floats per trained parameter), MobileTL masks: {report.activation_mask}",
        "",
        "Bytes stored for backward per unit, KiB. " + LABELS["saved"] + ".",
        "reduction = MobileTL vs vanilla on the measured bytes; " + LABELS["paper"] + ".",
        "trained params = bytes of the parameters MobileTL trains in the unit (vanilla also trains internal BN scales).",
        "",
        line(header),
        line(["-" * w for w in widths]),
    ]
    out += [line(row) for row in table[:-1]]
    out += [line(["-" * w for w in widths]), line(table[-1]), ""]

    out.append("Whole step, per method:")
    cols = ["", "vanilla", "mobiletl"]
    body: list[list[str]] = []

    def add(label: str, getter) -> None:
        body.append([label] + [format_size(getter(t[m])) for m in METHODS])

    add("saved for backward (autograd, exact)", lambda x: x.saved_measured)
    add("saved for backward (paper accounting)", lambda x: x.saved_paper)
    add("weights (all params + buffers, fp32)", lambda x: x.weights)
    add("trained parameters", lambda x: x.trainable_params)
    add("gradients", lambda x: x.gradients)
    add(f"optimizer state ({report.optimizer})", lambda x: x.optimizer_state)
    add("predicted step peak (estimate, excl. runtime)", lambda x: x.step_peak.model_bytes)
    if all(t[m].process for m in METHODS):
        add("process: runtime baseline RSS (after imports)", lambda x: x.process.runtime_rss)
        add("process: RSS after model load + prepare", lambda x: x.process.loaded_rss)
        add("process: peak RSS (lifetime)", lambda x: x.process.peak_rss)
        add("process: peak RSS - RSS after load (step delta)", lambda x: x.process.step_delta)
        add("process: peak RSS - runtime baseline (vs. estimate)", lambda x: x.process.model_delta)
    w0 = max(len(r[0]) for r in body)
    w = [max(len(cols[c]), *(len(r[c]) for r in body)) for c in (1, 2)]
    out.append("  " + "".ljust(w0) + "  " + cols[1].rjust(w[0]) + "  " + cols[2].rjust(w[1]))
    out += ["  " + r[0].ljust(w0) + "  " + r[1].rjust(w[0]) + "  " + r[2].rjust(w[1]) for r in body]
    out.append("")
    out.append("Notes: " + LABELS["estimate"] + ".")
    if all(t[m].process for m in METHODS):
        p = t["mobiletl"].process
        out.append(
            f"       {LABELS['process']}: one fresh child process per method, {p.steps} training steps "
            f"(forward, backward, {report.optimizer} step), {p.platform}, torch {p.torch_version}"
            + ("" if p.hwm_reset else "; the peak could not be reset after loading, so it is the process's lifetime peak")
            + "."
        )
    else:
        out.append("       process peak RSS not measured (edgetl profile --process / profile(..., measure_process=True)).")
    return "\n".join(out)


# --- plot --------------------------------------------------------------------------------------------


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
            ax.annotate(_pct(r.reduction_pct, 0), (x, top), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=7 if len(rows) > 12 else 8)
    ax.set_ylabel("MiB saved for backward (autograd, measured)")
    red = report.reduction_pct
    ax.set_title(
        f"{report.model}: top K={report.blocks} blocks, batch {report.batch_size}, {report.image_size} px"
        + (f"\nMobileTL {_pct(red)} bytes saved for backward (total)" if red is not None else ""),
        fontsize=10,
    )
    ax.legend(frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
