"""Shape propagation over layer specs: the one walk every memory figure is computed along.

A unit (block, conv stage, head) is a list of :class:`~edgetl.models.blocks.LayerSpec` in forward
order; :func:`walk` gives each layer with the shape it receives and the shape it produces. The
accountings (:mod:`edgetl.profiler.analytic`) and working sets (:mod:`edgetl.profiler.estimate`)
differ only in what they count per layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from edgetl.models.blocks import LayerSpec
from edgetl.nn.layers import same_padding

Shape = tuple[int, ...]
FLOAT_BYTES = 4
#: layers whose output has the shape of their input
SHAPE_PRESERVING = frozenset({"norm", "act", "se", "scale", "dropout", "drop_path", "residual"})


def float_bytes(shape: Shape) -> int:
    """Bytes of an fp32 tensor of ``shape``."""
    return math.prod(shape) * FLOAT_BYTES


def conv_output_shape(layer: LayerSpec, shape: Shape) -> Shape:
    """Output shape of a 2-D conv ``layer`` applied to ``shape`` (N, C, H, W)."""
    n, c, h, w = shape
    if c != layer.in_channels:
        raise ValueError(f"conv expects {layer.in_channels} input channels, got shape {shape}")
    span = layer.dilation * (layer.kernel - 1) + 1
    ho = (h + 2 * layer.padding - span) // layer.stride + 1
    wo = (w + 2 * layer.padding - span) // layer.stride + 1
    return (n, layer.out_channels, ho, wo)


def output_shape(layer: LayerSpec, shape: Shape) -> Shape:
    """The shape ``layer`` produces from an input of ``shape``."""
    if layer.op == "conv":
        return conv_output_shape(layer, shape)
    if layer.op == "linear":
        if shape[-1] != layer.in_channels:
            raise ValueError(f"linear expects {layer.in_channels} features, got shape {shape}")
        return shape[:-1] + (layer.out_channels,)
    if layer.op == "pad":
        left, right, top, bottom = layer.padding
        return shape[:2] + (shape[2] + top + bottom, shape[3] + left + right)
    if layer.op == "pad_same":
        top, bottom = same_padding(shape[2], layer.kernel, layer.stride, layer.dilation)
        left, right = same_padding(shape[3], layer.kernel, layer.stride, layer.dilation)
        return shape[:2] + (shape[2] + top + bottom, shape[3] + left + right)
    if layer.op == "pool":  # global average pool + flatten
        return shape[:2]
    if layer.op in SHAPE_PRESERVING:
        return shape
    raise ValueError(f"no shape rule for layer op {layer.op!r}")


def walk(layers: Sequence[LayerSpec], in_shape: Shape) -> Iterator[tuple[int, LayerSpec, Shape, Shape]]:
    """``(index, layer, input shape, output shape)`` for each layer of a unit, in forward order."""
    shape = tuple(in_shape)
    for i, layer in enumerate(layers):
        out = output_shape(layer, shape)
        yield i, layer, shape, out
        shape = out


def unit_output_shape(layers: Sequence[LayerSpec], in_shape: Shape) -> Shape:
    """The shape a unit produces from ``in_shape``."""
    shape = tuple(in_shape)
    for layer in layers:
        shape = output_shape(layer, shape)
    return shape
