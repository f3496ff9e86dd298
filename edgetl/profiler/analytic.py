"""Predicted bytes stored for backward: pure functions of layer specs, input shapes and policy.

Nothing here runs a model. The rules are those of PyTorch's autograd on CPU (held against
:mod:`edgetl.profiler.measure` by the tests, to the byte), with every saved tensor counted once
(tensors sharing storage are one tensor):

* conv / linear with a trainable weight: its input (dW needs it). Under a compressed
  ``saved_precision`` a MobileTL block's convs (not its squeeze-excitation's) keep a compressed copy
  instead (:func:`edgetl.nn.compress.compressed_nbytes`: bf16 2 bytes an element, int8 1 byte an
  element + a 4-byte scale per channel), so does its squeeze-excitation's gating multiply, and an
  activation feeding such a conv or multiply keeps a packed mask.
* train-mode batch norm: its input, plus the batch mean and inverse std (2 x C floats).
* MobileTL's shift-only norm: nothing (dx = s * dy, dbeta = sum dy).
* activation, ordinary autograd: ReLU and Sigmoid keep their *output*, which their consumer keeps
  too (so nothing extra); ReLU6, Hard-Swish, SiLU and Hard-Sigmoid keep a full copy of their input.
* activation, MobileTL: ``reuse`` keeps the output (shared with the consumer); ``packed`` keeps a
  bit-packed mask, ceil(numel / 8) bytes; squeeze-excitation gates keep their output.
* squeeze-excitation: fc1 keeps the pooled input (N x C), fc2 its input (N x C/4), the gating
  multiply the block's expanded map and the gate (N x C).
* zero padding (fixed or TF "SAME"): nothing (its backward is a slice), but the next conv keeps
  the padded tensor.
* layer scale (timm's ``LayerScale2d``, ``x * gamma`` with ``gamma`` trained): its input.
* global average pooling to 1 x 1 (a mean) and residual additions: nothing.
* dropout / stochastic depth in train mode: their float noise (N x F, resp. N x 1 x 1 x 1).

:func:`paper_saved_for_backward` is the other accounting: the paper's (TinyTL's) analytic
convention, used to reproduce MobileTL's published per-block figures.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from edgetl.models.blocks import LayerSpec
from edgetl.nn.compress import compressed_nbytes
from edgetl.nn.ops import packed_numel
from edgetl.profiler.shapes import Shape, float_bytes, unit_output_shape, walk
from edgetl.train.policy import mask_storage, shift_only_norms

#: activations whose autograd formula keeps the output (shared with the consumer)
KEEPS_OUTPUT = frozenset({"relu", "sigmoid"})


@dataclass(frozen=True)
class Saved:
    """One tensor stored for backward: what it is and its size."""

    layer: int  # index into the unit's layers
    what: str
    shape: Shape
    nbytes: int
    precision: str = "fp32"  # "bf16"/"int8": kept compressed (saved_precision), decompressed to fp32 in backward


def total_bytes(items: Sequence[Saved]) -> int:
    """Bytes of all ``items``."""
    return sum(item.nbytes for item in items)


def _shift_only(layers: Sequence[LayerSpec], mobiletl: bool) -> set[int]:
    """Indices of the norms MobileTL makes shift-only (none without MobileTL)."""
    return set(shift_only_norms([i for i, layer in enumerate(layers) if layer.op == "norm"])) if mobiletl else set()


class _Tape:
    """Symbolic tensors: an id per distinct storage, each saved once."""

    def __init__(self) -> None:
        self._ids = itertools.count()
        self.saved_ids: set[int] = set()
        self.items: list[Saved] = []

    def new(self) -> int:
        return next(self._ids)

    def save(self, tid: int, layer: int, what: str, shape: Shape, nbytes: int | None = None, precision: str = "fp32") -> None:
        if tid in self.saved_ids:
            return
        self.saved_ids.add(tid)
        self.items.append(Saved(layer, what, shape, float_bytes(shape) if nbytes is None else nbytes, precision))


def _activation(tape: _Tape, i: int, kind: str, shape: Shape, masked: bool, mask: str, what: str) -> int:
    """Record what an activation keeps; returns its output's id."""
    out = tape.new()
    if masked and (mask == "reuse" or kind in ("hardsigmoid", "sigmoid")):
        tape.save(out, i, f"{what} output (mask read off it)", shape)
    elif masked:
        tape.save(tape.new(), i, f"{what} bit-packed mask", shape, packed_numel(math.prod(shape)))
    elif kind in KEEPS_OUTPUT:
        tape.save(out, i, f"{what} output", shape)
    else:
        tape.save(tape.new(), i, f"{what} input", shape)
    return out


