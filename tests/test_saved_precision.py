"""TrainPolicy.saved_precision: MobileTL's convs keep their input bf16 / int8 for backward.

What is held: the forward and every gradient but those convs' weight gradients are bit-identical to
fp32's; those weight gradients are within a bound derived from the format, element by element
(bf16: each stored element is off by at most 2^-8 of itself; int8: by at most half its channel's
scale); autograd keeps exactly the bytes the profiler predicts; the exporter refuses the policy for
the training program.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torchvision.ops import SqueezeExcitation

import edgetl
from edgetl.cli import main
from edgetl.exporter import training
from edgetl.exporter.errors import ExportError
from edgetl.models.blocks import block_spec, find_blocks
from edgetl.models.zoo import MODELS, load_model
from edgetl.nn import compress
from edgetl.nn.compress import (
    DECOMPRESS_CHUNK_BYTES,
    CompressedConv2d,
    CompressedGating,
    compress_gating,
    compressed_nbytes,
    decompress_chunk,
    decompressed,
    dequantize_int8,
    int8_scale,
    scale_saved,
)
from edgetl.nn.layers import MaskedActivation
from edgetl.profiler._torch_memory import CATEGORIES, Recorder
from edgetl.profiler.analytic import saved_for_backward, total_bytes
from edgetl.profiler.measure import measure_saved_bytes
from edgetl.profiler.predict import predict_units
from edgetl.train.policy import TrainPolicy
from edgetl.train.prepare import prepare
from tests.conftest import calibrate

PRECISIONS = ("bf16", "int8")
#: bf16 keeps 8 significant bits, rounded to nearest: |bf16(x) - x| <= 2^-8 |x|
BF16_UNIT_ROUNDOFF = 2.0**-8
#: fp32 summation-order slack between two convolution_backward calls, relative to sum |dy| |x|
#: (sqrt(n) * 2^-24 for n ~ 10^4 terms is ~6e-6; 2^-14 ~ 6e-5 is still 64x below bf16's term)
FP32_SLACK = 2.0**-14


def weight_grad_bound(x: torch.Tensor, dy: torch.Tensor, conv: nn.Conv2d, precision: str) -> torch.Tensor:
    """Element-wise bound on |dW(stored x) - dW(x)|: dW = sum dy * x over batch and positions, so
    an error e in x moves dW by at most sum |dy| |e|. bf16: |e| <= 2^-8 |x|; int8: |e| <= s_c / 2."""

    def dw(inp: torch.Tensor) -> torch.Tensor:
        return torch.nn.grad.conv2d_weight(inp, conv.weight.shape, dy.abs(), conv.stride, conv.padding, conv.dilation, conv.groups)

    magnitude = dw(x.abs())
    if precision == "bf16":
        return (BF16_UNIT_ROUNDOFF + FP32_SLACK) * magnitude
    half_step = (int8_scale(x) / 2).view(1, -1, 1, 1).expand_as(x).contiguous()
    return dw(half_step) * (1 + FP32_SLACK) + FP32_SLACK * magnitude


# --- the conv -------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(
    ("cin", "cout", "kernel", "stride", "groups", "bias"),
    [(16, 24, 1, 1, 1, False), (16, 16, 3, 2, 16, False), (16, 16, 5, 1, 16, False), (8, 12, 3, 1, 1, True)],
)
def test_conv_forward_and_input_grad_are_fp32s_weight_grad_within_format_bound(precision, cin, cout, kernel, stride, groups, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=bias)
    compressed = CompressedConv2d(conv, precision)
    assert compressed.state_dict().keys() == conv.state_dict().keys()
    assert compressed.weight is conv.weight
    # activations: non-negative (after ReLU6) with one channel far larger, one all zeros
    x = torch.rand(4, cin, 12, 12) * 6
    x[:, 1] *= 40
    x[:, 2] = 0
    x.requires_grad_(True)
    y_ref, y = conv(x), compressed(x)
    assert torch.equal(y, y_ref)
    dy = torch.randn_like(y)
    params = [conv.weight] + ([conv.bias] if bias else [])
    ref = torch.autograd.grad(y_ref, [x, *params], dy)
    got = torch.autograd.grad(y, [x, *params], dy)
    assert torch.equal(got[0], ref[0])  # grad_input reads only the weight
    if bias:
        assert torch.equal(got[2], ref[2])  # grad_bias reads only dy
    err = (got[1] - ref[1]).abs()
    bound = weight_grad_bound(x.detach(), dy, conv, precision)
    assert (err <= bound).all(), float((err - bound).max())
    assert err.max() > 0  # the weight gradient did see the stored copy, not the fp32 input
    # backward computed from the decompressed input directly: the same numbers
    want = torch.nn.grad.conv2d_weight(decompressed(x.detach(), precision), conv.weight.shape, dy, conv.stride, conv.padding, groups=groups)
    torch.testing.assert_close(got[1], want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_conv_keeps_only_the_compressed_input(precision):
    conv = CompressedConv2d(nn.Conv2d(8, 16, 3, padding=1, bias=False), precision)
    x = torch.randn(3, 8, 10, 10, requires_grad=True)
    kept = measure_saved_bytes(nn.Sequential(conv), {"conv": conv}, x)["conv"]
    assert kept.nbytes == compressed_nbytes(x.shape, precision) == {"bf16": 2 * x.numel(), "int8": x.numel() + 4 * 8}[precision]
    assert {dtype for _, dtype, _ in kept.tensors} == ({"bfloat16"} if precision == "bf16" else {"int8", "float32"})
    # without autograd the plain conv runs: nothing compressed, nothing kept
    with torch.no_grad():
        assert torch.equal(conv(x), nn.functional.conv2d(x, conv.weight, None, 1, 1))


def test_int8_round_trip_is_within_half_a_step_and_an_empty_channel_is_exact():
    x = torch.randn(5, 6, 7, 7) * torch.tensor([1e-3, 1, 10, 100, 0, 3]).view(1, -1, 1, 1)
    scale = int8_scale(x)
    assert scale[4] == 1 and torch.equal(scale[[0, 1, 2, 3, 5]], x.abs().amax(dim=(0, 2, 3))[[0, 1, 2, 3, 5]] / 127)
    back = decompressed(x, "int8")
    assert ((back - x).abs() <= scale.view(1, -1, 1, 1) / 2 * (1 + 1e-6)).all()
    assert torch.equal(back[:, 4], x[:, 4])
    bf = decompressed(x, "bf16")
    assert ((bf - x).abs() <= BF16_UNIT_ROUNDOFF * x.abs()).all()


def test_int8_dequantize_is_bit_identical_to_convert_then_scale_in_one_fp32_map():
    """``dequantize_int8`` used ``q.to(float32) * scale``: two fp32 maps alive. Now one (converted,
    scaled in place), with the same bits."""
    q = torch.arange(-127, 128, dtype=torch.int8).repeat(4 * 6 * 3)[: 4 * 6 * 9 * 9].view(4, 6, 9, 9)
    scale = torch.tensor([1e-3, 1 / 127, 0.37, 1.0, 12.5, 3e4])
    assert torch.equal(dequantize_int8(q, scale), q.to(torch.float32) * scale.view(1, -1, 1, 1))
    out: list[torch.Tensor] = []
    live = Recorder().run(lambda _: out.append(dequantize_int8(q, scale))).live
    assert max(map(sum, live)) - sum(live[0]) == 4 * q.numel()


def test_decompress_chunk_keeps_the_fp32_chunk_within_its_limit():
    for shape in [(8, 672, 14, 14), (8, 480, 14, 14), (32, 672, 4, 4), (32, 1152, 2, 2), (2, 16, 300, 300), (5, 7, 6, 6)]:
        chunk, per_image = decompress_chunk(shape), 4 * math.prod(shape[1:])
        assert 1 <= chunk <= shape[0]
        # the largest that fits; one image when one does not fit
        assert chunk * per_image <= DECOMPRESS_CHUNK_BYTES or chunk == 1, shape
        assert chunk == shape[0] or (chunk + 1) * per_image > DECOMPRESS_CHUNK_BYTES, shape
    assert decompress_chunk((8, 672, 14, 14)) == 1 and decompress_chunk((32, 1152, 2, 2)) == 32


#: DECOMPRESS_CHUNK_BYTES for 5 x 7 x 6 x 6 inputs: one image a chunk, and two (chunks 2, 2, 1)
CHUNK_LIMITS = {"one image": 0, "two images": 2 * 4 * 7 * 6 * 6}


@pytest.mark.parametrize("limit", CHUNK_LIMITS.values(), ids=CHUNK_LIMITS.keys())
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(
    ("cout", "kernel", "stride", "groups", "dilation", "bias"),
    [(12, 1, 1, 1, 1, False), (7, 3, 2, 7, 1, False), (7, 5, 1, 7, 1, False), (14, 3, 2, 1, 1, True), (7, 3, 1, 7, 2, False)],
)
def test_chunked_backward_sums_to_the_unchunked_weight_grad_and_keeps_fp32s_input_grad(
    monkeypatch, limit, precision, cout, kernel, stride, groups, dilation, bias
):
    """The weight (and bias) gradient summed over batch chunks equals the unchunked formula from the
    same decompressed input to fp32 rounding; the input gradient (a transposed convolution of dy) is
    bit-identical to fp32 autograd's, even sizes under a stride included (output padding)."""
    monkeypatch.setattr(compress, "DECOMPRESS_CHUNK_BYTES", limit)
    x = torch.rand(5, 7, 6, 6) * 6
    x[:, 1] *= 30
    assert decompress_chunk(tuple(x.shape)) == (1 if limit == 0 else 2)
    torch.manual_seed(0)
    conv = nn.Conv2d(7, cout, kernel, stride, dilation * (kernel // 2), dilation, groups=groups, bias=bias)
    x.requires_grad_(True)
    y = CompressedConv2d(conv, precision)(x)
    dy = torch.randn_like(y)
    params = [conv.weight] + ([conv.bias] if bias else [])
    got = torch.autograd.grad(y, [x, *params], dy)
    ref = torch.autograd.grad(conv(x), [x, *params], dy)
    assert torch.equal(got[0], ref[0])
    want = torch.nn.grad.conv2d_weight(decompressed(x.detach(), precision), conv.weight.shape, dy, stride, conv.padding, dilation, groups)
    torch.testing.assert_close(got[1], want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    if bias:
        torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5 * float(ref[2].abs().max()))
    # without the input's gradient (the lowest trained conv): the same weight gradient
    w_only = torch.autograd.grad(CompressedConv2d(conv, precision)(x.detach()), [conv.weight], dy)[0]
    assert torch.equal(w_only, got[1])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_chunked_gate_gradient_is_the_unchunked_one_bit_for_bit(monkeypatch, precision):
    """dgate sums over H, W of one sample: chunking the batch changes no bit of it."""
    torch.manual_seed(0)
    x = (torch.rand(5, 7, 6, 6) * 6).requires_grad_(True)
    gate = torch.rand(5, 7, 1, 1, requires_grad=True)
    dy = torch.randn(5, 7, 6, 6)
    grads = {}
    for label, limit in {**CHUNK_LIMITS, "whole batch": 2**62}.items():
        monkeypatch.setattr(compress, "DECOMPRESS_CHUNK_BYTES", limit)
        grads[label] = torch.autograd.grad(scale_saved(x, gate, precision), [x, gate], dy)
    assert decompress_chunk(tuple(x.shape)) == 5
    for label in CHUNK_LIMITS:
        assert all(torch.equal(a, b) for a, b in zip(grads[label], grads["whole batch"], strict=True)), label


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kind", ["depthwise", "pointwise", "gating"])
def test_backward_holds_one_fp32_chunk_of_the_stored_input(precision, kind):
    """Backward used to hold the whole decompressed input (int8: twice, and a zero-filled gradient for
    the stored tensor): now its temporaries are one chunk of decompress_chunk images (and, for a
    conv, the weight gradient's partial sum), measured with torch's allocation events."""
    torch.manual_seed(0)
    x = torch.randn(8, 96, 28, 28, requires_grad=True)  # 2.3 MiB fp32: chunks of 3 images
    if kind == "gating":
        y, weight = scale_saved(x, torch.rand(8, 96, 1, 1, requires_grad=True), precision), 0
    else:
        conv = nn.Conv2d(96, 96, 5, padding=2, groups=96, bias=False) if kind == "depthwise" else nn.Conv2d(96, 24, 1, bias=False)
        y, weight = CompressedConv2d(conv, precision)(x), 4 * conv.weight.numel()
    dy = torch.randn_like(y)
    chunk = 4 * decompress_chunk(tuple(x.shape)) * math.prod(x.shape[1:])
    assert chunk < 4 * x.numel() // 2
    live = Recorder().run(lambda _: torch.autograd.backward(y, dy)).live
    temporaries = max(row[CATEGORIES.index("temporaries")] for row in live)
    assert chunk <= temporaries <= chunk + weight + 4 * 8 * 96, (temporaries, chunk)


# --- the squeeze-excitation's gating multiply ---------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_gating_multiply_gives_exact_dx_and_the_gate_gradient_within_format_bound(precision):
    torch.manual_seed(0)
    x = torch.rand(4, 16, 9, 9) * 6
    x[:, 3] *= 50
    x[:, 5] = 0
    x.requires_grad_(True)
    gate = torch.rand(4, 16, 1, 1, requires_grad=True)
    y = scale_saved(x, gate, precision)
    assert torch.equal(y, gate * x)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, gate], dy)
    ref = torch.autograd.grad(gate * x, [x, gate], dy)
    assert torch.equal(got[0], ref[0])  # dx = dy * gate never reads the stored input
    err = (got[1] - ref[1]).abs()
    # dgate = sum_hw dy * x: an error e in x moves it by at most sum_hw |dy| |e|
    if precision == "bf16":
        bound = (BF16_UNIT_ROUNDOFF + FP32_SLACK) * (dy.abs() * x.detach().abs()).sum((2, 3), keepdim=True)
    else:
        half_step = int8_scale(x.detach()).view(1, -1, 1, 1) / 2
        bound = (dy.abs() * half_step).sum((2, 3), keepdim=True) * (1 + FP32_SLACK) + FP32_SLACK * (dy.abs() * x.detach().abs()).sum(
            (2, 3), keepdim=True
        )
    assert (err <= bound).all(), float((err - bound).max())
    assert err.max() > 0  # the gate's gradient did read the stored copy
    want = (dy * decompressed(x.detach(), precision)).sum((2, 3), keepdim=True)
    torch.testing.assert_close(got[1], want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_compressed_squeeze_excitation_keeps_its_input_compressed_and_its_keys(precision):
    torch.manual_seed(0)
    se = SqueezeExcitation(24, 8, scale_activation=nn.Hardsigmoid)
    plain = SqueezeExcitation(24, 8, scale_activation=nn.Hardsigmoid)
    plain.load_state_dict(se.state_dict())
    compress_gating(se, precision)
    assert type(se).__name__ == "SqueezeExcitation" and isinstance(se, SqueezeExcitation)
    assert se.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(3, 24, 7, 7, requires_grad=True)
    assert torch.equal(se(x), plain(x))
    stored = {m: measure_saved_bytes(nn.Sequential(m), {"se": m}, x)["se"] for m in (se, plain)}
    # the full map: compressed instead of fp32; the pooled / squeezed vectors and the gate as before
    assert stored[plain].nbytes - stored[se].nbytes == 4 * x.numel() - compressed_nbytes(tuple(x.shape), precision)
    with pytest.raises(TypeError, match="no _scale"):
        compress_gating(nn.Conv2d(3, 3, 1), precision)


# --- prepare ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_prepare_compresses_the_convs_of_mobiletl_blocks_only(name):
    torch.manual_seed(0)
    model = load_model(name, num_classes=3)
    k = 3
    fp32 = prepare(model, TrainPolicy(blocks=k))
    net = prepare(model, TrainPolicy(blocks=k, saved_precision="int8"))
    assert net.state_dict().keys() == fp32.state_dict().keys()
    assert all(torch.equal(v, fp32.state_dict()[key]) for key, v in net.state_dict().items())
    assert [n for n, _ in net.trainable_parameters()] == [n for n, _ in fp32.trainable_parameters()]
    for unit_name in net.top_names:
        unit = net.get_submodule(unit_name)
        in_se = {id(m) for se in unit.modules() if isinstance(se, SqueezeExcitation) for m in se.modules()}
        for m in unit.modules():
            if isinstance(m, nn.Conv2d):
                # MobileTL blocks' convs, the squeeze-excitation's excepted; never the final conv stage
                want = unit_name in net.trained_block_names and id(m) not in in_se
                assert isinstance(m, CompressedConv2d) == want, (unit_name, m)
    # an activation feeding a compressed conv keeps a packed mask (and with "reuse" no other does)
    for block_name in net.trained_block_names:
        layers = block_spec(block_name, net.get_submodule(block_name)).layers
        acts = [m for m in net.get_submodule(block_name).modules() if isinstance(m, MaskedActivation) and m.kind not in ("hardsigmoid",)]
        outer = [
            m
            for m in acts
            if not any(m is a for se in net.get_submodule(block_name).modules() if isinstance(se, SqueezeExcitation) for a in se.modules())
        ]
        ops = [layer.op for layer in layers if layer.op != "pad"]
        feeds_compressed = [ops[i + 1] in ("conv", "se") for i, op in enumerate(ops) if op == "act"]
        assert [m.mask for m in outer] == ["packed" if f else "reuse" for f in feeds_compressed], block_name
        # every squeeze-excitation of a MobileTL block keeps its gating multiply's input compressed
        ses = [m for m in net.get_submodule(block_name).modules() if isinstance(m, SqueezeExcitation)]
        assert all(isinstance(se, CompressedGating) and se.saved_precision == "int8" for se in ses)
        assert ("se" in ops) == bool(ses)
    vanilla = prepare(model, TrainPolicy(blocks=k, method="vanilla", saved_precision="bf16"))
    assert not any(isinstance(m, (CompressedConv2d, CompressedGating)) for m in vanilla.modules())
    assert not any(isinstance(m, CompressedGating) for m in model.modules())  # the model itself is left as it was


# --- the profiler -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("precision", "mask"), [("bf16", "reuse"), ("int8", "reuse"), ("int8", "packed")])
def test_predicted_equals_measured_with_compressed_conv_inputs(name, precision, mask):
    torch.manual_seed(0)
    model = load_model(name, num_classes=7)
    blocks = len(find_blocks(model))
    batch_size, image_size = 2, 48
    policy = TrainPolicy(blocks=blocks, activation_mask=mask, saved_precision=precision)
    net = prepare(model, policy)
    predicted = predict_units(model, policy, batch_size=batch_size, image_size=image_size)
    measured = measure_saved_bytes(
        net, {n: net.get_submodule(n) for n in net.top_names}, torch.randn(batch_size, 3, image_size, image_size)
    )
    for row in predicted:
        assert row.nbytes == measured[row.name].nbytes, (
            name,
            row.name,
            [(s.what, s.shape, s.nbytes) for s in row.saved],
            measured[row.name].tensors,
        )
    # and it is a saving: every MobileTL block keeps less than at fp32
    fp32 = {
        r.name: r.nbytes
        for r in predict_units(model, TrainPolicy(blocks=blocks, activation_mask=mask), batch_size=batch_size, image_size=image_size)
    }
    for row in predicted:
        assert (row.nbytes < fp32[row.name]) if row.role == "block" else (row.nbytes == fp32[row.name]), row.name


@pytest.mark.parametrize("mask", ["reuse", "packed"])
def test_v2_block_closed_form(mask):
    """V2 block, expansion 6: the three conv inputs compressed, both ReLU6 masks packed (1 bit),
    the last norm's input and statistics fp32. Closed forms, independent of the analytic code."""
    m = load_model("mobilenet_v2", num_classes=3)
    name, block = next((n, b) for n, b in find_blocks(m) if b.use_res_connect and len(b.conv) == 4)
    spec = block_spec(name, block)
    n, c, h, w = 4, spec.in_channels, 8, 8
    t = 6 * c
    hw = n * h * w
    masks = 2 * math.ceil(hw * t / 8)
    last_norm = 4 * hw * c + 4 * 2 * c
    for precision, per_element, per_channel in (("bf16", 2, 0), ("int8", 1, 4)):
        items, _ = saved_for_backward(spec.layers, (n, c, h, w), mobiletl=True, activation_mask=mask, saved_precision=precision)
        convs = per_element * hw * (c + t + t) + per_channel * (c + t + t)
        assert total_bytes(items) == convs + masks + last_norm, precision
    # fp32 for comparison: the same masks are free ("reuse") or packed
    fp32, _ = saved_for_backward(spec.layers, (n, c, h, w), mobiletl=True, activation_mask=mask)
    assert total_bytes(fp32) == 4 * hw * (c + t + t) + (masks if mask == "packed" else 0) + last_norm


# --- gradients of whole networks ------------------------------------------------------------------------


#: relative (Frobenius) error allowed on gradients below a compressed squeeze-excitation, whose gate
#: gradient reads the stored input and travels down the block (measured: bf16 ~2e-3, int8 ~8e-3)
BELOW_SE_TOLERANCE = {"bf16": 1e-2, "int8": 5e-2}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("precision", PRECISIONS)
def test_network_gradients_match_fp32_and_weight_grads_are_within_format_bound(name, precision):
    torch.manual_seed(0)
    model = calibrate(load_model(name, num_classes=5), torch.randn(8, 3, 48, 48))
    k = 3
    x = torch.randn(4, 3, 48, 48)
    y = torch.tensor([0, 1, 2, 3])
    runs = {}
    for prec in ("fp32", precision):
        net = prepare(model, TrainPolicy(blocks=k, saved_precision=prec))
        features = net.forward_bottom(x).requires_grad_(True)
        seen: dict[str, list] = {}

        def record(module, args, out, _seen=seen):
            _seen[module.qualified] = [args[0].detach(), None]
            out.register_hook(lambda g, key=module.qualified: _seen[key].__setitem__(1, g.detach()))

        for qualified, m in net.named_modules():
            if isinstance(m, CompressedConv2d):
                m.qualified = qualified
                m.register_forward_hook(record)
        torch.manual_seed(1)  # the same dropout / stochastic-depth draws in both
        logits = net.forward_top(features)
        loss = nn.functional.cross_entropy(logits, y)
        loss.backward()
        grads = {n: p.grad for n, p in net.trainable_parameters()}
        runs[prec] = (net, logits.detach(), features.grad, grads, seen)
    net_fp, logits_fp, gx_fp, grads_fp, _ = runs["fp32"]
    net_c, logits_c, gx_c, grads_c, seen = runs[precision]
    assert torch.equal(logits_c, logits_fp)
    compressed = {f"{q}.weight": q for q in seen}
    assert len(compressed) >= 2 * k  # depthwise and projection, and most blocks an expansion
    # each compressed conv's weight gradient against fp32's formula on the same output gradient
    rel = []
    for pname, q in compressed.items():
        conv = net_c.get_submodule(q)
        xin, dy = seen[q]
        exact = torch.nn.grad.conv2d_weight(xin, conv.weight.shape, dy, conv.stride, conv.padding, conv.dilation, conv.groups)
        err = (grads_c[pname] - exact).abs()
        bound = weight_grad_bound(xin, dy, conv, precision)
        assert (err <= bound).all(), (pname, float((err - bound).max()))
        rel.append(float((grads_c[pname] - grads_fp[pname]).norm() / grads_fp[pname].norm()))
    others = {p: float((g - grads_fp[p]).norm() / grads_fp[p].norm()) for p, g in grads_c.items() if p not in compressed}
    if any(isinstance(m, CompressedGating) for m in net_c.modules()):
        # the gate's gradient reads the stored input and reaches everything below the SE
        tolerance = BELOW_SE_TOLERANCE[precision]
        assert max(others.values()) <= tolerance, max(others.items(), key=lambda kv: kv[1])
        assert float((gx_c - gx_fp).norm() / gx_fp.norm()) <= tolerance
        assert all(torch.equal(g, grads_fp[p]) for p, g in grads_c.items() if p.startswith("classifier."))
    else:
        assert torch.equal(gx_c, gx_fp)  # input gradients never read the stored inputs
        assert all(torch.equal(g, grads_fp[p]) for p, g in grads_c.items() if p not in compressed)
    median = sorted(rel)[len(rel) // 2]
    print(
        f"{name} {precision}: weight-gradient relative error (Frobenius) of the compressed convs: median {median:.2e}, "
        f"max {max(rel):.2e}; other gradients max {max(others.values()):.2e}"
    )
    assert max(rel) > 0


# --- the exporter -------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_exporter_refuses_compressed_saved_inputs_for_the_training_program(tmp_path, precision):
    pytest.importorskip("executorch")
    model = load_model("mobilenet_v3_small", num_classes=3)
    policy = TrainPolicy(blocks=2, saved_precision=precision)
    with pytest.raises(
        ExportError, match=rf"^the training program keeps conv inputs in fp32 only: TrainPolicy.saved_precision='{precision}' is eager-only"
    ):
        edgetl.export(model, policy, tmp_path / "dist", edgetl.ExportConfig(image_size=32, batch_size=2, training=True), log=lambda _: None)
    assert not (tmp_path / "dist").exists()  # refused before anything was lowered or written
    net = prepare(model, policy)
    with pytest.raises(ExportError, match="saved_precision"):
        training.export_training(net, feature_shape=tuple(net.forward_bottom(torch.zeros(2, 3, 32, 32)).shape), num_classes=3)


def test_inference_program_of_a_compressed_policy_model_is_exported(tmp_path):
    """model.pte is the plain architecture with the trained weights: the policy does not reach it."""
    pytest.importorskip("executorch")
    torch.manual_seed(0)
    model = calibrate(load_model("mobilenet_v3_small", num_classes=3), torch.randn(8, 3, 32, 32))
    policy = TrainPolicy(blocks=2, saved_precision="int8")
    net = prepare(model, policy)
    bundle = edgetl.export(net, policy, tmp_path / "dist", edgetl.ExportConfig(image_size=32), log=lambda _: None)
    assert bundle.manifest.programs.training is None
    assert bundle.manifest.model.policy["saved_precision"] == "int8"
    assert bundle.manifest.verification.inference_max_abs_diff < 1e-3


# --- the trainer ----------------------------------------------------------------------------------------


def test_finetune_with_int8_saved_inputs_trains_and_saves_plain_weights(tmp_path, image_folder, capsys):
    config = edgetl.FinetuneConfig(
        model="mobilenet_v3_small",
        weights=None,
        data=str(image_folder),
        policy=TrainPolicy(blocks=2, saved_precision="int8"),
        epochs=2,
        batch_size=8,
        image_size=32,
        lr=3e-3,
        augment=False,
        workers=0,
        out=str(tmp_path / "run"),
    )
    result = edgetl.finetune(config, log=lambda _: None)
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert any(isinstance(m, CompressedConv2d) for m in result.model.modules())
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["policy"]
    assert saved["saved_precision"] == "int8"
    plain = load_model("mobilenet_v3_small", weights=tmp_path / "run" / "model.pt", num_classes=3)
    assert plain.state_dict().keys() == result.model.state_dict().keys()
    # the compressed convs trained: their weights moved from the initialisation (the same seed
    # draws the same initialisation: the frozen bottom's weights are those)
    torch.manual_seed(config.seed)
    start = load_model("mobilenet_v3_small", num_classes=3).state_dict()
    trained = result.model.state_dict()
    bottom = f"{result.model.bottom_names[-1]}.block.0.0.weight"
    assert torch.equal(trained[bottom], start[bottom])
    for m in result.model.modules():
        if isinstance(m, CompressedConv2d):
            key = next(k for k, v in result.model.named_parameters() if v is m.weight)
            assert not torch.equal(trained[key], start[key]), key
    # its run exports for inference; 'edgetl export --training' refuses it with one line
    pytest.importorskip("executorch")
    code = main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "dist"), "--training"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("edgetl: error: the training program keeps conv inputs in fp32 only: TrainPolicy.saved_precision='int8'")
    assert not (tmp_path / "dist").exists()
