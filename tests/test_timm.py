"""timm's models under MobileTL: loading, the rewrite of timm's layers, MobileTL's rules per block
type, memory predicted = measured to the byte, gradients against float64 references written here,
learning, and the packaged Lite0 weights on timm's tf_efficientnet_lite0."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from edgetl.errors import ConfigError, EdgetlError, WeightsError
from edgetl.models import lite0, timm_models, zoo
from edgetl.models.blocks import feature_units, find_blocks
from edgetl.nn.layers import MaskedActivation, SamePad2d, ShiftOnlyNorm, same_padding
from edgetl.profiler.measure import HEAD, measure_saved_bytes
from edgetl.profiler.predict import predict_units
from edgetl.train.policy import METHODS, TrainPolicy
from edgetl.train.prepare import prepare

timm = pytest.importorskip("timm", reason="timm not installed: pip install 'edgetl[timm]'")

ROOT = Path(__file__).resolve().parents[1]
NAMES = list(timm_models.TESTED)


@pytest.fixture(scope="module")
def models():
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = zoo.load_model(f"timm:{name}", num_classes=5)
        return cache[name]

    return get


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine values, so that frozen and train-mode norms differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model


# --- loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_rewritten_network_computes_what_timm_computes(name):
    torch.manual_seed(0)
    raw = _randomise_norms(timm.create_model(name, num_classes=5)).eval()
    x = torch.randn(2, 3, 72, 72)  # 72: the stride-2 "SAME" paddings of tf_ models are uneven
    with torch.no_grad():
        expected = raw(x)
        got = timm_models.wrap(raw, name).eval()(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_blocks_are_counted_alike_in_every_family(models):
    # K counts residual-style blocks of every type: timm's own stage strings give the counts
    counts = {name: len(find_blocks(models(name))) for name in NAMES}
    assert counts == {
        "mobilenetv4_conv_small": 12,  # 12 UIB (4 ConvBnAct stages are not blocks)
        "mobilenetv4_conv_medium": 22,  # 1 EdgeResidual + 21 UIB
        "mobilenetv3_large_100": 15,  # 1 DS + 14 IR, as torchvision's MobileNetV3-Large
        "efficientnet_b0": 16,  # 1 DS + 15 IR, as torchvision's EfficientNet-B0
        "tf_efficientnet_lite0": 16,  # as edgetl's torchvision-built Lite0
        "mnasnet_100": 17,
    }
    assert counts["mobilenetv3_large_100"] == zoo.num_blocks("mobilenet_v3_large")
    assert counts["efficientnet_b0"] == zoo.num_blocks("efficientnet_b0") == zoo.num_blocks("timm:efficientnet_b0")


def test_unknown_block_type_is_named():
    with pytest.raises(ConfigError, match=r"block blocks\.\d\.\d+ is a MobileAttention, which edgetl cannot train"):
        zoo.load_model("timm:mobilenetv4_hybrid_medium", num_classes=3)
    with pytest.raises(ConfigError, match="is a ResNet"):
        zoo.load_model("timm:resnet18", num_classes=3)
    with pytest.raises(ConfigError, match="unknown timm model"):
        zoo.load_model("timm:no_such_net", num_classes=3)


def test_missing_timm_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm then raises ImportError
    with pytest.raises(ConfigError, match=r"timm models need the timm package: pip install 'edgetl\[timm\]'"):
        timm_models.build("mobilenetv4_conv_small")


def test_transforms_follow_timms_pretrained_data_config():
    for name in ("mobilenetv4_conv_medium", "tf_efficientnet_lite0"):
        cfg = timm.data.resolve_data_config({}, model=timm.create_model(name, pretrained=False))
        tf = zoo.transforms_for(f"timm:{name}", image_size=224, train=False)
        resize, crop, norm = tf.transforms[2], tf.transforms[3], tf.transforms[5]
        assert norm.mean == list(cfg["mean"]) and norm.std == list(cfg["std"])
        assert resize.size == [round(224 / cfg["crop_pct"])] and crop.size == (224, 224)
        assert resize.interpolation.value == cfg["interpolation"]


def test_local_state_dicts_load_in_timms_keys_and_edgetls(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    raw = _randomise_norms(timm.create_model("mobilenetv3_large_100", num_classes=7)).eval()
    path = tmp_path / "v3.safetensors"
    save_file({k: v.contiguous() for k, v in raw.state_dict().items()}, str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = raw(x)
    model = zoo.load_model("timm:mobilenetv3_large_100", weights=path, num_classes=7).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    # edgetl's own keys (a run's model.pt), any classifier size
    torch.save(model.state_dict(), tmp_path / "edgetl.pt")
    again = zoo.load_model("timm:mobilenetv3_large_100", weights=tmp_path / "edgetl.pt", num_classes=3)
    assert again.classifier.fc.out_features == 3
    assert torch.equal(again.features.blocks[5][2].conv_pw.weight, raw.blocks[5][2].conv_pw.weight)
    # a key too few is an error, not a silently random layer
    state = raw.state_dict()
    del state["blocks.5.2.bn3.running_var"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(WeightsError, match="do not fit timm:mobilenetv3_large_100.*running_var"):
        zoo.load_model("timm:mobilenetv3_large_100", weights=tmp_path / "broken.pt", num_classes=3)


def test_default_weights_offline_fail_with_one_clear_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    argv = ["finetune", "--model", "timm:mobilenetv4_conv_small", "--weights", "DEFAULT", "--data", str(tmp_path / "data")]
    for c in "ab":
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(4):
            from PIL import Image

            Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / "data" / c / f"{i}.png")
    argv += ["--out", str(tmp_path / "run"), "--batch-size", "2", "--image-size", "32"]
    done = subprocess.run([sys.executable, "-m", "edgetl", *argv], capture_output=True, text=True, env=env, timeout=120)
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(errors) == 1, done.stderr
    assert errors[0].startswith("edgetl: error: cannot get timm's pretrained weights for mobilenetv4_conv_small"), errors
    assert "Traceback" not in done.stderr and not (tmp_path / "run" / "model.pt").exists()


# --- MobileTL's rules on timm's blocks ------------------------------------------------------------


def _norms(block: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in block.named_modules() if isinstance(m, (ShiftOnlyNorm, nn.BatchNorm2d))]


@pytest.mark.parametrize(
    "name,block,kind,internal",
    [
        ("mobilenetv3_large_100", "features.blocks.0.0", "DepthwiseSeparableConv", ["bn1.0"]),
        ("mobilenetv3_large_100", "features.blocks.5.2", "InvertedResidual", ["bn1.0", "bn2.0"]),
        ("mobilenetv4_conv_medium", "features.blocks.0.0", "EdgeResidual", ["bn1.0"]),
        # UIB "ExtraDW": start depthwise (norm, no activation), expansion, middle depthwise, projection
        ("mobilenetv4_conv_small", "features.blocks.3.1", "UniversalInvertedResidual", ["dw_start.bn", "pw_exp.bn.0", "dw_mid.bn.0"]),
    ],
)
def test_mobiletl_rules_per_block_type(models, name, block, kind, internal):
    model = models(name)
    k = len(find_blocks(model)) - [n for n, _ in find_blocks(model)].index(block)
    net = prepare(model, TrainPolicy(k))
    unit = net.get_submodule(block)
    assert type(unit).__name__ == kind
    norms = _norms(unit)
    assert [n for n, m in norms if isinstance(m, ShiftOnlyNorm)] == internal
    last_name, last = norms[-1]
    assert type(last) is nn.BatchNorm2d and last.training and last.weight.requires_grad  # the last norm trains fully
    assert not any(isinstance(m, (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.Hardsigmoid, nn.Sigmoid)) for m in unit.modules())
    assert all(m.rule == "sign" for m in unit.modules() if isinstance(m, MaskedActivation))
    trainable = {n for n, p in unit.named_parameters() if p.requires_grad}
    convs = {f"{n}.weight" for n, m in unit.named_modules() if isinstance(m, nn.Conv2d)}
    assert convs <= trainable and {f"{n}.bias" for n in internal} <= trainable
    assert {f"{last_name}.weight", f"{last_name}.bias"} <= trainable
    # nothing below the K blocks trains (K = all blocks: full fine-tuning, the stem included)
    stem_trains = any(p.requires_grad for n, p in net.named_parameters() if n.startswith("features.conv_stem"))
    assert stem_trains == (k == len(find_blocks(model)))


def test_same_padding_matches_tf():
    for size in range(5, 40):
        for k, s in ((3, 2), (5, 2), (3, 1), (5, 1)):
            pad = same_padding(size, k, s)
            assert (size + sum(pad) - k) // s + 1 == -(-size // s)  # output ceil(size / stride)
            assert pad[1] - pad[0] in (0, 1)
    x = torch.randn(1, 2, 9, 10)
    assert SamePad2d(3, 2)(x).shape == (1, 2, 11, 11)  # 9 + (0, 2), 10 + (0, 1): outputs 5 x 5
    assert SamePad2d(3, 2).padding(9, 10) == (0, 1, 1, 1)


# --- memory: predicted == measured, to the byte --------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batch_size,image_size", [(2, 32), (3, 40)])
def test_predicted_equals_measured_for_every_trained_block(models, name, batch_size, image_size):
    model = models(name)
    k = len(find_blocks(model))  # every block trains: each block type of the family is held
    x = torch.randn(batch_size, 3, image_size, image_size)
    blocks = {n for n, _ in find_blocks(model)}
    for method in METHODS:
        policy = TrainPolicy(k, method)
        rows = predict_units(model, policy, batch_size=batch_size, image_size=image_size)
        net = prepare(model, policy)
        measured = measure_saved_bytes(net, {n: net.get_submodule(n) for n in net.bottom_names + net.top_names}, x)
        assert [r.name for r in rows] == [n for n, _ in feature_units(model)] + [HEAD]
        for row in rows:
            assert row.nbytes == measured[row.name].nbytes, (name, method, row.name, [s.what for s in row.saved])
        assert all(measured[n].nbytes > 0 for n in blocks)


@pytest.mark.parametrize(
    "policy",
    [TrainPolicy(6, saved_precision="int8"), TrainPolicy(6, activation_mask="packed"), TrainPolicy(6, recompute=True)],
    ids=["int8", "packed", "recompute"],
)
def test_memory_options_are_predicted_to_the_byte_with_same_padding(models, policy):
    """tf_efficientnet_lite0's stride-2 blocks pad TF "SAME" before the depthwise conv: with int8
    inputs the activation before that padding keeps a packed mask, as before a ZeroPad2d."""
    model = models("tf_efficientnet_lite0")
    rows = predict_units(model, policy, batch_size=2, image_size=40)
    net = prepare(model, policy)
    measured = measure_saved_bytes(net, {n: net.get_submodule(n) for n in net.bottom_names + net.top_names}, torch.randn(2, 3, 40, 40))
    assert [(r.name, r.nbytes) for r in rows] == [(r.name, measured[r.name].nbytes) for r in rows]


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_compressed_squeeze_excitation_of_timm_blocks_is_predicted_to_the_byte(models, precision):
    """timm's SqueezeExcite becomes torchvision's SqueezeExcitation, so saved_precision compresses
    its gating multiply's input too (MobileNetV3: 8 of its blocks have one)."""
    from edgetl.nn.compress import CompressedGating

    model = models("mobilenetv3_large_100")
    policy = TrainPolicy(len(find_blocks(model)), saved_precision=precision)
    rows = predict_units(model, policy, batch_size=2, image_size=40)
    net = prepare(model, policy)
    assert sum(isinstance(m, CompressedGating) for m in net.modules()) == 8
    measured = measure_saved_bytes(net, {n: net.get_submodule(n) for n in net.top_names}, torch.randn(2, 3, 40, 40))
    assert [(r.name, r.nbytes) for r in rows if r.name in measured] == [
        (r.name, measured[r.name].nbytes) for r in rows if r.name in measured
    ]


