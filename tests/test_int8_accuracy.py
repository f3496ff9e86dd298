"""What int8 quantization does to a network's numbers: ReLU6 outputs on their own [0, 6] grid, the
prepared graph's float path equal to the float32 network (batch norms and MobileTL's shift-only
norms folded correctly), and the layers that stay float32 on request.

Small synthetic networks: these are properties of the quantizer, checked against eager float32;
the accuracy on fine-tuned models is measured by ``benchmarks/int8_accuracy.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import edgetl
from edgetl.exporter import _executorch as et
from edgetl.exporter import inference, quantize
from edgetl.exporter.pipeline import _networks
from edgetl.train.policy import TrainPolicy
from tests.conftest import calibrate

#: one int8 step of a tensor in [0, 6] (256 levels)
RELU6_STEP = 6 / 255


def _wide_relu6() -> nn.Module:
    """A convolution whose pre-activation values span about [-60, 60], clamped by ReLU6: the
    clamp's output needs a grid of its own, the convolution's would be 20 times coarser."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6())
    with torch.no_grad():
        net[1].weight.fill_(20.0)
    return calibrate(net, torch.randn(64, 3, 8, 8))


def _output_scale(**options) -> float:
    """The int8 step of ``_wide_relu6``'s output in its quantized graph (the scale of the quantize
    node the graph's output is dequantized from)."""
    net = _wide_relu6()
    images = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    graph = et.quantize_int8(net, images[:8], quantize.calibration_batches(images, 8), **options)
    out = next(n for n in graph.graph.nodes if n.op == "output")
    dq = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    q = dq.args[0]
    assert "quantize_per_tensor" in str(q.target) and "dequantize" in str(dq.target)
    return float(q.args[1])


def test_relu6_output_is_quantized_on_its_own_range():
    """The clamp's output on a grid spanning [0, 6]; the quantizer left alone gives it the
    convolution's pre-clamp grid (~[-60, 60]), on which [0, 6] holds a few dozen levels."""
    assert _output_scale() == pytest.approx(RELU6_STEP, rel=0.02)
    assert _output_scale(fuse_clamps=False) > 10 * RELU6_STEP


def test_relu6_fused_into_the_int8_convolution_by_xnnpack(tmp_path):
    """Lowered, the clamp runs inside XNNPACK's int8 convolution (nothing left outside the
    delegate), and the program computes what the quantized graph computes."""
    net = _wide_relu6()
    images = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    graph = et.quantize_int8(net, images[:1], quantize.calibration_batches(images, 1))
    res = inference.export_inference(graph, images[:1])
    assert res.program.undelegated == [] and res.program.delegates == ["XnnpackBackend"]
    (tmp_path / "model.pte").write_bytes(res.program.buffer)
    out = et.Program(tmp_path / "model.pte").run("forward", images[:1].numpy())[0]
    with torch.no_grad():
        want = graph(images[:1]).numpy()
    # XNNPACK's requantization may round a value to the neighbouring level
    assert abs(out - want).max() <= 1.01 * RELU6_STEP


def test_prepared_graph_float_path_equals_the_float32_network_with_shift_only_norms():
    """The graph int8 is calibrated on (batch norms folded into convolutions, observers watching)
    computes the float32 network: here a MobileTL-prepared MobileNetV2 whose shift-only norms'
    shifts were trained away from the pretrained values, exported through the plain network."""
    torch.manual_seed(0)
    model = calibrate(edgetl.load_model("mobilenet_v2", num_classes=3), torch.randn(16, 3, 32, 32))
    policy = TrainPolicy(blocks=2)
    prepared = edgetl.prepare(model, policy)
    with torch.no_grad():
        for m in prepared.modules():
            if type(m).__name__ == "ShiftOnlyNorm":
                m.bias.add_(torch.randn_like(m.bias))
    prepared.eval()
    plain, _ = _networks(prepared, policy, "mobilenet_v2", 3)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    graph = et.prepare_int8(plain.eval(), x)
    with torch.no_grad():
        want, got = prepared(x), graph(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())), float((got - want).abs().max())
    assert not [n for n in graph.graph.nodes if "batch_norm" in str(n.target)]


