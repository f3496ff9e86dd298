"""The native step-time prediction (edgetl.profiler.step_time): shapes against measured FLOPs, the
device profile's rates, and the planner's step time."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import edgetl
from edgetl.profiler.device import DeviceProfileError, device_from_dict
from edgetl.profiler.native import ProgramMemory
from edgetl.profiler.planner import plan
from edgetl.profiler.step_time import LAYER_COST, MAP_PASSES, predict_native_step_time, step_work

BOARD = {
    "name": "board",
    "memory_total": "1GiB",
    "memory_budget": "512MiB",
    "safety_margin": 0.1,
    "cores": 4,
    "arch": "aarch64",
    "notes": "test board",
}


@pytest.mark.parametrize(("name", "blocks"), [("mobilenet_v3_large", 5), ("mobilenet_v2", 3), ("efficientnet_lite0", 4)])
def test_step_work_counts_the_forward_that_pytorch_counts(name, blocks):
    """The analytic forward FLOPs of the trained top equal torch's FLOP counter over the real top;
    a step (both gradients, no input gradient for the top's first layer) is between 2x and 3x that."""
    model = edgetl.load_model(name, num_classes=10)
    policy = edgetl.TrainPolicy(blocks=blocks)
    net = edgetl.prepare(model, policy)
    features = net.forward_bottom(torch.randn(2, 3, 96, 96))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net.forward_top(features)
    work = step_work(model, policy, batch_size=2, image_size=96)
    assert work.forward_flops == counter.get_total_flops()
    assert 2 * work.forward_flops < work.gemm_flops + work.depthwise_flops < 3 * work.forward_flops
    deeper = step_work(model, edgetl.TrainPolicy(blocks=blocks + 1), batch_size=2, image_size=96)
    assert deeper.gemm_flops > work.gemm_flops and deeper.map_bytes > work.map_bytes


def test_step_time_is_the_two_term_roofline():
    work = step_work(edgetl.load_model("mobilenet_v2", num_classes=10), edgetl.TrainPolicy(blocks=2), batch_size=8, image_size=64)
    t = predict_native_step_time(work, gemm_gflops=50.0, memory_gbps=5.0)
    assert t.gemm == pytest.approx(work.gemm_flops / 50e9) and t.streaming == pytest.approx(MAP_PASSES * work.map_bytes / 5e9)
    assert t.layers == pytest.approx(LAYER_COST * work.layers / 50e9) and work.layers > 10
    assert t.total == pytest.approx(t.gemm + t.streaming + t.layers)
    assert predict_native_step_time(work, gemm_gflops=25.0, memory_gbps=2.5).total == pytest.approx(2 * t.total)
    with pytest.raises(ValueError):
        predict_native_step_time(work, gemm_gflops=0.0, memory_gbps=5.0)


def test_device_rates_are_optional_positive_numbers():
    assert device_from_dict(BOARD).gemm_gflops == 0.0
    measured = device_from_dict({**BOARD, "gemm_gflops": 24, "memory_gbps": 4.5})
    assert (measured.gemm_gflops, measured.memory_gbps) == (24.0, 4.5)
    for bad in (0, -1.0, float("inf"), "fast", True):
        with pytest.raises(DeviceProfileError, match="gemm_gflops"):
            device_from_dict({**BOARD, "gemm_gflops": bad})


def test_the_native_plan_shows_step_times_only_with_the_profiles_rates():
    memory = ProgramMemory(arena_bytes=4 << 20, weights_file_bytes=4 << 20, trainable_bytes=1 << 20, feature_bytes=8192)
    kwargs = dict(image_size=64, num_classes=3, optimizer="sgd", runtime="native", program_memory=lambda p, b: memory)
    kwargs.update(images=100, runner_ups=1, batch_sizes=(8, 4))
    timed = plan(device_from_dict({**BOARD, "gemm_gflops": 20.0, "memory_gbps": 4.0}), "mobilenet_v2", **kwargs)
    c = timed.chosen
    work = step_work(
        edgetl.load_model("mobilenet_v2", num_classes=3), edgetl.TrainPolicy(blocks=c.blocks), batch_size=c.batch_size, image_size=64
    )
    assert c.step_time == predict_native_step_time(work, gemm_gflops=20.0, memory_gbps=4.0)
    assert f"step {1000 * c.step_time.total:.0f} ms" in timed.render() and timed.to_dict()["chosen"]["step_time"]["total"] > 0
    untimed = plan(device_from_dict(BOARD), "mobilenet_v2", **kwargs)
    assert untimed.chosen.step_time is None and "No step times" in untimed.render()