def _closed_form_uib(n: int, c: int, t: int, h: int, w: int) -> dict[str, int]:
    """Bytes one ExtraDW UIB (start and middle depthwise, ReLU, stride 1, C in = C out, expansion t)
    stores, per PyTorch's autograd, from first principles (fp32, 4 bytes):

    vanilla: start-dw input C, its BN input C + 2C stats, expansion input C, BN input tC + 2tC,
    ReLU output (shared with the middle dw's input) tC, its BN input tC + 2tC, ReLU output (shared
    with the projection's input) tC, projection BN input C + 2C.
    MobileTL: the three internal BNs keep nothing; the masks are read off the ReLU outputs, which
    the next convs keep anyway."""
    hw, tc = n * h * w, t * c
    vanilla = 4 * hw * (c + c + c + tc + tc + tc + tc + c) + 4 * 2 * (c + tc + tc + c)
    mobiletl = 4 * hw * (c + c + tc + tc + c) + 4 * 2 * c
    return {"vanilla": vanilla, "mobiletl": mobiletl}


def test_mobilenetv4_block_reduction(models):
    """docs/memory.md's MobileNetV4 row: an ExtraDW UIB of MobileNetV4-Conv-Small (expansion 4, stride 1)."""
    from edgetl.profiler.report import profile

    model = models("mobilenetv4_conv_small")
    report = profile(model, TrainPolicy(5), batch_size=2, image_size=224)
    row = next(r for r in report.rows if r.name == "features.blocks.3.1")
    assert (row.kind, row.expand_ratio, row.stride, row.residual) == ("UniversalInvertedResidual", 4, 1, True)
    n, c, h, w = row.in_shape
    assert row.measured == row.predicted == _closed_form_uib(n, c, 4, h, w)
    print(f"\nMobileNetV4 ExtraDW UIB: {row.reduction_pct:.1f}% (paper's accounting {row.paper_reduction_pct:.1f}%)")
    expected = _closed_form_uib(n, c, 4, h, w)
    assert row.reduction_pct == pytest.approx(100 * (1 - expected["mobiletl"] / expected["vanilla"]))
    # 3C + 2tC of 4C + 4tC per pixel (t = 4): -45%, and -45.5% with the batch statistics vanilla keeps
    assert row.reduction_pct == pytest.approx(100 * (1 - 44 / 80), abs=0.6)


