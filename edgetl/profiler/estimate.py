"""The predicted peak of one training step: an estimate, pure functions of shapes and the policy.

:func:`predict_step_peak` is what the planner scores configurations with; nothing runs. Its
measured counterpart, the peak RSS of a real training step in a fresh process, is
:func:`edgetl.profiler.process_peak.measure_process_peak`. Never confuse the two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor, nn

from edgetl.errors import ConfigError
from edgetl.models.blocks import LayerSpec, feature_units, first_trained_unit, is_irb
from edgetl.profiler.predict import UnitPrediction, predict_units
from edgetl.profiler.shapes import FLOAT_BYTES, Shape, float_bytes, walk
from edgetl.profiler.units import HEAD, head_layers, unit_layers
from edgetl.train.optim import check_optimizer, state_floats
from edgetl.train.policy import TrainPolicy, shift_only_norms, uses_mobiletl

#: the backward of a layer holds about as much again as its forward (dy, dx, kernel temporaries)
BACKWARD_FACTOR = 2
#: weights are resident twice after loading: prepare() deep-copies the loaded network, and the
#: allocator keeps most of the freed original (measured: RSS after load - baseline ~ 2.5-3 x W)
LOAD_FACTOR = 2
#: heap fragmentation over live activation bytes; measured up to +29% for MobileTL under glibc's
#: dynamic mmap threshold (its shift-only norms and masked activations free full-size
#: temporaries between tensors that stay saved), a few % for vanilla
ALLOCATOR_SLACK = 1.25
#: int64 class labels
LABEL_BYTES = 8


# --- parameters, as a function of structure and policy ---------------------------------------------


@dataclass(frozen=True)
class ParamBytes:
    """Bytes of a prepared network's tensors that are not activations."""

    weights: int  # every parameter and buffer, frozen or not (all resident in fp32)
    trainable: int  # parameters that train; their gradients take as much again
    trainable_count: int  # number of trainable scalars


def _tensor_bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def unit_param_bytes(unit: nn.Module, *, trains: bool, mobiletl: bool) -> ParamBytes:
    """Parameter bytes of one unit of the *original* model once prepared.

    ``mobiletl``: MobileTL rewrites this unit (:func:`edgetl.train.policy.uses_mobiletl`); its
    shift-only norms (:func:`edgetl.train.policy.shift_only_norms`) stop training their scale and
    gain two derived per-channel buffers.
    """
    weights = _tensor_bytes(unit.parameters()) + _tensor_bytes(unit.buffers())
    if not trains:
        return ParamBytes(weights, 0, 0)
    params = list(unit.parameters())
    trainable, count = _tensor_bytes(params), sum(p.numel() for p in params)
    if mobiletl:
        for bn in shift_only_norms([m for m in unit.modules() if isinstance(m, nn.BatchNorm2d)]):
            weights += 2 * bn.num_features * FLOAT_BYTES  # ShiftOnlyNorm.scale, .offset
            if bn.weight is not None:  # the scale stops training
                trainable -= _tensor_bytes([bn.weight])
                count -= bn.weight.numel()
    return ParamBytes(weights, trainable, count)


def param_bytes(model: nn.Module, policy: TrainPolicy) -> ParamBytes:
    """Parameter bytes of ``model`` (original torchvision layout) once prepared under ``policy``."""
    units = feature_units(model)
    policy.check_blocks(sum(is_irb(unit) for _, unit in units))
    trained_from = first_trained_unit(units, policy.blocks)
    parts = [unit_param_bytes(unit, trains=i >= trained_from, mobiletl=uses_mobiletl(policy, unit)) for i, (_, unit) in enumerate(units)]
    parts.append(unit_param_bytes(model.classifier, trains=True, mobiletl=False))
    return ParamBytes(*(sum(getattr(p, f) for p in parts) for f in ("weights", "trainable", "trainable_count")))


# --- working sets -------------------------------------------------------------------------------------


def layer_working_set(layers: Sequence[LayerSpec], in_shape: Shape, *, residual: bool = False) -> int:
    """Largest ``input + output`` bytes of any one layer of a unit (fp32).

    With ``residual`` the unit's input stays live until the addition, so it is added on top.
    """
    largest = max((float_bytes(x) + float_bytes(y) for _, _, x, y in walk(layers, in_shape)), default=0)
    return largest + (float_bytes(in_shape) if residual else 0)


@dataclass(frozen=True)
class StepPeakEstimate:
    """Predicted peak bytes of one steady-state training step, by component. An estimate.

    See :func:`predict_step_peak` for the formula. ``model_bytes`` is what the model and its
    training add to a process; ``total`` adds ``runtime`` (the interpreter and framework baseline,
    supplied by the caller: it is a property of the runtime and platform, not of shapes).
    """

    weights: int
    gradients: int
    optimizer_state: int
    input_batch: int
    saved_activations: int
    transient_frozen: int
    transient_trained: int
    runtime: int = 0
    optimizer: str = "adam"

    @property
    def activations(self) -> int:
        """The activation term: ``T_frozen + ALLOCATOR_SLACK * (S + T_trained)``."""
        return self.transient_frozen + int(ALLOCATOR_SLACK * (self.saved_activations + self.transient_trained))

    @property
    def model_bytes(self) -> int:
        """What the model and its training add to a process (everything but ``runtime``)."""
        return LOAD_FACTOR * self.weights + self.gradients + self.optimizer_state + self.input_batch + self.activations

    @property
    def total(self) -> int:
        """The predicted peak of the process."""
        return self.runtime + self.model_bytes

    def to_dict(self) -> dict[str, Any]:
        """Plain values, the derived terms included."""
        return {**asdict(self), "activations": self.activations, "model_bytes": self.model_bytes, "total": self.total}

    def summary(self, size: Callable[[int], str]) -> str:
        """One line for the planner (``size`` formats bytes)."""
        return (
            f"saved activations {size(self.saved_activations)}, weights+grads+{self.optimizer} state "
            f"{size(self.weights + self.gradients + self.optimizer_state)}"
        )


