"""Finding inverted-residual blocks (IRBs) and describing them as data.

Discovery is by type (torchvision's ``InvertedResidual`` of MobileNetV2 and V3 and ``MBConv`` of
EfficientNet; timm's ``DepthwiseSeparableConv``, ``InvertedResidual``, ``UniversalInvertedResidual``
and ``EdgeResidual``, by exact type: timm's ``CondConvResidual`` subclasses its ``InvertedResidual``
and is not one edgetl can train), never by per-model indices. A model is read as torchvision lays
these families out: ``features`` (a sequence whose leaves, in forward order, are the stem, the IRBs
and the final 1x1 conv stage), global average pooling, and ``classifier``
(:mod:`edgetl.models.timm_models` puts timm's networks in that layout).

K counts these blocks the same way in every family: each residual-style block (with or without
an expansion, with or without its skip connection) is one; plain conv-norm-activation units (the
stem, timm's ``ConvBnAct`` stages, the final conv stage) are not blocks, they train in full when
above the K-th block.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from torch import nn
from torchvision.models import efficientnet, mobilenetv2, mobilenetv3
from torchvision.ops import SqueezeExcitation, StochasticDepth

from edgetl.nn.layers import SamePad2d, ShiftOnlyNorm, activation_kind

#: torchvision's inverted-residual blocks: forward is ``body(x)`` (+ ``x`` with ``use_res_connect``)
IRB_TYPES: tuple[type[nn.Module], ...] = (
    mobilenetv2.InvertedResidual,
    mobilenetv3.InvertedResidual,
    efficientnet.MBConv,
)


#: timm's block classes edgetl trains as inverted-residual blocks (``timm.models._efficientnet_blocks``)
TIMM_IRB_NAMES = ("DepthwiseSeparableConv", "InvertedResidual", "UniversalInvertedResidual", "EdgeResidual")


def _timm_irb_types() -> tuple[type, ...]:
    """timm's block classes, when timm is loaded (a timm block cannot exist before): edgetl never
    imports timm for a model that is not one."""
    module = sys.modules.get("timm.models._efficientnet_blocks")
    return tuple(getattr(module, name) for name in TIMM_IRB_NAMES) if module is not None else ()


def _timm_layer(name: str) -> type | None:
    module = sys.modules.get("timm.layers")
    return getattr(module, name, None) if module is not None else None


def is_timm_irb(module: nn.Module) -> bool:
    return type(module) in _timm_irb_types()


def is_irb(module: nn.Module) -> bool:
    return isinstance(module, IRB_TYPES) or is_timm_irb(module)


def _contains_irb(module: nn.Module) -> bool:
    return any(is_irb(m) for m in module.modules())


def feature_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The leaves of ``model.features`` in forward order: stem, each IRB, final conv stage.

    Containers that hold IRBs (EfficientNet's stages) are flattened; an IRB is never split.
    """
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        raise ValueError(f"{type(model).__name__} has no 'features' sequence; edgetl supports torchvision's MobileNet/EfficientNet layout")

    units: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, seq: nn.Sequential) -> None:
        for name, child in seq.named_children():
            path = f"{prefix}.{name}"
            if not is_irb(child) and isinstance(child, nn.Sequential) and _contains_irb(child):
                walk(path, child)
            else:
                units.append((path, child))

    walk("features", features)
    return units


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's inverted-residual blocks, bottom to top, with their qualified names."""
    return [(name, unit) for name, unit in feature_units(model) if is_irb(unit)]


def first_trained_unit(units: list[tuple[str, nn.Module]], k: int) -> int:
    """Index of the first unit that trains when the top ``k`` blocks do.

    ``k = 0``: none of ``features`` (classifier only). ``k`` = every block: all of ``features``,
    the stem included (full fine-tuning). Otherwise the ``k``-th block from the top.
    """
    blocks = [i for i, (_, unit) in enumerate(units) if is_irb(unit)]
    if k == 0:
        return len(units)
    if k >= len(blocks):
        return 0
    return blocks[len(blocks) - k]


# --- a block as data ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    """One layer of a block, in forward order.

    ``op`` is ``conv``, ``linear``, ``norm``, ``act``, ``se`` (squeeze-excitation, with ``se_*``
    fields), ``pad`` (zero padding, ``padding`` = left, right, top, bottom), ``pad_same`` (TF
    "SAME" zero padding for a conv of ``kernel``, ``stride``, ``dilation``, sized by the input),
    ``scale`` (a trained per-channel layer scale, timm's ``LayerScale2d``), ``pool`` (global
    average), ``dropout``, ``drop_path`` (stochastic depth) or ``residual``.
    """

    op: str
    in_channels: int = 0
    out_channels: int = 0
    kernel: int = 1
    stride: int = 1
    padding: int | tuple[int, int, int, int] = 0
    dilation: int = 1
    groups: int = 1
    bias: bool = False
    kind: str = ""  # activation kind for ``act``
    se_squeeze: int = 0
    se_act: str = ""
    se_gate: str = ""
    drop_prob: float = 0.0  # ``dropout`` / ``drop_path`` probability


@dataclass(frozen=True)
class BlockSpec:
    """An inverted-residual block's structure: enough to predict its memory without running it."""

    name: str
    kind: str  # class name: InvertedResidual / MBConv
    in_channels: int
    out_channels: int
    expand_ratio: float
    kernel: int
    stride: int
    use_se: bool
    use_residual: bool
    layers: tuple[LayerSpec, ...]