# --- gradients against independent float64 references -------------------------------------------


class _SignGrad(torch.autograd.Function):
    """An activation's exact forward with the gradient passed where its input is > 0."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.save_for_backward(x)
        return fn(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0).to(grad.dtype), None


class _HardSigmoid(torch.autograd.Function):
    """Hard-Sigmoid with its exact derivative, 1/6 on (-3, 3), in float64 (torch's own backward
    multiplies by a float32 1/6, 3e-8 off in double)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.hardsigmoid(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * ((x > -3) & (x < 3)).to(grad.dtype) / 6


def _frozen_affine(x, weight, bias, mean, var, eps):
    s = weight / torch.sqrt(var + eps)  # constants: frozen scale and statistics
    return x * s.view(1, -1, 1, 1) + (bias - mean * s).view(1, -1, 1, 1)


def _train_bn(x, weight, bias, eps):
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    return (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def _leaf(t, grad):
    return t.detach().clone().double().requires_grad_(grad)


def _bn_params(bn, trained_scale):
    return (_leaf(bn.weight, trained_scale), _leaf(bn.bias, True), bn.running_mean.double(), bn.running_var.double(), bn.eps)


def _compare(block: nn.Module, reference, params: dict[str, torch.Tensor], x: torch.Tensor) -> None:
    """Same output and gradients (input and every parameter ``block`` trains) as ``reference``."""
    g = torch.Generator().manual_seed(3)
    xb, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = block(xb)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out * weights).sum().backward()
    ref = reference(xr)
    (ref * weights).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xb.grad, xr.grad, rtol=1e-9, atol=1e-10)
    trained = {n: p for n, p in block.named_parameters() if p.requires_grad}
    assert set(trained) == set(params)
    for n, p in trained.items():
        torch.testing.assert_close(p.grad, params[n].grad, rtol=1e-9, atol=1e-10, msg=n)


