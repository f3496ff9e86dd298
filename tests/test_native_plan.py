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


def test_native_plan_never_chooses_a_configuration_the_exporter_refuses(tmp_path):
    """A refused training program (here: K = all, by a stand-in verifier) is dropped and the next
    best fitting configuration is chosen; when every one is refused, the plan says why."""
    from edgetl.errors import EdgetlError
    from edgetl.exporter.errors import VerificationError
    from edgetl.profiler.native import ProgramMemory
    from edgetl.profiler.planner import plan

    top = 11  # mobilenet_v3_small's blocks
    small = ProgramMemory(arena_bytes=1 << 20, weights_file_bytes=1 << 20, trainable_bytes=1 << 19, feature_bytes=4096)
    tried = []

    def verify(policy, batch_size):
        tried.append((policy.blocks, batch_size))
        if policy.blocks == top:
            raise VerificationError(f"training program does not match eager PyTorch at K={policy.blocks}")

    kwargs = dict(image_size=64, num_classes=3, optimizer="sgd", runtime="native", program_memory=lambda p, b: small, images=500)
    result = plan(_board(tmp_path), "mobilenet_v3_small", batch_sizes=(8, 4), verify_program=verify, **kwargs)
    assert tried == [(top, 8), (top, 4), (top - 1, 8)]
    assert (result.chosen.blocks, result.chosen.batch_size, result.verified) == (top - 1, 8, True)
    assert result.to_dict()["verified"] and "exported and verified" in result.render()

    def refuse(policy, batch_size):
        raise VerificationError(f"training program refused at K={policy.blocks}")

    with pytest.raises(EdgetlError, match=r"no fitting configuration of mobilenet_v3_small exports .*K=9 batch 4: training program"):
        plan(
            _board(tmp_path),
            "mobilenet_v3_small",
            batch_sizes=(8, 4),
            min_blocks=9,
            max_blocks=top,
            verify_program=refuse,
            **kwargs,
        )


def test_pi_zero_2w_plans_a_training_program_that_verifies():
    """The Pi Zero 2 W's native plan, with the exporter's own emission and verification: its
    choice is a bundle `edgetl export --training` makes (MobileNetV3-Small at 64 px and K <= 6
    bound the suite's time; benchmarks/training_export_sweep.py verifies the 224 px headline)."""
    from edgetl.exporter.training import program_memory, verify_program
    from edgetl.profiler.planner import plan

    model = edgetl.load_model("mobilenet_v3_small", num_classes=3)
    checks = []

    def memory(policy, batch_size):
        return program_memory(model, policy, batch_size=batch_size, image_size=64, num_classes=3)

    def verify(policy, batch_size):
        checks.append(
            verify_program(model, policy, batch_size=batch_size, image_size=64, num_classes=3, lr=0.01, momentum=0.9, weight_decay=0.0)
        )

    result = plan(
        "device_profiles/raspberry_pi_zero_2w.toml", "mobilenet_v3_small", image_size=64, num_classes=3, optimizer="sgd",
        runtime="native", program_memory=memory, verify_program=verify, max_blocks=6, runner_ups=0,
    )  # fmt: skip
    assert result.verified and result.chosen.blocks == 6 and len(checks) == 1
    assert checks[0].loss_max_abs_diff <= 1e-4 and checks[0].running_stats_moved > 0


def test_native_plan_counts_adamws_two_moments_per_trained_parameter(tmp_path):
    """``edgetl plan --runtime native --optimizer adamw``: the device keeps exp_avg and exp_avg_sq,
    twice SGD's momentum; an optimizer edgetl-device does not run is refused."""
    from edgetl.errors import ConfigError
    from edgetl.profiler.native import ProgramMemory
    from edgetl.profiler.planner import plan

    trainable = 1 << 19
    small = ProgramMemory(arena_bytes=1 << 20, weights_file_bytes=1 << 20, trainable_bytes=trainable, feature_bytes=4096)
    kwargs = dict(image_size=64, num_classes=3, runtime="native", program_memory=lambda p, b: small, images=500, batch_sizes=(8,))
    sgd = plan(_board(tmp_path), "mobilenet_v3_small", optimizer="sgd", **kwargs).chosen.estimate
    adamw = plan(_board(tmp_path), "mobilenet_v3_small", optimizer="adamw", **kwargs).chosen.estimate
    assert (sgd.optimizer_state, adamw.optimizer_state) == (trainable, 2 * trainable)
    assert adamw.total - sgd.total == trainable
    with pytest.raises(ConfigError, match="the native runtime trains with sgd or adamw, not 'adam'"):
        plan(_board(tmp_path), "mobilenet_v3_small", optimizer="adam", **kwargs)
