"""Bytes stored for backward: analytic prediction against autograd's own saved-tensor hooks."""

from __future__ import annotations

import pytest
import torch

from edgetl.models.blocks import block_spec, find_blocks
from edgetl.models.zoo import MODELS, load_model
from edgetl.profiler.analytic import saved_for_backward, total_bytes
from edgetl.profiler.measure import measure_saved_bytes
from edgetl.profiler.predict import predict_units
from edgetl.train.policy import TrainPolicy
from edgetl.train.prepare import prepare

POLICIES = [("vanilla", "reuse"), ("mobiletl", "reuse"), ("mobiletl", "packed")]


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    torch.manual_seed(0)
    return request.param, load_model(request.param, num_classes=7)


@pytest.mark.parametrize("method,mask", POLICIES)
@pytest.mark.parametrize("batch_size,image_size", [(2, 64), (3, 96)])
def test_predicted_equals_measured_for_every_block(model, method, mask, batch_size, image_size):
    name, m = model
    policy = TrainPolicy(blocks=len(find_blocks(m)), method=method, activation_mask=mask)
    net = prepare(m, policy)
    predicted = predict_units(m, policy, batch_size=batch_size, image_size=image_size)
    measured = measure_saved_bytes(
        net, {n: net.get_submodule(n) for n in net.bottom_names + net.top_names}, torch.randn(batch_size, 3, image_size, image_size)
    )
    assert set(measured) == {row.name for row in predicted}
    for row in predicted:
        got = measured[row.name]
        if row.name != "head":  # the head is no module: nothing records its input
            assert row.in_shape == got.in_shape, row.name
        assert row.nbytes == got.nbytes, (name, row.name, [(s.what, s.shape, s.nbytes) for s in row.saved], got.tensors)


def test_mobiletl_block_keeps_no_norm_input_and_no_float_mask():
    """V2 block, expansion 6, stride 1, C in = C out: closed forms, independent of the analytic code."""
    m = load_model("mobilenet_v2", num_classes=3)
    name, block = next((n, b) for n, b in find_blocks(m) if b.use_res_connect and len(b.conv) == 4)
    spec = block_spec(name, block)
    assert spec.expand_ratio == 6 and spec.stride == 1
    n, c, h, w = 4, spec.in_channels, 8, 8
    t = 6 * c
    mob, _ = saved_for_backward(spec.layers, (n, c, h, w), mobiletl=True)
    van, _ = saved_for_backward(spec.layers, (n, c, h, w))
    packed, _ = saved_for_backward(spec.layers, (n, c, h, w), mobiletl=True, activation_mask="packed")
    hw4 = 4 * n * h * w
    # MobileTL: expansion-conv input, depthwise input, projection input, last-norm input + its 2C stats
    assert total_bytes(mob) == hw4 * (c + t + t + c) + 4 * 2 * c
    # + two bit-packed masks of the expanded maps
    assert total_bytes(packed) == total_bytes(mob) + 2 * (-(-n * t * h * w // 8))
    # vanilla: also both internal norm inputs, both fp32 ReLU6 inputs, and their stats
    assert total_bytes(van) == hw4 * (c + 6 * t + c) + 4 * 2 * (t + t + c)
