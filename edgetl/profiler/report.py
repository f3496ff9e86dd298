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
* **predicted step peak (estimate)**: :func:`edgetl.profiler.estimate.predict_step_peak`.
* **process peak RSS (OS, includes allocator + framework)**: optional, one fresh child process
  per method (:func:`edgetl.profiler.process_peak.measure_process_peak`).

The text table is :mod:`edgetl.profiler.render`, the bar chart :mod:`edgetl.profiler.plot`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from edgetl._allocator import DEFAULT as DEFAULT_ALLOCATOR
from edgetl._format import format_size
from edgetl._rss import available_memory_bytes
from edgetl.errors import ConfigError
from edgetl.models.blocks import block_spec, feature_units, find_blocks, is_irb
from edgetl.profiler.analytic import paper_saved_for_backward, total_bytes
from edgetl.profiler.estimate import (
    StepPeakEstimate,
    param_bytes,
    predict_step_peak,
    trainable_shapes_problem,
    unit_param_bytes,
)
from edgetl.profiler.measure import UnitMeasurement, measure_saved_bytes
from edgetl.profiler.predict import UnitPrediction, predict_units
from edgetl.profiler.process_peak import ProcessPeak
from edgetl.profiler.settings import StepSettings
from edgetl.profiler.units import HEAD, head_layers, unit_layers
from edgetl.train.optim import check_optimizer, state_floats
from edgetl.train.policy import METHODS, TrainPolicy, uses_mobiletl
from edgetl.train.prepare import TransferModel, prepare

#: the report's column order: the baseline first, as in the paper's tables (the set is train.policy.METHODS)
METHOD_ORDER: tuple[str, ...] = tuple(sorted(METHODS, key=lambda m: m != "vanilla"))

