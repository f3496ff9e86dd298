"""timm's inverted-residual families in edgetl's layout: ``edgetl.load_model("timm:NAME")``.

timm (``pip install 'edgetl[timm]'``) builds MobileNetV3/V4, EfficientNet(-Lite) and MNASNet from
its own blocks: ``DepthwiseSeparableConv``, ``InvertedResidual``, ``UniversalInvertedResidual``
(MobileNetV4's UIB), ``EdgeResidual`` and plain ``ConvBnAct`` stages. :func:`wrap` keeps those
block modules (and so timm's ``forward`` code, residuals and layer scale included) and rewrites only
the layers inside them into the vocabulary the rest of edgetl reads, so ``prepare``, the profiler
and the exporter treat them as they treat torchvision's blocks:

* ``BatchNormAct2d`` (batch norm with its activation fused in) is split into ``nn.BatchNorm2d``
  followed by its activation, an ``nn.Sequential`` of the two (the bare ``nn.BatchNorm2d`` when the
  activation is an identity). MobileTL then treats the two halves as it treats any norm and
  activation: an internal norm becomes a shift-only affine, the activation a masked one.
* timm's ``SqueezeExcite`` becomes torchvision's ``SqueezeExcitation`` (same reduce conv,
  activation, expand conv, gate and multiply; the mean is taken by adaptive average pooling).
* ``Conv2dSame`` (TF "SAME" padding of the ``tf_*`` models) becomes :class:`SamePad2d` + a conv
  with ``padding=0``; ``DropPath`` becomes torchvision's ``StochasticDepth`` (same per-sample rule).
* The head: EfficientNet/MNASNet's ``conv_head`` + ``bn2`` stay in ``features`` (trained like
  torchvision's final conv stage); MobileNetV3/V4 apply ``conv_head`` after pooling, to a 1 x 1
  map, so it becomes an ``nn.Linear`` (and a head norm an ``nn.BatchNorm1d``) inside
  ``classifier``, where the same computation happens on the pooled vector.

Anything else (another block type such as ``MobileAttention`` or ``CondConvResidual``, anti-aliasing,
space-to-depth stems, other norm layers) is refused with its name and place.

The network's state-dict keys are edgetl's (``features.blocks.2.0.pw_exp.bn.0.weight``); timm's
own state dicts (``conv_stem.weight``) load through :func:`load_state`, as does the packaged
EfficientNet-Lite0 checkpoint for ``tf_efficientnet_lite0`` (an explicit key map).
"""

from __future__ import annotations

import socket
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import SqueezeExcitation, StochasticDepth

from edgetl.errors import ConfigError, WeightsError
from edgetl.models import lite0
from edgetl.models.blocks import TIMM_IRB_NAMES
from edgetl.nn.layers import SamePad2d, activation_kind

PREFIX = "timm:"
INSTALL_HINT = "pip install 'edgetl[timm]' (or: pip install timm)"
#: timm's block classes edgetl trains under MobileTL (one K each), and the plain conv stage it trains in full
BLOCK_TYPES = TIMM_IRB_NAMES
STAGE_TYPES = ("ConvBnAct",)
#: the models the issue names, each tested end to end (any other timm model built from these blocks works too)
TESTED = (
    "mobilenetv4_conv_small",
    "mobilenetv4_conv_medium",
    "mobilenetv3_large_100",
    "efficientnet_b0",
    "tf_efficientnet_lite0",
    "mnasnet_100",
)


def is_timm_name(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def _timm():
    try:
        import timm
    except ImportError:
        raise ConfigError(f"timm models need the timm package: {INSTALL_HINT}") from None
    return timm


def _check_name(name: str) -> str:
    timm = _timm()
    if not timm.is_model(name):
        raise ConfigError(f"unknown timm model {name!r} (timm.list_models() lists them)")
    return name


# --- rewriting timm's layers -------------------------------------------------------------------


def _refuse(path: str, what: str) -> ConfigError:
    return ConfigError(f"edgetl cannot train {path}: {what}")


def _act(module: nn.Module, path: str) -> nn.Module:
    if isinstance(module, nn.Identity) or activation_kind(module) is not None:
        return module
    raise _refuse(path, f"activation {type(module).__name__} is not one edgetl knows (ReLU, ReLU6, Hard-Swish, SiLU, gates)")


def _split_norm_act(bn: nn.BatchNorm2d, path: str, dims: int = 2) -> nn.Module:
    """``BatchNormAct2d`` -> ``nn.BatchNorm2d`` (or ``1d``) with the same tensors, then its activation."""
    if not isinstance(getattr(bn, "drop", nn.Identity()), nn.Identity):
        raise _refuse(path, f"its norm applies {type(bn.drop).__name__} before the activation")
    cls = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    plain = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine, track_running_stats=bn.track_running_stats)
    plain.load_state_dict(bn.state_dict())
    plain.train(bn.training)
    act = _act(bn.act, f"{path}.act")
    return plain if isinstance(act, nn.Identity) else nn.Sequential(plain, act)


