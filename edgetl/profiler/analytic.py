"""Predicted bytes stored for backward: pure functions of layer specs, input shapes and policy.

Nothing here runs a model. The rules are those of PyTorch's autograd on CPU (held against
:mod:`edgetl.profiler.measure` by the tests, to the byte), with every saved tensor counted once
(tensors sharing storage are one tensor):

* conv / linear with a trainable weight: its input (dW needs it).
* train-mode batch norm: its input, plus the batch mean and inverse std (2 x C floats).
* MobileTL's shift-only norm: nothing (dx = s * dy, dbeta = sum dy).
* activation, ordinary autograd: ReLU and Sigmoid keep their *output*, which their consumer keeps
  too (so nothing extra); ReLU6, Hard-Swish, SiLU and Hard-Sigmoid keep a full copy of their input.
* activation, MobileTL: ``reuse`` keeps the output (shared with the consumer); ``packed`` keeps a
  bit-packed mask, ceil(numel / 8) bytes; squeeze-excitation gates keep their output.
* squeeze-excitation: fc1 keeps the pooled input (N x C), fc2 its input (N x C/4), the gating
  multiply the block's expanded map and the gate (N x C).
* zero padding: nothing (its backward is a slice), but the next conv keeps the padded tensor.
* global average pooling to 1 x 1 (a mean) and residual additions: nothing.
* dropout / stochastic depth in train mode: their float noise (N x F, resp. N x 1 x 1 x 1).

:func:`paper_saved_for_backward` is the other accounting: the paper's (TinyTL's) analytic
convention, used to reproduce MobileTL's published per-block figures.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from edgetl.models.blocks import LayerSpec
from edgetl.nn.ops import packed_numel

Shape = tuple[int, ...]
FLOAT_BYTES = 4
#: activations whose autograd formula keeps the output (shared with the consumer)
KEEPS_OUTPUT = frozenset({"relu", "sigmoid"})


@dataclass(frozen=True)
class Saved:
    """One tensor stored for backward: what it is and its size."""

    layer: int  # index into the unit's layers
    what: str
    shape: Shape
    nbytes: int


def _numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def conv_output_shape(layer: LayerSpec, shape: Shape) -> Shape:
    """Output shape of a 2-D conv ``layer`` applied to ``shape`` (N, C, H, W)."""
    n, c, h, w = shape
    if c != layer.in_channels:
        raise ValueError(f"conv expects {layer.in_channels} input channels, got shape {shape}")
    span = layer.dilation * (layer.kernel - 1) + 1
    ho = (h + 2 * layer.padding - span) // layer.stride + 1
    wo = (w + 2 * layer.padding - span) // layer.stride + 1
    return (n, layer.out_channels, ho, wo)


class _Tape:
    """Symbolic tensors: an id per distinct storage, each saved once."""

    def __init__(self) -> None:
        self._ids = itertools.count()
        self.saved_ids: set[int] = set()
        self.items: list[Saved] = []

    def new(self) -> int:
        return next(self._ids)

    def save(self, tid: int, layer: int, what: str, shape: Shape, nbytes: int | None = None) -> None:
        if tid in self.saved_ids:
            return
        self.saved_ids.add(tid)
        self.items.append(Saved(layer, what, shape, _numel(shape) * FLOAT_BYTES if nbytes is None else nbytes))


def _activation(tape: _Tape, i: int, kind: str, x: int, shape: Shape, masked: bool, mask: str, what: str) -> int:
    out = tape.new()
    if masked and (mask == "reuse" or kind in ("hardsigmoid", "sigmoid")):
        tape.save(out, i, f"{what} output (mask read off it)", shape)
    elif masked:
        tape.save(tape.new(), i, f"{what} bit-packed mask", shape, packed_numel(_numel(shape)))
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
) -> tuple[list[Saved], Shape]:
    """What training one unit (a block, a conv stage, the head) stores for backward.

    Args:
        layers: the unit's layers in forward order (:func:`edgetl.models.blocks.layer_specs`).
        in_shape: the unit's input shape.
        mobiletl: apply MobileTL to this unit (an inverted-residual block): every norm but the last
            is shift-only and activations are masked. False: ordinary autograd.
        activation_mask: ``"reuse"`` or ``"packed"`` (see :class:`edgetl.TrainPolicy`).
        training: train mode (dropout and stochastic depth active).

    Returns:
        The saved tensors and the unit's output shape.
    """
    tape = _Tape()
    x, shape = tape.new(), tuple(in_shape)
    norms = [i for i, layer in enumerate(layers) if layer.op == "norm"]
    last_norm = norms[-1] if norms else -1
    for i, layer in enumerate(layers):
        if layer.op == "conv":
            tape.save(x, i, "conv input", shape)
            x, shape = tape.new(), conv_output_shape(layer, shape)
        elif layer.op == "linear":
            if shape[-1] != layer.in_channels:
                raise ValueError(f"linear expects {layer.in_channels} features, got shape {shape}")
            tape.save(x, i, "linear input", shape)
            x, shape = tape.new(), shape[:-1] + (layer.out_channels,)
        elif layer.op == "norm":
            if not (mobiletl and i != last_norm):  # shift-only norms keep nothing
                tape.save(x, i, "batch-norm input", shape)
                tape.save(tape.new(), i, "batch-norm mean, inverse std", (2 * shape[1],))
            x = tape.new()
        elif layer.op == "act":
            x = _activation(tape, i, layer.kind, x, shape, mobiletl, activation_mask, "activation")
        elif layer.op == "se":
            n, c = shape[0], shape[1]
            pooled, squeezed = (n, c, 1, 1), (n, layer.se_squeeze, 1, 1)
            tape.save(tape.new(), i, "SE fc1 input (pooled)", pooled)
            s = _activation(tape, i, layer.se_act, tape.new(), squeezed, mobiletl, activation_mask, "SE activation")
            tape.save(s, i, "SE fc2 input", squeezed)
            gate = _activation(tape, i, layer.se_gate, tape.new(), pooled, mobiletl, activation_mask, "SE gate")
            tape.save(x, i, "SE multiply input", shape)
            tape.save(gate, i, "SE multiply gate", pooled)
            x = tape.new()
        elif layer.op in ("drop_path", "dropout"):
            if training and layer.drop_prob > 0:
                noise = (shape[0],) + (1,) * (len(shape) - 1) if layer.op == "drop_path" else shape
                tape.save(tape.new(), i, f"{layer.op} noise", noise)
                x = tape.new()
        elif layer.op == "pad":
            left, right, top, bottom = layer.padding
            x, shape = tape.new(), shape[:2] + (shape[2] + top + bottom, shape[3] + left + right)
        elif layer.op == "pool":  # global average pool + flatten: a mean, keeps nothing
            x, shape = tape.new(), shape[:2]
        elif layer.op == "residual":
            x = tape.new()
        else:
            raise ValueError(f"no memory rule for layer op {layer.op!r}")
    return tape.items, shape


def total_bytes(items: Sequence[Saved]) -> int:
    return sum(item.nbytes for item in items)


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
    shape = tuple(in_shape)
    norms = [i for i, layer in enumerate(layers) if layer.op == "norm"]
    last_norm = norms[-1] if norms else -1

    def fp32(i: int, what: str, s: Shape) -> None:
        items.append(Saved(i, what, s, _numel(s) * FLOAT_BYTES))

    def act(i: int, kind: str, s: Shape, what: str) -> None:
        if mobiletl or kind in PAPER_ONE_BIT:
            items.append(Saved(i, f"{what} 1-bit mask", s, packed_numel(_numel(s))))
        else:
            fp32(i, f"{what} input", s)

    for i, layer in enumerate(layers):
        if layer.op == "conv":
            fp32(i, "conv input", shape)
            shape = conv_output_shape(layer, shape)
        elif layer.op == "linear":
            fp32(i, "linear input", shape)
            shape = shape[:-1] + (layer.out_channels,)
        elif layer.op == "norm":
            if not (mobiletl and i != last_norm):
                fp32(i, "batch-norm input", shape)
        elif layer.op == "act":
            act(i, layer.kind, shape, "activation")
        elif layer.op == "se":
            pooled, squeezed = (shape[0], shape[1], 1, 1), (shape[0], layer.se_squeeze, 1, 1)
            fp32(i, "SE input", shape)
            fp32(i, "SE fc1 input (pooled)", pooled)
            act(i, layer.se_act, squeezed, "SE activation")
            fp32(i, "SE fc2 input", squeezed)
            fp32(i, "SE gate", pooled)
        elif layer.op == "pad":
            left, right, top, bottom = layer.padding
            shape = shape[:2] + (shape[2] + top + bottom, shape[3] + left + right)
        elif layer.op == "pool":
            shape = shape[:2]
        elif layer.op not in ("residual", "dropout", "drop_path"):
            raise ValueError(f"no memory rule for layer op {layer.op!r}")
    return items, shape