def _conv_spec(conv: nn.Conv2d) -> LayerSpec:
    def one(v):
        return v[0] if isinstance(v, tuple) else v

    return LayerSpec(
        "conv",
        conv.in_channels,
        conv.out_channels,
        kernel=one(conv.kernel_size),
        stride=one(conv.stride),
        padding=one(conv.padding),
        dilation=one(conv.dilation),
        groups=conv.groups,
        bias=conv.bias is not None,
    )


def layer_specs(module: nn.Module) -> list[LayerSpec]:
    if isinstance(module, nn.Conv2d):
        return [_conv_spec(module)]
    if isinstance(module, nn.Linear):
        return [LayerSpec("linear", module.in_features, module.out_features, bias=module.bias is not None)]
    if isinstance(module, (ShiftOnlyNorm, nn.BatchNorm2d, nn.BatchNorm1d)):
        if type(module).__module__.startswith("timm."):
            # e.g. timm's BatchNormAct2d, whose fused activation a bare "norm" would not count
            raise ValueError(f"edgetl cannot account for layer {type(module).__name__}")
        return [LayerSpec("norm", module.num_features, module.num_features)]
    if isinstance(module, SamePad2d):
        return [LayerSpec("pad_same", kernel=module.kernel, stride=module.stride, dilation=module.dilation)]
    layer_scale = _timm_layer("LayerScale2d")
    if layer_scale is not None and type(module) is layer_scale:
        return [LayerSpec("scale", module.gamma.numel(), module.gamma.numel())]
    if isinstance(module, SqueezeExcitation):
        return [
            LayerSpec(
                "se",
                module.fc1.in_channels,
                module.fc1.in_channels,
                se_squeeze=module.fc1.out_channels,
                se_act=activation_kind(module.activation) or "",
                se_gate=activation_kind(module.scale_activation) or "",
            )
        ]
    kind = activation_kind(module)
    if kind is not None:
        return [LayerSpec("act", kind=kind)]
    if isinstance(module, StochasticDepth):
        return [LayerSpec("drop_path", drop_prob=float(module.p))]
    if isinstance(module, nn.Dropout):
        return [LayerSpec("dropout", drop_prob=float(module.p))]
    if isinstance(module, nn.ZeroPad2d):
        return [LayerSpec("pad", padding=tuple(module.padding))]
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return [LayerSpec("pool")]
    if isinstance(module, (nn.Identity, nn.Flatten)):
        return []
    children = list(module.children())
    if not children:
        raise ValueError(f"edgetl cannot account for layer {type(module).__name__}")
    out: list[LayerSpec] = []
    for child in children:
        out.extend(layer_specs(child))
    return out


def block_spec(name: str, block: nn.Module) -> BlockSpec:
    """Describe ``block`` (an IRB, original or prepared) as a :class:`BlockSpec`."""
    if not is_irb(block):
        raise TypeError(f"{name} is a {type(block).__name__}, not an inverted-residual block")
    if is_timm_irb(block):
        # timm's blocks register their layers in forward order and apply drop_path (last) only
        # on the residual branch: has_skip
        use_res = bool(block.has_skip)
        layers = [spec for child_name, child in block.named_children() if child_name != "drop_path" for spec in layer_specs(child)]
        sd = block.drop_path
    else:
        body = getattr(block, "conv", None) or block.block
        layers = layer_specs(body)
        sd = getattr(block, "stochastic_depth", None)
        use_res = bool(block.use_res_connect)
    if use_res and sd is not None:
        layers += layer_specs(sd)
    if use_res:
        layers.append(LayerSpec("residual"))
    convs = [layer for layer in layers if layer.op == "conv"]
    cin, cout = convs[0].in_channels, convs[-1].out_channels
    # the widest map inside the block (the projection's output excluded); the largest depthwise
    # kernel (UIB: start or middle; a fused EdgeResidual has none: its expansion conv's kernel)
    depthwise = [layer for layer in convs if layer.groups > 1 and layer.groups == layer.in_channels]
    return BlockSpec(
        name=name,
        kind=type(block).__name__,
        in_channels=cin,
        out_channels=cout,
        expand_ratio=max(layer.out_channels for layer in convs[:-1] or convs) / cin,
        kernel=max(layer.kernel for layer in depthwise or convs),
        stride=math.prod(layer.stride for layer in convs),
        use_se=any(layer.op == "se" for layer in layers),
        use_residual=use_res,
        layers=tuple(layers),
    )