def _same_conv(conv: nn.Conv2d, path: str) -> nn.Module:
    k, s, d = conv.kernel_size, conv.stride, conv.dilation
    if k[0] != k[1] or s[0] != s[1] or d[0] != d[1]:
        raise _refuse(path, "a 'SAME'-padded conv with a non-square kernel, stride or dilation")
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, k, s, 0, d, conv.groups, conv.bias is not None)
    plain.load_state_dict(conv.state_dict())
    return nn.Sequential(SamePad2d(k[0], s[0], d[0]), plain)


def _squeeze_excitation(se: nn.Module, path: str) -> SqueezeExcitation:
    new = SqueezeExcitation(se.conv_reduce.in_channels, se.conv_reduce.out_channels)
    new.fc1, new.fc2 = se.conv_reduce, se.conv_expand
    new.activation = _act(se.act1, f"{path}.act1")
    new.scale_activation = _act(se.gate, f"{path}.gate")
    return new


def _rewrite(module: nn.Module, path: str) -> None:
    """Rewrite timm's layers below ``module`` in place (see the module docstring)."""
    import timm.layers
    from timm.models import _efficientnet_blocks as blocks

    for name, child in list(module.named_children()):
        where = f"{path}.{name}"
        cls = type(child)
        if cls is timm.layers.BatchNormAct2d:
            setattr(module, name, _split_norm_act(child, where))
        elif cls is timm.layers.Conv2dSame:
            setattr(module, name, _same_conv(child, where))
        elif cls is blocks.SqueezeExcite:
            setattr(module, name, _squeeze_excitation(child, where))
        elif cls is timm.layers.DropPath:
            if not child.scale_by_keep:
                raise _refuse(where, "DropPath without scale_by_keep")
            setattr(module, name, StochasticDepth(child.drop_prob, "row") if child.drop_prob > 0 else nn.Identity())
        elif name in ("aa", "conv_s2d") and not isinstance(child, nn.Identity):
            raise _refuse(where, f"{name} ({cls.__name__}) is not supported")
        elif cls.__module__.startswith("timm.") and cls.__name__ not in (*BLOCK_TYPES, *STAGE_TYPES, "ConvNormAct", "LayerScale2d"):
            raise _refuse(where, f"timm layer {cls.__name__} has no edgetl equivalent")
        else:
            if isinstance(child, nn.BatchNorm2d) and cls is not nn.BatchNorm2d:
                raise _refuse(where, f"norm layer {cls.__name__} is not supported (BatchNorm2d / BatchNormAct2d are)")
            _rewrite(child, where)


class TimmNet(nn.Module):
    """A timm network in torchvision's layout: ``features`` (stem, timm's stages of blocks, and for
    EfficientNet/MNASNet the head conv and norm), global average pooling, ``classifier``."""

    def __init__(self, features: nn.Sequential, classifier: nn.Module, timm_name: str) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.timm_name = timm_name

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def _linear(src: nn.Module) -> nn.Linear:
    """A plain ``nn.Linear`` with ``src``'s tensors: from a linear layer or a 1x1 conv on a 1x1 map."""
    if isinstance(src, nn.Conv2d):
        out_features, in_features = src.out_channels, src.in_channels
        weight = src.weight.detach().reshape(out_features, in_features)
    else:
        out_features, in_features, weight = src.out_features, src.in_features, src.weight.detach()
    new = nn.Linear(in_features, out_features, bias=src.bias is not None)
    with torch.no_grad():
        new.weight.copy_(weight)
        if src.bias is not None:
            new.bias.copy_(src.bias)
    return new