LABELS = {
    "saved": "saved for backward (autograd, exact): predicted = analytic over shapes; measured = saved-tensor hooks, one count per storage",
    "paper": "paper acct. = the paper's/TinyTL's analytic convention (ReLU/ReLU6 1 bit, no BN statistics, MobileTL masks 1 bit)",
    "estimate": "predicted step peak (estimate: pure function of shapes, see edgetl.profiler.estimate.predict_step_peak)",
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "blocks": self.blocks,
            "num_blocks": self.num_blocks,
            "batch_size": self.batch_size,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "optimizer": self.optimizer,
            "optimizer_state_floats_per_param": state_floats(self.optimizer),
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
        """:meth:`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)


# --- building the report ---------------------------------------------------------------------------


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
    layers = unit_layers(name, unit)
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


def _paper_bytes(model: nn.Module, row: UnitPrediction, policy: TrainPolicy) -> int:
    if row.role == "frozen":
        return 0
    if row.name == HEAD:
        return total_bytes(paper_saved_for_backward(head_layers(model), row.in_shape)[0])
    unit = model.get_submodule(row.name)
    return total_bytes(paper_saved_for_backward(unit_layers(row.name, unit), row.in_shape, mobiletl=uses_mobiletl(policy, unit))[0])


def _resolve_model(model_or_name: str | nn.Module, num_classes: int, seed: int) -> tuple[str, nn.Module]:
    if isinstance(model_or_name, TransferModel):
        raise ConfigError("profile() needs the original torchvision-layout model, not a prepared TransferModel")
    if isinstance(model_or_name, nn.Module):
        return type(model_or_name).__name__, model_or_name
    if not isinstance(model_or_name, str):
        raise ConfigError(f"model_or_name must be a model name or an nn.Module, got {type(model_or_name).__name__}")
    from edgetl.models.zoo import load_model

    with torch.random.fork_rng(devices=[]):  # random weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        return model_or_name, load_model(model_or_name, num_classes=num_classes)


def _check_memory(model: nn.Module, policy: TrainPolicy, batch_size: int, image_size: int) -> None:
    """Refuse a measurement this machine cannot hold (``--image-size 100000`` would ask for hundreds
    of GiB and die in the allocator): the predicted vanilla step, against the memory available to
    this process now (its ``ulimit -v`` and cgroup limit included)."""
    need = predict_step_peak(model, replace(policy, method="vanilla"), batch_size=batch_size, image_size=image_size).live_peak
    available = available_memory_bytes()
    if need > available:
        raise ConfigError(
            f"measuring batch {batch_size} at {image_size} px needs about {format_size(need)} but {format_size(available)} "
            "is available to this process; lower --batch-size or --image-size"
        )


def _check_args(policy: TrainPolicy, batch_size: int, image_size: int, num_classes: int, optimizer: str) -> None:
    if not isinstance(policy, TrainPolicy):
        raise ConfigError(f"policy must be a TrainPolicy, got {type(policy).__name__}")
    for label, value, low in (("batch size", batch_size, 1), ("image size", image_size, 8), ("num_classes", num_classes, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{label} must be an integer >= {low}, got {value!r}")
    check_optimizer(optimizer)


def profile(
    model_or_name: str | nn.Module,
    policy: TrainPolicy,
    *,
    batch_size: int,
    image_size: int,
    num_classes: int = StepSettings.num_classes,
    optimizer: str = StepSettings.optimizer,
    measure_process: bool = False,
    allocator: str = DEFAULT_ALLOCATOR,
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
            ``"sgd"`` (with momentum, 1).
        measure_process: also run a real training step in a fresh child process per method and
            report its peak RSS (slow: seconds per method).
        allocator: the ``malloc`` of those child processes (:data:`edgetl._allocator.ALLOCATORS`).
        seed: for the random weights and the random input batch.

    Raises:
        ConfigError: an unknown model, K larger than the model's block count, bad sizes, an
            unknown optimizer, or a configuration that cannot train (a train-mode batch norm on a
            single value).
    """
    _check_args(policy, batch_size, image_size, num_classes, optimizer)
    name, model = _resolve_model(model_or_name, num_classes, seed)
    if isinstance(model_or_name, nn.Module):
        from edgetl.models.zoo import classifier_linear

        try:
            num_classes = classifier_linear(model)[2].out_features  # the module's own head
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    try:
        num_blocks = len(find_blocks(model))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if num_blocks == 0:
        raise ConfigError(f"{name} has no inverted-residual blocks")
    if policy.blocks > num_blocks:
        raise ConfigError(f"K={policy.blocks} blocks requested but {name} has only {num_blocks} inverted-residual blocks")
    _check_memory(model, policy, batch_size, image_size)
    units = dict(feature_units(model))
    block_index = {n: i for i, (n, _) in enumerate(find_blocks(model))}
    x = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))

    policies = {m: replace(policy, method=m) for m in METHOD_ORDER}
    predicted: dict[str, list[UnitPrediction]] = {}
    measured: dict[str, dict[str, UnitMeasurement]] = {}
    totals: dict[str, MethodTotals] = {}
    for method, pol in policies.items():
        rows = predict_units(model, pol, batch_size=batch_size, image_size=image_size)
        problem = trainable_shapes_problem(rows)
        if problem:
            raise ConfigError(f"cannot train at batch size {batch_size}, {image_size} px: {problem}")
        net = prepare(model, pol)
        # the hooks attribute each saved tensor to the innermost running unit; the head is the rest
        measured[method] = measure_saved_bytes(net, {n: net.get_submodule(n) for n in net.bottom_names + net.top_names}, x)
        del net
        predicted[method] = rows
        params = param_bytes(model, pol)
        totals[method] = MethodTotals(
            saved_predicted=sum(r.nbytes for r in rows),
            saved_measured=sum(m.nbytes for m in measured[method].values()),
            saved_paper=sum(_paper_bytes(model, r, pol) for r in rows),
            weights=params.weights,
            trainable_params=params.trainable,
            trainable_count=params.trainable_count,
            gradients=params.trainable,
            optimizer_state=state_floats(optimizer) * params.trainable,
            step_peak=predict_step_peak(model, pol, batch_size=batch_size, image_size=image_size, optimizer=optimizer, rows=rows),
        )

    rows_out: list[MemoryRow] = []
    for i, base in enumerate(predicted["vanilla"]):
        unit = units.get(base.name)
        if base.name == HEAD:
            tp = {m: unit_param_bytes(model.classifier, trains=True, mobiletl=False).trainable for m in METHOD_ORDER}
        else:
            tp = {
                m: unit_param_bytes(unit, trains=predicted[m][i].role != "frozen", mobiletl=uses_mobiletl(pol, unit)).trainable
                for m, pol in policies.items()
            }
        rows_out.append(
            MemoryRow(
                index=i,
                name=base.name,
                role=base.role,
                block_index=block_index.get(base.name),
                in_shape=tuple(base.in_shape),
                out_shape=tuple(base.out_shape),
                predicted={m: predicted[m][i].nbytes for m in METHOD_ORDER},
                measured={m: measured[m][base.name].nbytes for m in METHOD_ORDER},
                paper={m: _paper_bytes(model, predicted[m][i], pol) for m, pol in policies.items()},
                trainable_param_bytes=tp,
                **_describe(base.name, unit),
            )
        )

    if measure_process:
        from edgetl.profiler.process_peak import measure_process_peak

        for method, pol in policies.items():
            peak = measure_process_peak(
                model_or_name,
                pol,
                batch_size=batch_size,
                image_size=image_size,
                num_classes=num_classes,
                optimizer=optimizer,
                allocator=allocator,
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
