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
from edgetl.nn.compress import decompress_chunk
from edgetl.profiler.analytic import Saved, total_bytes
from edgetl.profiler.predict import UnitPrediction, predict_units
from edgetl.profiler.shapes import FLOAT_BYTES, Shape, float_bytes, walk
from edgetl.profiler.units import HEAD, head_layers, unit_layers
from edgetl.train.bottom import frozen_run
from edgetl.train.optim import check_optimizer, state_floats
from edgetl.train.policy import TrainPolicy, shift_only_norms, uses_mobiletl

#: weights are resident twice after loading: prepare() deep-copies the loaded network, and the
#: allocator keeps most of the freed original (measured: RSS after load - baseline ~ 2.5-3 x W)
LOAD_FACTOR = 2
#: a convolution's kernel scratch, in units of the larger of its input and output (oneDNN's reorder)
CONV_SCRATCH = 1
#: int64 class labels
LABEL_BYTES = 8
#: fp32 copies of one chunk (:func:`edgetl.nn.compress.decompress_chunk` images) of a compressed
#: stored input alive at once while backward decompresses it (:mod:`edgetl.nn.compress`): bf16 ->
#: fp32 is one; int8 is one too (the integers converted into one fp32 chunk, then scaled in place:
#: :func:`edgetl.nn.compress.dequantize_int8`)
DECOMPRESS_COPIES = {"bf16": 1, "int8": 1}
#: the phases of a step, as :func:`edgetl.train.step.train_step` and the trainer's evaluation run them
PHASES: tuple[str, ...] = ("bottom forward", "top forward", "backward", "optimizer step", "evaluation")


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


def layer_working_set(
    layers: Sequence[LayerSpec],
    in_shape: Shape,
    *,
    residual: bool = False,
    kernel_scratch: bool = False,
    input_held: bool = False,
    pad_held: bool = True,
) -> int:
    """Largest ``input + output`` bytes of any one layer of a unit (fp32).

    With ``residual`` the unit's input stays live until the addition, so it is added on top. With
    ``kernel_scratch`` a convolution also counts :data:`CONV_SCRATCH` x the larger of its input and
    output: oneDNN reorders one of them into its blocked layout (measured with the allocator's own
    events: a 1x1 conv 16->96 of 2 + 12 MiB peaks at 26 MiB, a depthwise 3x3 of 12 + 12 at 36).
    ``input_held``: the unit's caller holds its input until the unit returns (a unit called whole),
    so it counts at every layer after the first. ``pad_held``: a zero padding and the conv it pads
    form one call, whose caller holds the unpadded input until the conv returns (False when the
    frozen bottom runs them as two steps, :mod:`edgetl.train.bottom`).
    """
    largest = held = 0
    for i, (_, layer, x, y) in enumerate(walk(layers, in_shape)):
        scratch = CONV_SCRATCH * max(float_bytes(x), float_bytes(y)) if kernel_scratch and layer.op == "conv" else 0
        caller = float_bytes(in_shape) if input_held and i > 0 else 0
        largest = max(largest, held + caller + float_bytes(x) + float_bytes(y) + scratch)
        held = float_bytes(x) if kernel_scratch and pad_held and layer.op in ("pad", "pad_same") else 0
    return largest + (float_bytes(in_shape) if residual else 0)


def _unit_working_set(
    model: nn.Module, units: dict[str, nn.Module], name: str, in_shape: Shape, *, frozen: bool = False, kernel_scratch: bool = True
) -> int:
    if name == HEAD:
        return layer_working_set(head_layers(model), in_shape, kernel_scratch=kernel_scratch)
    unit = units[name]
    layers = unit_layers(name, unit)
    if frozen:  # as edgetl.train.bottom runs it: layer by layer, or called whole
        run = frozen_run(unit)
        return layer_working_set(layers, in_shape, kernel_scratch=True, input_held=run != "unrolled", pad_held=run == "whole")
    residual = bool(getattr(unit, "use_res_connect", False) or getattr(unit, "has_skip", False))  # torchvision / timm
    return layer_working_set(layers, in_shape, residual=residual, kernel_scratch=kernel_scratch)