def wrap(raw: nn.Module, name: str) -> TimmNet:
    """A timm MobileNetV3/V4, EfficientNet or MNASNet model as a :class:`TimmNet` (takes over its modules).

    Raises:
        ConfigError: a block type, layer or head edgetl cannot train, named with its place.
    """
    from timm.models import _efficientnet_blocks as blocks
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3

    if not isinstance(raw, (EfficientNet, MobileNetV3)):
        raise ConfigError(
            f"timm model {name} is a {type(raw).__name__}; edgetl supports timm's MobileNetV3/V4, EfficientNet and MNASNet families"
        )
    known = {getattr(blocks, n) for n in (*BLOCK_TYPES, *STAGE_TYPES)}
    for s, stage in enumerate(raw.blocks):
        for b, block in enumerate(stage):
            if type(block) not in known:
                raise ConfigError(
                    f"timm model {name}: block blocks.{s}.{b} is a {type(block).__name__}, which edgetl cannot train "
                    f"(it knows {', '.join(BLOCK_TYPES + STAGE_TYPES)})"
                )
            if type(block) is blocks.ConvBnAct and block.has_skip:
                raise _refuse(f"{name} blocks.{s}.{b}", "a ConvBnAct stage with a residual connection")
    if getattr(raw.global_pool, "pool_type", "avg") != "avg":
        raise _refuse(name, f"global pooling {raw.global_pool.pool_type!r} (average pooling only)")
    parts: OrderedDict[str, nn.Module] = OrderedDict(conv_stem=raw.conv_stem, bn1=raw.bn1, blocks=raw.blocks)
    head: OrderedDict[str, nn.Module] = OrderedDict()
    if isinstance(raw, EfficientNet):
        parts.update(conv_head=raw.conv_head, bn2=raw.bn2)  # before pooling: the final conv stage
    else:  # MobileNetV3/V4: conv_head (+ norm_head) after pooling, on the 1 x 1 map
        if not isinstance(raw.conv_head, nn.Identity):
            head["conv_head"] = _linear(raw.conv_head)
        if isinstance(raw.norm_head, nn.BatchNorm2d):
            norm = _split_norm_act(raw.norm_head, f"{name}.norm_head", dims=1)
            head["norm_head"] = norm[0] if isinstance(norm, nn.Sequential) else norm
            if isinstance(norm, nn.Sequential):
                head["norm_act"] = norm[1]
        elif not isinstance(raw.norm_head, nn.Identity):
            raise _refuse(f"{name}.norm_head", f"{type(raw.norm_head).__name__}")
        if not isinstance(raw.act2, nn.Identity):
            head["act2"] = _act(raw.act2, f"{name}.act2")
    if raw.drop_rate > 0:
        head["dropout"] = nn.Dropout(raw.drop_rate)
    head["fc"] = _linear(raw.classifier)
    features = nn.Sequential(parts)
    _rewrite(features, "features")
    return TimmNet(features, nn.Sequential(head), name)


# --- building and weights ----------------------------------------------------------------------


def build(name: str, *, num_classes: int = 1000, weights: None = None) -> TimmNet:
    """timm architecture ``name``, randomly initialised by timm, in edgetl's layout."""
    if weights is not None:
        raise ValueError("build() takes weights=None; pretrained weights come from pretrained()")
    timm = _timm()
    return wrap(timm.create_model(_check_name(name), pretrained=False, num_classes=num_classes), name)