def saved_for_backward(
    layers: Sequence[LayerSpec],
    in_shape: Shape,
    *,
    mobiletl: bool = False,
    activation_mask: str = "reuse",
    training: bool = True,
    saved_precision: str = "fp32",
    input_saved: bool = False,
) -> tuple[list[Saved], Shape]:
    """What training one unit (a block, a conv stage, the head) stores for backward.

    Args:
        layers: the unit's layers in forward order (:func:`edgetl.profiler.units.unit_layers`).
        in_shape: the unit's input shape.
        mobiletl: apply MobileTL to this unit (:func:`edgetl.train.policy.uses_mobiletl`): its
            shift-only norms keep nothing and activations are masked. False: ordinary autograd.
        activation_mask: ``"reuse"`` or ``"packed"`` (see :class:`edgetl.TrainPolicy`).
        training: train mode (dropout and stochastic depth active).
        saved_precision: ``"fp32"``, ``"bf16"`` or ``"int8"`` (see :class:`edgetl.TrainPolicy`);
            applies with ``mobiletl`` only.
        input_saved: the unit before already keeps this unit's input (its output, see
            :func:`keeps_output`): a layer saving the input adds no storage.

    Returns:
        The saved tensors and the unit's output shape.
    """
    tape = _Tape()
    x = tape.new()
    if input_saved:
        tape.saved_ids.add(x)
    shift_only = _shift_only(layers, mobiletl)
    compressed = mobiletl and saved_precision != "fp32"
    # whether layer i's output goes into a conv, through zero padding or not
    ops_after = [next((later.op for later in layers[i + 1 :] if later.op not in ("pad", "pad_same")), None) for i in range(len(layers))]
    for i, layer, shape, _ in walk(layers, in_shape):
        if layer.op == "conv" and compressed:
            tape.save(tape.new(), i, f"conv input ({saved_precision})", shape, compressed_nbytes(shape, saved_precision), saved_precision)
            x = tape.new()
        elif layer.op in ("conv", "linear"):
            tape.save(x, i, f"{layer.op} input", shape)
            x = tape.new()
        elif layer.op == "scale":
            tape.save(x, i, "layer-scale input", shape)
            x = tape.new()
        elif layer.op == "norm":
            if i not in shift_only:
                tape.save(x, i, "batch-norm input", shape)
                tape.save(tape.new(), i, "batch-norm mean, inverse std", (2 * shape[1],))
            x = tape.new()
        elif layer.op == "act":
            # a conv or a squeeze-excitation's gating multiply stores it compressed
            mask = mask_storage(activation_mask, saved_precision if compressed else "fp32", ops_after[i] in ("conv", "se"))
            x = _activation(tape, i, layer.kind, shape, mobiletl, mask, "activation")
        elif layer.op == "se":
            n, c = shape[0], shape[1]
            pooled, squeezed = (n, c, 1, 1), (n, layer.se_squeeze, 1, 1)
            tape.save(tape.new(), i, "SE fc1 input (pooled)", pooled)
            s = _activation(tape, i, layer.se_act, squeezed, mobiletl, activation_mask, "SE activation")
            tape.save(s, i, "SE fc2 input", squeezed)
            gate = _activation(tape, i, layer.se_gate, pooled, mobiletl, activation_mask, "SE gate")
            if compressed:
                nbytes = compressed_nbytes(shape, saved_precision)
                tape.save(tape.new(), i, f"SE multiply input ({saved_precision})", shape, nbytes, saved_precision)
            else:
                tape.save(x, i, "SE multiply input", shape)
            tape.save(gate, i, "SE multiply gate", pooled)
            x = tape.new()
        elif layer.op in ("drop_path", "dropout"):
            if training and layer.drop_prob > 0:
                noise = (shape[0],) + (1,) * (len(shape) - 1) if layer.op == "drop_path" else shape
                tape.save(tape.new(), i, f"{layer.op} noise", noise)
                x = tape.new()
        else:  # pad, pool (a mean), residual: keep nothing, produce a new tensor
            x = tape.new()
    return tape.items, unit_output_shape(layers, in_shape)