def _with_batch(shape: Shape, batch: int) -> Shape:
    return (batch, *shape[1:])


@dataclass(frozen=True)
class StepPeakEstimate:
    """Predicted live tensor bytes of one steady-state training step, phase by phase. An estimate.

    The phases are those of :func:`edgetl.train.step.train_step` and the trainer's evaluation
    (measured by :func:`edgetl.profiler.timeline.measure_step_timeline`); each is the bytes alive
    on top of ``base`` = weights + optimizer state + input batch. See :func:`predict_step_peak`.
    ``model_bytes`` is what the model and its training add to a process (the live peak plus what
    the allocator keeps of the loaded copy of the weights); ``total`` adds ``runtime`` (the
    interpreter and framework, supplied by the caller).
    """

    weights: int
    gradients: int
    optimizer_state: int
    input_batch: int
    saved_activations: int
    bottom_working_set: int  # the frozen bottom's largest layer (at bottom_chunk), and the features buffer
    forward_stored: int  # at the top forward's peak: what the units so far store for backward
    forward_working_set: int  # ... and the running unit's working set
    backward_stored: int  # at the backward's peak: what is still stored
    backward_gradients: int  # ... the gradients of the units above
    backward_temporaries: int  # ... and the running unit's gradients and kernel scratch
    optimizer_temporaries: int
    evaluation_working_set: int  # a no-grad forward of a batch (the trainer's evaluation)
    runtime: int = 0
    optimizer: str = "adam"

    @property
    def base(self) -> int:
        """Alive through the whole step: weights, optimizer state, the input batch."""
        return self.weights + self.optimizer_state + self.input_batch

    def breakdown(self, phase: str) -> dict[str, int]:
        """What is alive at the peak of ``phase``, by component (they sum to the phase's peak)."""
        base = {"weights": self.weights, "optimizer state": self.optimizer_state, "input batch": self.input_batch}
        extra = {
            "bottom forward": {"frozen-bottom working set": self.bottom_working_set},
            "top forward": {"stored for backward": self.forward_stored, "forward working set": self.forward_working_set},
            "backward": {
                "stored for backward": self.backward_stored,
                "gradients": self.backward_gradients,
                "backward temporaries": self.backward_temporaries,
            },
            "optimizer step": {"gradients": self.gradients, "optimizer temporaries": self.optimizer_temporaries},
            "evaluation": {"evaluation working set": self.evaluation_working_set},
        }[phase]
        return {**base, **extra}

    def phases(self) -> dict[str, int]:
        """Predicted live bytes at the peak of each phase."""
        return {phase: sum(self.breakdown(phase).values()) for phase in PHASES}

    @property
    def live_peak(self) -> int:
        """The most live tensor bytes at any instant of the step."""
        return max(self.phases().values())

    @property
    def step_delta(self) -> int:
        """What the steps add to a process whose model and input batch are loaded: the live peak
        less the weights and the input batch (held against :attr:`ProcessPeak.warm_delta
        <edgetl.profiler.process_peak.ProcessPeak.warm_delta>`)."""
        return self.live_peak - self.weights - self.input_batch

    @property
    def peak_phase(self) -> str:
        phases = self.phases()
        return max(phases, key=phases.__getitem__)

    @property
    def model_bytes(self) -> int:
        """What the model and its training add to a process: the live peak, and the loaded copy of
        the weights that ``prepare`` copied from (freed, but kept by the allocator)."""
        return self.live_peak + (LOAD_FACTOR - 1) * self.weights

    @property
    def total(self) -> int:
        """The predicted peak of the process."""
        return self.runtime + self.model_bytes

    def to_dict(self) -> dict[str, Any]:
        """Plain values, the derived terms included."""
        return {
            **asdict(self),
            "phases": self.phases(),
            "live_peak": self.live_peak,
            "step_delta": self.step_delta,
            "peak_phase": self.peak_phase,
            "model_bytes": self.model_bytes,
            "total": self.total,
        }

    def summary(self, size: Callable[[int], str]) -> str:
        """One line for the planner (``size`` formats bytes)."""
        return (
            f"peak in {self.peak_phase}; saved activations {size(self.saved_activations)}, weights+grads+{self.optimizer} state "
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
    """Estimate the live bytes of a steady-state training step of ``model`` under ``policy``.

    A pure function of the structure (shapes, which parameters train) and the policy; nothing
    runs. All tensors fp32; ``base`` = ``W + O + X`` is alive throughout:

    * ``W``: every parameter and buffer of the prepared network; ``O``: optimizer state,
      :func:`edgetl.train.optim.state_floats` per trained parameter; ``X``: the input batch and
      its labels.
    * bottom forward: the frozen bottom's largest layer working set (:func:`layer_working_set`
      with kernel scratch, a residual block's input included) at ``policy.bottom_chunk`` images,
      plus the full features buffer when chunked.
    * top forward: over the trained units in order, what the units so far store for backward
      (``S``, :func:`edgetl.profiler.predict.predict_units`, exact) plus the unit's working set.
    * backward: over the trained units from the top, what is still stored (the units below and
      this one; with ``policy.recompute``, what the unit stores again while it is recomputed) +
      the gradients of the units above + the unit's working set (its incoming and outgoing
      gradients, kernel scratch); with ``policy.saved_precision``, at least the gradients without
      the kernel scratch + the fp32 copies of one chunk of its largest compressed input while it
      is decompressed (:data:`DECOMPRESS_COPIES` x :func:`edgetl.nn.compress.decompress_chunk`
      images: the weight gradient is summed chunk by chunk after the input gradient is done).
    * optimizer step: the gradients ``G`` + the update's temporaries (Adam: two of the largest
      trained tensor, ``sqrt`` and the division; SGD: one, with weight decay's sum).
    * evaluation: a no-grad forward of one batch: the largest working set of any unit.

    Gradients are freed right after the optimizer step (:func:`edgetl.train.step.train_step`), so
    they are not alive in the forward phases. Held within 10% of the live bytes measured by
    :func:`edgetl.profiler.timeline.measure_step_timeline` for every model of the registry (tests).
    Not modelled: autograd's graph nodes, per-op bookkeeping (a few hundred KiB).

    ``rows``: :func:`~edgetl.profiler.predict.predict_units` for these very settings, when the
    caller has them already (the planner and the report), to skip predicting them again.
    """
    check_optimizer(optimizer)
    if batch_size < 1 or image_size < 8:
        raise ConfigError(f"batch size must be >= 1 and image size >= 8, got {batch_size} and {image_size}")
    rows = list(rows) if rows is not None else predict_units(model, policy, batch_size=batch_size, image_size=image_size)
    params = param_bytes(model, policy)
    units = dict(feature_units(model))
    chunk = min(policy.bottom_chunk or batch_size, batch_size)
    frozen = [r for r in rows if r.role == "frozen"]
    trained = [r for r in rows if r.role != "frozen"]

    bottom = max((_unit_working_set(model, units, r.name, _with_batch(r.in_shape, chunk), frozen=True) for r in frozen), default=0)
    if frozen and chunk < batch_size:
        bottom += float_bytes(frozen[-1].out_shape)  # the features buffer the chunks are written into
    evaluation = max([bottom] + [_unit_working_set(model, units, r.name, r.in_shape) for r in trained])

    forward, backward, stored = (0, 0), (0, 0, 0), 0
    ws = [_unit_working_set(model, units, r.name, r.in_shape) for r in trained]
    grads = _trained_param_bytes(model, policy, [r.name for r in trained])
    for r, w in zip(trained, ws, strict=True):
        stored += r.nbytes
        forward = max(forward, (stored, w), key=sum)
    still, above = stored, 0
    for r, w, g in reversed(list(zip(trained, ws, grads, strict=True))):
        # a recomputed unit (policy.recompute) stores its tensors again while its backward runs;
        # a decompressed chunk is alive while a conv's weight gradient is summed over chunks, after
        # its input gradient and that kernel's full-size scratch are done: beside the layer's
        # incoming and outgoing gradients, not on top of the full working set
        temporaries = w
        if decompressed := _decompressed(r.saved + r.recomputed):
            temporaries = max(w, _unit_working_set(model, units, r.name, r.in_shape, kernel_scratch=False) + decompressed)
        backward = max(backward, (still + total_bytes(r.recomputed), above, temporaries), key=sum)
        still -= r.nbytes
        above += g
    largest = max((t.numel() * t.element_size() for _, t in _trained_tensors(model, policy)), default=0)
    return StepPeakEstimate(
        weights=params.weights,
        gradients=params.trainable,
        optimizer_state=state_floats(optimizer) * params.trainable,
        input_batch=float_bytes((batch_size, 3, image_size, image_size)) + batch_size * LABEL_BYTES,
        saved_activations=stored,
        bottom_working_set=bottom,
        forward_stored=forward[0],
        forward_working_set=forward[1],
        backward_stored=backward[0],
        backward_gradients=backward[1],
        backward_temporaries=backward[2],
        optimizer_temporaries=(2 if optimizer in ("adam", "adamw") else 1) * largest,
        evaluation_working_set=evaluation,
        runtime=runtime_bytes,
        optimizer=optimizer,
    )


def _decompressed(saved: Sequence[Saved]) -> int:
    """The fp32 bytes alive while backward decompresses ``saved``'s compressed tensors: backward
    decompresses one batch chunk at a time (the chunk rule is :func:`edgetl.nn.compress.decompress_chunk`,
    the very function backward uses), so the largest chunk's copies."""
    chunks = [(s.precision, _with_batch(s.shape, decompress_chunk(s.shape))) for s in saved if s.precision != "fp32"]
    return max((DECOMPRESS_COPIES[precision] * float_bytes(shape) for precision, shape in chunks), default=0)


def _trained_param_bytes(model: nn.Module, policy: TrainPolicy, names: Sequence[str]) -> list[int]:
    """Bytes of the trained parameters of each named unit (the head: the classifier)."""
    units = dict(feature_units(model))
    out = []
    for name in names:
        unit = model.classifier if name == HEAD else units[name]
        out.append(unit_param_bytes(unit, trains=True, mobiletl=name != HEAD and uses_mobiletl(policy, unit)).trainable)
    return out


def _trained_tensors(model: nn.Module, policy: TrainPolicy) -> list[tuple[str, Tensor]]:
    """The parameters that train under ``policy`` (as in ``prepare``), without preparing a copy."""
    units = feature_units(model)
    trained_from = first_trained_unit(units, policy.blocks)
    out = [(f"{name}.{n}", p) for name, unit in units[trained_from:] for n, p in unit.named_parameters()]
    return out + [(f"classifier.{n}", p) for n, p in model.classifier.named_parameters()]


def trainable_shapes_problem(rows: Sequence[UnitPrediction]) -> str | None:
    """Why a configuration cannot train, or None.

    A train-mode batch norm needs more than one value per channel: batch x H x W > 1 at every
    trained unit's output (the smallest map the unit's last norm sees).
    """
    for row in rows:
        if row.role == "head" and row.in_shape[0] <= 1 and any(s.what == "batch-norm input" for s in row.saved):
            # timm's MobileNetV4 normalises the pooled features (its head norm) in the classifier
            return f"the classifier trains a batch norm on a batch of {row.in_shape[0]}; use a batch size of at least 2"
        if row.role in ("block", "stage") and len(row.out_shape) == 4:
            n, _, h, w = row.out_shape
            if n * h * w <= 1:
                return (
                    f"{row.name} trains a batch norm on a {n}x{h}x{w} map (batch x height x width), which has one value "
                    "per channel; use a batch size of at least 2 or a larger image size"
                )
    return None
