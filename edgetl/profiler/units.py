"""A network as the profiler reads it: units in forward order, each a list of layer specs.

The units are the leaves of ``features`` (:func:`edgetl.models.blocks.feature_units`: stem, each
inverted-residual block, final conv stage), then the head (:data:`HEAD`: global average pooling and
the classifier), which torchvision runs in ``forward`` rather than as a module of its own.
"""

from __future__ import annotations

from torch import nn

from edgetl.models.blocks import LayerSpec, block_spec, is_irb, layer_specs

#: the name of the head's row in every per-unit figure
HEAD = "head"


def unit_layers(name: str, unit: nn.Module) -> list[LayerSpec]:
    """The layers of one unit of ``features``: an IRB's through its block spec (stochastic depth
    and the residual addition included), any other unit's as they are nested."""
    return list(block_spec(name, unit).layers) if is_irb(unit) else layer_specs(unit)


def head_layers(model: nn.Module) -> list[LayerSpec]:
    """The head's layers: global average pooling to 1 x 1, then ``model.classifier``."""
    return layer_specs(nn.Sequential(nn.AdaptiveAvgPool2d(1), model.classifier))