def predict_step_peak(
    model: nn.Module,
    policy: TrainPolicy,
    *,
    batch_size: int,
    image_size: int,
    optimizer: str = "adam",
    runtime_bytes: int = 0,
    rows: Sequence[UnitPrediction] | None = None,
) -> StepPeakEstimate:
    """Estimate the peak resident memory of a steady-state training step of ``model`` under ``policy``.

    A pure function of the structure (shapes, which parameters train) and the policy; nothing
    runs. The formula, all tensors fp32::

        peak = runtime + 2 W + G + O + X + T_frozen + 1.25 (S + 2 T_trained)

    * ``W``: every parameter and buffer of the prepared network (frozen ones are resident too),
      counted :data:`LOAD_FACTOR` = 2 times: ``prepare`` deep-copies the loaded network and the
      allocator keeps most of the freed original.
    * ``G``: gradients of the trained parameters (as many bytes as those parameters). They are
      alive during the next step's forward (the trainer zeroes them just before backward).
    * ``O``: optimizer state, :func:`edgetl.train.optim.state_floats` per trained parameter (Adam:
      2, SGD with momentum: 1); Adam's per-tensor step counters are ignored (a few bytes each).
    * ``X``: the input batch (N x 3 x S x S floats) and its int64 labels.
    * ``S``: bytes saved for backward (:func:`edgetl.profiler.predict.predict_units`, exact
      against autograd). All of it is alive at the end of the forward pass.
    * ``T_frozen``: the frozen bottom's working set, the largest input + output of one layer
      (plus a residual block's input). Added, not maxed with the rest: the allocator keeps those
      freed pages and they are not all reused by the trained part.
    * ``T_trained``: the same for the trained part, doubled (:data:`BACKWARD_FACTOR`): a layer's
      backward holds the incoming gradient, the outgoing one and kernel temporaries next to what is
      still saved.
    * ``1.25`` (:data:`ALLOCATOR_SLACK`): heap fragmentation over the live trained-part bytes.
    * ``runtime``: the interpreter + framework baseline, which shapes cannot tell (pass it in: a
      device profile's ``runtime_overhead``, or
      :func:`edgetl.profiler.process_peak.calibrate_runtime` on the device).

    Why it is an estimate: ``2 W``, ``T_frozen`` and ``1.25`` stand for allocator behaviour
    (glibc malloc keeps freed memory and fragments), calibrated against child-process peak RSS on
    x86-64 Linux (glibc, torch 2.13 CPU; 20 configurations of MobileNetV2/V3 and EfficientNet-B0,
    K 1-17, batch 2-64, 64-224 px): measured/predicted total was 0.85-1.12. Kernel scratch
    buffers (oneDNN) and autograd's graph nodes are not modelled. Summing ``G + O`` with the
    activations is conservative for the very first step (nothing of them exists yet).

    ``rows``: :func:`~edgetl.profiler.predict.predict_units` for these very settings, when the
    caller has them already (the planner and the report), to skip predicting them again.
    """
    check_optimizer(optimizer)
    if batch_size < 1 or image_size < 8:
        raise ConfigError(f"batch size must be >= 1 and image size >= 8, got {batch_size} and {image_size}")
    rows = list(rows) if rows is not None else predict_units(model, policy, batch_size=batch_size, image_size=image_size)
    params = param_bytes(model, policy)
    units = dict(feature_units(model))
    frozen = trained = 0
    for row in rows:
        if row.name == HEAD:
            ws = layer_working_set(head_layers(model), row.in_shape)
        else:
            unit = units[row.name]
            ws = layer_working_set(unit_layers(row.name, unit), row.in_shape, residual=bool(getattr(unit, "use_res_connect", False)))
        if row.role == "frozen":
            frozen = max(frozen, ws)
        else:
            trained = max(trained, ws)
    return StepPeakEstimate(
        weights=params.weights,
        gradients=params.trainable,
        optimizer_state=state_floats(optimizer) * params.trainable,
        input_batch=float_bytes((batch_size, 3, image_size, image_size)) + batch_size * LABEL_BYTES,
        saved_activations=sum(r.nbytes for r in rows),
        transient_frozen=frozen,
        transient_trained=BACKWARD_FACTOR * trained,
        runtime=runtime_bytes,
        optimizer=optimizer,
    )


def trainable_shapes_problem(rows: Sequence[UnitPrediction]) -> str | None:
    """Why a configuration cannot train, or None.

    A train-mode batch norm needs more than one value per channel: batch x H x W > 1 at every
    trained unit's output (the smallest map the unit's last norm sees).
    """
    for row in rows:
        if row.role in ("block", "stage") and len(row.out_shape) == 4:
            n, _, h, w = row.out_shape
            if n * h * w <= 1:
                return (
                    f"{row.name} trains a batch norm on a {n}x{h}x{w} map (batch x height x width), which has one value "
                    "per channel; use a batch size of at least 2 or a larger image size"
                )
    return None