def test_qat_graph_float_path_equals_the_float32_network_with_shift_only_norms():
    """The graph quantization-aware fine-tuning trains (batch norms folded with their running
    statistics, fake quantization on every tensor): with the fake quantization off it computes the
    float32 network, shift-only norms included; with it on, int8's rounding; at another batch size
    than it was captured at too."""
    torch.manual_seed(0)
    model = calibrate(edgetl.load_model("mobilenet_v2", num_classes=3), torch.randn(16, 3, 32, 32))
    policy = TrainPolicy(blocks=2)
    prepared = edgetl.prepare(model, policy)
    with torch.no_grad():
        for m in prepared.modules():
            if type(m).__name__ == "ShiftOnlyNorm":
                m.bias.add_(torch.randn_like(m.bias))
    prepared.eval()
    plain, _ = _networks(prepared, policy, "mobilenet_v2", 3)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    graph = et.prepare_int8_qat(plain.eval(), x[:2])
    assert not [n for n in graph.graph.nodes if "batch_norm" in str(n.target)]
    et.qat_mode(graph, observe=True)
    with torch.no_grad():
        graph(x)  # ranges observed
        want = prepared(x)
        et.qat_mode(graph, observe=False, fake_quant=False)
        float_path = graph(x)
        et.qat_mode(graph, observe=False)
        fake = graph(x)
    tol = 1e-4 * float(want.abs().max())
    assert torch.allclose(float_path, want, rtol=1e-4, atol=tol), float((float_path - want).abs().max())
    assert float((fake - want).abs().max()) > 100 * tol


def test_float_layers_stay_float32_and_only_layers_alone_are_int8():
    net = _wide_relu6()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    layers = et.quantizable_layers(net, x)
    assert layers == ["0"]
    with torch.no_grad():
        want = net(x)
        kept = et.quantize_int8(net, x, [x], float_layers=layers)(x)
        alone = et.quantize_int8(net, x, [x], only_layers=layers)(x)
    # the float convolution's output is quantized by nothing: float32 to rounding
    assert torch.allclose(kept, want, atol=1e-5)
    assert float((alone - want).abs().max()) > 1e-3


def test_mixed_precision_keeps_the_fewest_costliest_layers_float32():
    from edgetl.exporter import sensitivity

    ranking = [f"l{i}" for i in range(12)]
    seen = []

    def drop(float_layers):
        seen.append(list(float_layers))
        return max(0, 10 - 2 * len(float_layers))

    got = sensitivity.choose_float_layers(drop, ranking, 1.0, log=lambda _: None)
    # 10 - 2n <= 1 first at n = 5: the five first-ranked layers, found by doubling then bisecting
    assert got.float_layers == ranking[:5] and got.accuracy_drop == 0.0
    assert [n for n, _ in got.tried] == [1, 2, 4, 5, 6, 8] and all(s == ranking[: len(s)] for s in seen)
    assert sensitivity.choose_float_layers(drop, ranking, 2.0, log=lambda _: None).float_layers == ranking[:4]
    assert sensitivity.choose_float_layers(lambda _: 3.0, ranking, 1.0, log=lambda _: None) is None


def test_sensitivity_ranks_the_layer_whose_input_range_is_wasted_first():
    """A tensor with one channel 1000 times the others: the convolution writing it and the one
    reading it, alone int8, quantize it on a grid 1000 times too coarse for the other channels;
    the linear layer after them is barely touched."""
    from edgetl.exporter import sensitivity

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4)).eval()
    with torch.no_grad():
        net[0].weight[0].mul_(1000.0)
        net[0].bias[0] = 0.0
        net[1].weight[:, 0] /= 1000.0  # the network's output stays moderate
    x = torch.randn(50, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    fp32 = quantize.eager_outputs(net, x)
    labels = torch.from_numpy(fp32.argmax(1))
    report = sensitivity.measure(net, x, x, labels, fp32, log=lambda _: None)
    assert [e.layer for e in report.layers] == ["0", "1", "4"]
    assert report.ranking()[2] == "4" and report.fp32_accuracy == 100.0
    by = {e.layer: e for e in report.layers}
    assert max(by["0"].sqnr_db, by["1"].sqnr_db) < by["4"].sqnr_db - 10
    assert report.ranges and all(lo <= hi for lo, hi in report.ranges.values())


def test_layers_xnnpack_cannot_run_float32_between_int8_layers_are_not_offered(tmp_path):
    """A convolution reading an explicit pad of an intermediate activation (EfficientNet-Lite's
    stride-2 depthwise convolutions) cannot stay float32; the others can, and lower."""
    net = nn.Sequential(
        nn.ZeroPad2d((0, 1, 0, 1)),
        nn.Conv2d(3, 8, 3, stride=2),
        nn.ReLU6(),
        nn.ZeroPad2d((0, 1, 0, 1)),
        nn.Conv2d(8, 8, 3, stride=2, groups=8),
        nn.ReLU6(),
        nn.Conv2d(8, 4, 1),
    ).eval()
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    assert et.quantizable_layers(net, x[:1]) == ["1", "4", "6"]
    floatable = et.quantizable_layers(net, x[:1], floatable=True)
    assert floatable == ["1", "6"]
    graph = et.quantize_int8(net, x[:1], [x[i : i + 1] for i in range(8)], float_layers=floatable)
    res = inference.export_inference(graph, x[:1])
    assert res.program.delegates == ["XnnpackBackend"]