def keeps_output(layers: Sequence[LayerSpec], *, mobiletl: bool = False, activation_mask: str = "reuse") -> bool:
    """Whether a trained unit's saved tensors include its own output: it ends with an activation
    whose backward reads its output (ReLU, Sigmoid; MobileTL's ``reuse`` masks). The next unit
    then stores that same storage again at no cost (timm's networks split the stem and plain conv
    stages into units that end this way; :func:`saved_for_backward` with ``input_saved``)."""
    if not layers or layers[-1].op != "act":
        return False
    kind = layers[-1].kind
    return kind in KEEPS_OUTPUT or (mobiletl and (activation_mask == "reuse" or kind in ("hardsigmoid", "sigmoid")))


# --- the paper's accounting ----------------------------------------------------------------------

#: activations TinyTL's profiler stores as a 1-bit mask even under ordinary fine-tuning
PAPER_ONE_BIT = frozenset({"relu", "relu6"})


def paper_saved_for_backward(layers: Sequence[LayerSpec], in_shape: Shape, *, mobiletl: bool = False) -> tuple[list[Saved], Shape]:
    """What one unit stores for backward under the paper's (TinyTL's) accounting, not PyTorch's.

    MobileTL's per-block figures (-46.3% for a MobileNetV2 IRB, -53.3% for a MobileNetV3 IRB) follow
    the analytic convention of TinyTL's ``memory_cost_profiler``: every layer counts its own input,
    nothing is shared or deduplicated, and

    * conv / linear with a trainable weight: the fp32 input;
    * batch norm that trains its scale (vanilla, and MobileTL's last norm): the fp32 input, no
      statistics; MobileTL's shift-only norms: nothing;
    * ReLU / ReLU6: 1 bit per element (``ceil(numel / 8)`` bytes), as their derivative is binary;
      smooth activations (Hard-Swish, SiLU, ...): the fp32 input; under MobileTL every non-gate
      activation is a 1-bit mask;
    * squeeze-excitation: its fp32 input map (the gating multiply needs it), the pooled and squeezed
      vectors, and its gate (fp32 in both methods: it is a per-channel vector, and the paper does
      not say what MobileTL does with it);
    * padding, pooling, residual additions, dropout and stochastic depth: nothing.

    Where this differs from :func:`saved_for_backward` (which is what PyTorch really keeps, held
    against autograd to the byte): PyTorch's ReLU6 and Hard-Swish keep a full fp32 copy of their
    input and train-mode batch norm also keeps 2 x C statistics, so vanilla blocks cost more under
    PyTorch and MobileTL's relative saving is larger; MobileTL's ``reuse`` masks cost nothing in
    edgetl (they are read off a tensor the next conv keeps anyway) but 1 bit here.
    """
    items: list[Saved] = []
    shift_only = _shift_only(layers, mobiletl)

    def fp32(i: int, what: str, s: Shape) -> None:
        items.append(Saved(i, what, s, float_bytes(s)))

    def act(i: int, kind: str, s: Shape, what: str) -> None:
        if mobiletl or kind in PAPER_ONE_BIT:
            items.append(Saved(i, f"{what} 1-bit mask", s, packed_numel(math.prod(s))))
        else:
            fp32(i, f"{what} input", s)

    for i, layer, shape, _ in walk(layers, in_shape):
        if layer.op in ("conv", "linear"):
            fp32(i, f"{layer.op} input", shape)
        elif layer.op == "norm" and i not in shift_only:
            fp32(i, "batch-norm input", shape)
        elif layer.op == "scale":
            fp32(i, "layer-scale input", shape)
        elif layer.op == "act":
            act(i, layer.kind, shape, "activation")
        elif layer.op == "se":
            pooled, squeezed = (shape[0], shape[1], 1, 1), (shape[0], layer.se_squeeze, 1, 1)
            fp32(i, "SE input", shape)
            fp32(i, "SE fc1 input (pooled)", pooled)
            act(i, layer.se_act, squeezed, "SE activation")
            fp32(i, "SE fc2 input", squeezed)
            fp32(i, "SE gate", pooled)
        # padding, pooling, residual additions, dropout and stochastic depth: nothing
    return items, unit_output_shape(layers, in_shape)