def _hub_unreachable() -> bool:
    """Whether the Hugging Face hub's host does not even resolve (no network). Checked first because
    huggingface_hub retries each file five times with back-off (~50 s, a warning per retry)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False  # offline already: the cache alone is asked, at once
    try:
        socket.getaddrinfo(urllib.parse.urlparse(constants.ENDPOINT).hostname, 443)
    except OSError:
        return True
    return False


@contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub's offline mode (``HF_HUB_OFFLINE``) for the duration: cached files only."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def pretrained(name: str) -> TimmNet:
    """``name`` with timm's default pretrained weights, through timm's own loading (Hugging Face
    hub, cached). Without a network the cached copy is used; with none cached this is one
    :class:`WeightsError` line, at once (never huggingface_hub's retries)."""
    timm = _timm()
    _check_name(name)
    try:
        with _hub_offline() if _hub_unreachable() else nullcontext():
            raw = timm.create_model(name, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - hub, network and cache failures come in many types
        first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:120]
        raise WeightsError(
            f"cannot get timm's pretrained weights for {name} ({type(exc).__name__}: {first}); "
            "without a network, pass a local state-dict file (weights=PATH / --weights PATH)"
        ) from None
    return wrap(raw, name)


@dataclass(frozen=True)
class DataConfig:
    """timm's pretrained input pipeline of a model: normalisation, resize interpolation, crop ratio."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bilinear" / "bicubic"
    crop_pct: float


def data_config(name: str) -> DataConfig:
    """The pretrained data config timm records for ``name`` (its default pretrained tag)."""
    timm = _timm()
    cfg = timm.models.get_pretrained_cfg(_check_name(name))
    if cfg is None:
        raise ConfigError(f"timm has no pretrained data config for {name}")
    return DataConfig(tuple(cfg.mean), tuple(cfg.std), cfg.interpolation or "bilinear", float(cfg.crop_pct or 0.875))


# --- state dicts: edgetl's keys, timm's keys, the packaged Lite0 checkpoint ---------------------


def _classes(state: Mapping[str, Tensor], key: str) -> int:
    if key not in state or state[key].dim() != 2:
        raise WeightsError(f"the state dict has no classifier weight {key!r}")
    return int(state[key].shape[0])


def lite0_key_map() -> dict[str, str]:
    """efficientnet_pytorch EfficientNet-Lite0 key -> timm ``tf_efficientnet_lite0`` key, every tensor.

    Block ``n`` of efficientnet_pytorch is stage ``s``, index ``i`` of timm (stages as in
    :data:`edgetl.models.lite0.STAGES`); its first block is a depthwise-separable conv
    (``conv_dw``, ``bn1``, ``conv_pw``, ``bn2``), the others inverted residuals (``conv_pw``, ``bn1``,
    ``conv_dw``, ``bn2``, ``conv_pwl``, ``bn3``)."""
    mapping: dict[str, str] = {}

    def bn(src: str, dst: str) -> None:
        for k in lite0.BN_KEYS:
            mapping[f"{src}.{k}"] = f"{dst}.{k}"

    mapping["_conv_stem.weight"] = "conv_stem.weight"
    bn("_bn0", "bn1")
    n = 0
    for s, (expand, _kernel, _stride, _out, repeats) in enumerate(lite0.STAGES):
        for i in range(repeats):
            src, dst = f"_blocks.{n}", f"blocks.{s}.{i}"
            if expand == 1:
                mapping[f"{src}._depthwise_conv.weight"] = f"{dst}.conv_dw.weight"
                bn(f"{src}._bn1", f"{dst}.bn1")
                mapping[f"{src}._project_conv.weight"] = f"{dst}.conv_pw.weight"
                bn(f"{src}._bn2", f"{dst}.bn2")
            else:
                mapping[f"{src}._expand_conv.weight"] = f"{dst}.conv_pw.weight"
                bn(f"{src}._bn0", f"{dst}.bn1")
                mapping[f"{src}._depthwise_conv.weight"] = f"{dst}.conv_dw.weight"
                bn(f"{src}._bn1", f"{dst}.bn2")
                mapping[f"{src}._project_conv.weight"] = f"{dst}.conv_pwl.weight"
                bn(f"{src}._bn2", f"{dst}.bn3")
            n += 1
    mapping["_conv_head.weight"] = "conv_head.weight"
    bn("_bn1", "bn2")
    mapping["_fc.weight"] = "classifier.weight"
    mapping["_fc.bias"] = "classifier.bias"
    return mapping


def lite0_to_timm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The packaged EfficientNet-Lite0 checkpoint (efficientnet_pytorch keys) in timm's
    ``tf_efficientnet_lite0`` keys. Unexpected or missing keys are a :class:`WeightsError`."""
    mapping = lite0_key_map()
    unexpected = sorted(set(state) - set(mapping))
    missing = sorted(set(mapping) - set(state))
    if unexpected or missing:
        raise WeightsError(f"not an EfficientNet-Lite0 state dict: unexpected keys {unexpected[:3]}, missing keys {missing[:3]}")
    return {mapping[k]: v for k, v in state.items()}


def load_state(name: str, state: Mapping[str, Tensor], source: str) -> TimmNet:
    """``name`` with the weights of ``state``, at the state's number of classes.

    ``state`` may be in edgetl's keys (an edgetl checkpoint: ``features.*``), in timm's
    (``conv_stem.weight``: timm's own files, Hugging Face ``.safetensors``), or, for
    ``tf_efficientnet_lite0``, the packaged Lite0 checkpoint (efficientnet_pytorch keys, mapped by
    :func:`lite0_key_map`). Every key must fit (``strict``): a :class:`WeightsError` names the misfit.
    """
    timm = _timm()
    _check_name(name)
    try:
        if any(k.startswith("features.") for k in state):
            fc = "classifier.fc.weight"
            model = build(name, num_classes=_classes(state, fc))
            model.load_state_dict(state, strict=True)
            return model
        if "_conv_stem.weight" in state:
            if name != "tf_efficientnet_lite0":
                raise WeightsError(
                    f"{source} holds EfficientNet-Lite0 weights (efficientnet_pytorch keys), which fit tf_efficientnet_lite0, not {name}"
                )
            state = lite0_to_timm(state)
        raw = timm.create_model(name, pretrained=False, num_classes=_classes(state, "classifier.weight"))
        raw.load_state_dict(state, strict=True)
    except WeightsError:  # a RuntimeError too: already one clear line
        raise
    except RuntimeError as exc:  # missing / unexpected keys, other shapes
        first = (str(exc).strip().splitlines() or [""])[:3]
        raise WeightsError(f"weights in {source} do not fit timm:{name}: {' '.join(s.strip() for s in first)}") from None
    return wrap(raw, name)


def packaged_lite0() -> TimmNet:
    """timm's ``tf_efficientnet_lite0`` with the ImageNet weights edgetl packages for its own Lite0
    (``edgetl[weights]``), through :func:`lite0_key_map`."""
    path = lite0.weights_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure is an unreadable file to the user
        raise WeightsError(f"cannot read weights from {path}: {type(exc).__name__}: {exc}") from None
    return load_state("tf_efficientnet_lite0", state, path)