def _prepared_block(name: str, block: str, k: int) -> nn.Module:
    torch.manual_seed(0)
    model = _randomise_norms(zoo.load_model(f"timm:{name}", num_classes=5)).double()  # shift-only constants in float64
    net = prepare(model, TrainPolicy(k))
    return net.get_submodule(block)


def _timm_original(name: str) -> nn.Module:
    """The same network (same seed) as timm builds it, before edgetl's rewrite."""
    torch.manual_seed(0)  # load_model builds timm's 1000-class network, then swaps the classifier
    return _randomise_norms(timm.create_model(name)).double()


def test_uib_gradients_match_a_float64_reference():
    """MobileNetV4 ExtraDW UIB (start dw 5x5 + norm, expansion + norm + ReLU, middle dw 5x5 + norm +
    ReLU, projection + norm, residual) under MobileTL."""
    block = _prepared_block("mobilenetv4_conv_small", "features.blocks.3.1", 5)
    ds, pe, dm, pp = block.dw_start, block.pw_exp, block.dw_mid, block.pw_proj
    raw = _timm_original("mobilenetv4_conv_small").blocks[3][1]
    p = {
        "dw_start.conv.weight": _leaf(ds.conv.weight, True),
        "pw_exp.conv.weight": _leaf(pe.conv.weight, True),
        "dw_mid.conv.weight": _leaf(dm.conv.weight, True),
        "pw_proj.conv.weight": _leaf(pp.conv.weight, True),
    }
    # the frozen values come from timm's own module (BatchNormAct2d), not from edgetl's rewrite
    norms = (raw.dw_start.bn, raw.pw_exp.bn, raw.dw_mid.bn, raw.pw_proj.bn)
    n1, n2, n3, n4 = (_bn_params(m, trained_scale=(m is raw.pw_proj.bn)) for m in norms)
    p.update({"dw_start.bn.bias": n1[1], "pw_exp.bn.0.bias": n2[1], "dw_mid.bn.0.bias": n3[1]})
    p.update({"pw_proj.bn.weight": n4[0], "pw_proj.bn.bias": n4[1]})
    c, tc = ds.conv.in_channels, pe.conv.out_channels

    def reference(x):
        h = F.conv2d(x, p["dw_start.conv.weight"], padding=2, groups=c)
        h = _frozen_affine(h, n1[0].detach(), *n1[1:])
        h = F.conv2d(h, p["pw_exp.conv.weight"])
        h = _SignGrad.apply(_frozen_affine(h, n2[0].detach(), *n2[1:]), torch.relu)
        h = F.conv2d(h, p["dw_mid.conv.weight"], padding=2, groups=tc)
        h = _SignGrad.apply(_frozen_affine(h, n3[0].detach(), *n3[1:]), torch.relu)
        h = F.conv2d(h, p["pw_proj.conv.weight"])
        return _train_bn(h, n4[0], n4[1], n4[4]) + x

    x = torch.randn(3, c, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _compare(block, reference, p, x)


def test_batchnormact_irb_gradients_match_a_float64_reference():
    """MobileNetV3-Large IRB built from timm's BatchNormAct2d (Hard-Swish fused into the norms),
    squeeze-excitation (ReLU, Hard-Sigmoid gate) and a residual, under MobileTL."""
    block = _prepared_block("mobilenetv3_large_100", "features.blocks.5.2", 1)
    raw = _timm_original("mobilenetv3_large_100").blocks[5][2]
    se = raw.se
    p = {
        "conv_pw.weight": _leaf(raw.conv_pw.weight, True),
        "conv_dw.weight": _leaf(raw.conv_dw.weight, True),
        "se.fc1.weight": _leaf(se.conv_reduce.weight, True),
        "se.fc1.bias": _leaf(se.conv_reduce.bias, True),
        "se.fc2.weight": _leaf(se.conv_expand.weight, True),
        "se.fc2.bias": _leaf(se.conv_expand.bias, True),
        "conv_pwl.weight": _leaf(raw.conv_pwl.weight, True),
    }
    b1, b2, b3 = (_bn_params(m, trained_scale=(m is raw.bn3)) for m in (raw.bn1, raw.bn2, raw.bn3))
    p.update({"bn1.0.bias": b1[1], "bn2.0.bias": b2[1], "bn3.weight": b3[0], "bn3.bias": b3[1]})
    tc = raw.conv_dw.in_channels

    def reference(x):
        h = F.conv2d(x, p["conv_pw.weight"])
        h = _SignGrad.apply(_frozen_affine(h, b1[0].detach(), *b1[1:]), F.hardswish)
        h = F.conv2d(h, p["conv_dw.weight"], padding=2, groups=tc)
        h = _SignGrad.apply(_frozen_affine(h, b2[0].detach(), *b2[1:]), F.hardswish)
        s = F.conv2d(h.mean((2, 3), keepdim=True), p["se.fc1.weight"], p["se.fc1.bias"])
        s = F.conv2d(torch.relu(s), p["se.fc2.weight"], p["se.fc2.bias"])  # ReLU: the sign rule is exact
        h = h * _HardSigmoid.apply(s)  # the gate keeps its exact derivative
        h = F.conv2d(h, p["conv_pwl.weight"])
        return _train_bn(h, b3[0], b3[1], b3[4]) + x

    x = torch.randn(2, 160, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _compare(block, reference, p, x)


# --- learning ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion_subset():
    from edgetl.data.fashion_mnist import FashionMNIST, default_root

    try:
        default_root()
        train, test = FashionMNIST(split="train"), FashionMNIST(split="test")
    except EdgetlError as exc:
        pytest.skip(f"Fashion-MNIST not installed: {exc}")
    tf = zoo.transforms_for("timm:mobilenetv4_conv_small", image_size=32, train=False)
    classes = (1, 7, 8, 9)  # trouser, sneaker, bag, ankle boot

    def take(ds, per_class):
        xs, ys, counts = [], [], dict.fromkeys(classes, 0)
        for i in range(len(ds)):
            image, label = ds[i]
            if label in counts and counts[label] < per_class:
                counts[label] += 1
                xs.append(tf(image))
                ys.append(classes.index(label))
            if all(v == per_class for v in counts.values()):
                break
        return torch.stack(xs), torch.tensor(ys)

    return take(train, 40), take(test, 20)


@pytest.mark.parametrize("method", METHODS)
def test_mobilenetv4_learns_a_small_dataset(fashion_subset, method):
    (x, y), (xt, yt) = fashion_subset
    torch.manual_seed(0)
    net = prepare(zoo.load_model("timm:mobilenetv4_conv_small", num_classes=4), TrainPolicy(4, method))
    opt = torch.optim.Adam([p for _, p in net.trainable_parameters()], lr=2e-3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        features, features_t = net.forward_bottom(x), net.eval().forward_bottom(xt)
    losses = []
    for _ in range(6):
        net.train()
        for idx in torch.randperm(len(y), generator=g).split(16):
            loss = F.cross_entropy(net.forward_top(features[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    with torch.no_grad():
        accuracy = (net.eval().forward_top(features_t).argmax(1) == yt).float().mean().item()
    print(f"\nmobilenetv4_conv_small {method}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, test accuracy {accuracy:.2f}")
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert accuracy >= 0.7  # chance: 0.25


# --- the packaged Lite0 ImageNet weights on timm's tf_efficientnet_lite0 --------------------------


def _foolbox_images():
    spec = importlib.util.find_spec("foolbox")
    root = os.path.join(list(spec.submodule_search_locations)[0], "data") if spec and spec.submodule_search_locations else None
    if root is None or not os.path.isdir(root):
        pytest.skip("foolbox's sample images not installed: pip install --no-deps foolbox==3.3.4")
    from PIL import Image

    files = sorted(f for f in os.listdir(root) if f.startswith("imagenet_"))
    labels = torch.tensor([int(os.path.splitext(f)[0].split("_")[2]) for f in files])
    return [Image.open(os.path.join(root, f)).convert("RGB") for f in files], labels


def test_lite0_key_map_is_explicit_and_strict():
    mapping = timm_models.lite0_key_map()
    raw = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    assert sorted(mapping.values()) == sorted(raw.state_dict())  # every timm tensor, once
    state = {k: torch.zeros(1) for k in mapping}
    with pytest.raises(WeightsError, match="unexpected keys \\['_extra'\\]"):
        timm_models.lite0_to_timm({**state, "_extra": torch.zeros(1)})
    del state["_blocks.3._bn1.running_var"]
    with pytest.raises(WeightsError, match="missing keys \\['_blocks.3._bn1.running_var'\\]"):
        timm_models.lite0_to_timm(state)


@pytest.mark.skipif(importlib.util.find_spec(lite0.WEIGHTS_PACKAGE) is None, reason="pip install 'edgetl[weights]'")
def test_packaged_lite0_weights_on_timm_classify_like_edgetls_lite0():
    pictures, labels = _foolbox_images()

    def predict(name: str, model: nn.Module) -> torch.Tensor:
        tf = zoo.transforms_for(name, image_size=224, train=False)
        with torch.no_grad():
            return model.eval()(torch.stack([tf(p) for p in pictures])).softmax(1)

    timm_lite0 = zoo.load_model("timm:tf_efficientnet_lite0", weights=lite0.weights_path(), num_classes=1000)
    ours = predict("timm:tf_efficientnet_lite0", timm_lite0)
    reference = predict("efficientnet_lite0", zoo.load_model("efficientnet_lite0", weights="DEFAULT", num_classes=1000))
    top1 = int((ours.argmax(1) == labels).sum())
    mean_p = ours[torch.arange(len(labels)), labels].mean().item()
    print(f"\ntimm tf_efficientnet_lite0 with the packaged weights: top-1 {top1}/20, mean p(true) {mean_p:.3f}")
    assert torch.equal(ours.argmax(1), reference.argmax(1))  # the same top-1 class for every image
    assert top1 == int((reference.argmax(1) == labels).sum()) >= 17
    assert mean_p >= 0.66
