"""The planner for the native device runner: the training program's memory plan, emitted per K.

Apart from tests/test_native.py so the test command's workers (one file each) share the long
emissions evenly.
"""

from __future__ import annotations

import pytest

import edgetl
from tests.conftest import CLASSES


@pytest.fixture(scope="module")
def emitted():
    """MobileNetV2's training program at K=2, 96 px, emitted at the planner's two anchor batches and
    at 8 (the emissions are the slow part: both tests share them)."""
    from edgetl.exporter.training import program_memory
    from edgetl.profiler.planner import NATIVE_ANCHORS

    model = edgetl.load_model("mobilenet_v2", num_classes=len(CLASSES))
    policy = edgetl.TrainPolicy(blocks=2)
    return {(2, b): program_memory(model, policy, batch_size=b, image_size=96, num_classes=3) for b in (*NATIVE_ANCHORS, 8)}


def test_the_planners_arena_extrapolation_in_batch_holds_against_an_emitted_program(emitted):
    from edgetl.profiler.planner import NATIVE_ANCHORS

    lo, hi, far = (emitted[2, b] for b in (*NATIVE_ANCHORS, 8))
    slope = (hi.arena_bytes - lo.arena_bytes) / (NATIVE_ANCHORS[1] - NATIVE_ANCHORS[0])
    extrapolated = lo.arena_bytes + (8 - NATIVE_ANCHORS[0]) * slope
    assert hi.arena_bytes > lo.arena_bytes and lo.weights_file_bytes == far.weights_file_bytes
    assert abs(extrapolated - far.arena_bytes) <= 0.10 * far.arena_bytes, (lo, hi, far)


def _board(tmp_path):
    device = tmp_path / "board.toml"
    device.write_text(
        'name = "board"\nmemory_total = "1GiB"\nmemory_budget = "600MiB"\nsafety_margin = 0.1\n'
        'runtime_overhead = "344MiB"\ncores = 4\narch = "aarch64"\nnotes = "a test board"\n'
    )
    return device


def test_plan_with_the_native_runtime_picks_from_emitted_memory_plans(tmp_path, emitted):
    from edgetl.profiler.native import predict_native_peak
    from edgetl.profiler.planner import NATIVE_ANCHORS, plan

    asked = []

    def memory(policy, batch_size):
        asked.append((policy.blocks, batch_size))
        assert policy == edgetl.TrainPolicy(blocks=2)  # the policy the shared emissions were made with
        return emitted[policy.blocks, batch_size]

    # max_blocks bounds the search (each K costs two emissions): K=2 fits, so it is the only K emitted
    result = plan(
        _board(tmp_path), "mobilenet_v2", image_size=96, num_classes=3, optimizer="sgd", runtime="native",
        program_memory=memory, images=500, runner_ups=0, max_blocks=2,
    )  # fmt: skip
    chosen = result.chosen
    assert result.runtime == "native" and chosen.fits and chosen.estimate.runtime < 20 * 2**20  # not eager's 344 MiB
    assert chosen.blocks == 2 and sorted(asked) == [(2, NATIVE_ANCHORS[0]), (2, NATIVE_ANCHORS[1])]
    assert all(c.blocks == 2 for c in result.over_budget)  # K=3 never considered: max_blocks, not memory, ruled it out
    lo, hi = (emitted[2, b] for b in NATIVE_ANCHORS)
    slope = (hi.arena_bytes - lo.arena_bytes) / (NATIVE_ANCHORS[1] - NATIVE_ANCHORS[0])
    expected = predict_native_peak(
        arena_bytes=round(lo.arena_bytes + (chosen.batch_size - NATIVE_ANCHORS[0]) * slope),
        weights_file_bytes=lo.weights_file_bytes,
        trainable_bytes=lo.trainable_bytes,
        feature_bytes=lo.feature_bytes,
        images=500,
    )
    assert chosen.peak == expected.total and "native runtime" in result.render()


def test_native_plan_can_choose_k_all_whose_training_program_carries_the_stem(tmp_path):
    """K = all trains the stem's full convolution too; the training program carries it (ATen's
    convolution and its backward), so the planner weighs K = all like any other K."""
    from edgetl.errors import ConfigError
    from edgetl.exporter.training import program_memory
    from edgetl.models.blocks import find_blocks
    from edgetl.profiler.planner import plan

    model = edgetl.load_model("mobilenet_v3_small", num_classes=3)
    top = len(find_blocks(model))
    asked = []

    def memory(policy, batch_size):
        asked.append((policy.blocks, batch_size))
        return program_memory(model, policy, batch_size=batch_size, image_size=64, num_classes=3)

    kwargs = dict(image_size=64, num_classes=3, optimizer="sgd", runtime="native", program_memory=memory, images=500)
    chosen = plan(_board(tmp_path), "mobilenet_v3_small", min_blocks=top, max_blocks=top, **kwargs).chosen
    assert chosen.blocks == top and {k for k, _ in asked} == {top}
    with pytest.raises(ConfigError, match=rf"max_blocks must be in 1\.\.{top}"):
        plan(_board(tmp_path), "mobilenet_v3_small", max_blocks=top + 1, **kwargs)
