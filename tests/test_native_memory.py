"""A memory budget is a promise: edgetl-device compares its fine-tuning need with its memory limit
before it starts, and the runs are held to that limit by the kernel (a cgroup v1 memory controller,
writable as root; skipped where it is not).

The need is edgetl.profiler.native's sum (what ``edgetl plan --runtime native`` adds up), made by
the runner from the manifest; the limit is the cgroup's (``memory.limit_in_bytes``, v2
``memory.max``) or ``--memory-limit``.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from edgetl.profiler.native import native_peak_of_bundle
from tests.conftest import make_image_folder

MEMORY_V1 = Path("/sys/fs/cgroup/memory")
MIB = 2**20


def _own_memory_cgroup() -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return MEMORY_V1 / path.lstrip("/")
    return None


def _cgroup_v1_writable() -> str | None:
    """None when a memory cgroup can be made here, else why not."""
    own = _own_memory_cgroup()
    if own is None or not (own / "memory.limit_in_bytes").is_file():
        return "no cgroup v1 memory controller mounted at /sys/fs/cgroup/memory"
    if not os.access(own, os.W_OK):
        return f"{own} is not writable (cgroup v1 memory limits need root)"
    return None


needs_cgroup = pytest.mark.skipif(_cgroup_v1_writable() is not None, reason=str(_cgroup_v1_writable()))


@contextmanager
def memory_cgroup(limit: int):
    """A child of this process's memory cgroup limited to ``limit`` bytes; yields the preexec_fn
    that moves a child process into it (before exec, so everything it maps is charged there)."""
    group = _own_memory_cgroup() / f"edgetl-test-{uuid.uuid4().hex[:12]}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))

        def enter():
            (group / "cgroup.procs").write_text(str(os.getpid()))

        yield enter, group
    finally:
        group.rmdir()  # empty once its processes have exited


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("memory") / "photos", per_class=4, size=45, seed=5)


@pytest.fixture(scope="module")
def need(training_bundle, photos) -> int:
    """What the planner's sum says the shared bundle's fine-tune needs, on these 12 images."""
    manifest = json.loads((training_bundle / "manifest.json").read_text())
    assert manifest["memory"]["native_runtime_bytes"] > 0
    return native_peak_of_bundle(manifest, images=12).total


def _finetune(runner: Path, bundle: Path, data: Path, state: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    cmd = [str(runner), "--verbose", "finetune", str(bundle), str(data), "--state", str(state), "--epochs", "1", "--threads", "1", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


def _refusal(r: subprocess.CompletedProcess) -> tuple[float, float, str]:
    """(need MiB, limit MiB, where the limit came from) of the runner's one-line refusal."""
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("edgetl-device: error: ")]
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr)
    m = re.search(r"fine-tuning needs ([\d.]+) MiB \(.*\), more than the memory limit of ([\d.]+) MiB \(([^)]+)\)", lines[0])
    assert m, lines[0]
    return float(m[1]), float(m[2]), m[3]


def test_the_runner_refuses_a_limit_below_the_planners_sum(runner, training_bundle, photos, need, tmp_path):
    """--memory-limit: the figure the runner names is the planner's sum, components and all."""
    below = need // MIB - 1
    r = _finetune(runner, training_bundle, photos, tmp_path / "s", "--memory-limit", str(below))
    needed, limit, source = _refusal(r)
    assert abs(needed - need / MIB) <= 0.05 and limit == below and source == "--memory-limit"
    manifest = json.loads((training_bundle / "manifest.json").read_text())
    parts = native_peak_of_bundle(manifest, images=12)
    for name, value in (
        ("runtime", parts.runtime),
        ("weights", parts.weights_file),
        ("arena", parts.arena),
        ("optimizer state", parts.optimizer_state),
    ):
        assert f"{name} {value / MIB:.1f} MiB" in r.stderr, (name, r.stderr)
    assert f"features of 12 images {parts.features / MIB:.1f} MiB" in r.stderr
    assert not (tmp_path / "s").exists()  # refused before anything was written
    # without momentum there are no momentum buffers to hold: the need drops by them
    without = native_peak_of_bundle(manifest, images=12, momentum=0.0).total
    assert without == need - parts.optimizer_state
    r = _finetune(runner, training_bundle, photos, tmp_path / "s", "--memory-limit", str(without // MIB - 1), "--momentum", "0")
    assert abs(_refusal(r)[0] - without / MIB) <= 0.05
    ok = _finetune(runner, training_bundle, photos, tmp_path / "ok", "--memory-limit", str(need // MIB + 1))
    assert ok.returncode == 0, ok.stderr


def test_adamw_needs_two_floats_per_trained_parameter_in_the_plan_and_on_the_device(runner, training_bundle, photos, need, tmp_path):
    """AdamW keeps exp_avg and exp_avg_sq: the planner's sum and the runner's refusal both count
    2 x the trainable bytes (SGD with momentum: 1 x)."""
    manifest = json.loads((training_bundle / "manifest.json").read_text())
    trainable = manifest["memory"]["trainable_parameter_bytes"]
    adamw = native_peak_of_bundle(manifest, images=12, optimizer="adamw")
    assert adamw.optimizer_state == 2 * trainable and adamw.total == need + trainable
    r = _finetune(runner, training_bundle, photos, tmp_path / "s", "--optimizer", "adamw", "--memory-limit", str(adamw.total // MIB - 1))
    assert abs(_refusal(r)[0] - adamw.total / MIB) <= 0.05
    assert f"optimizer state {adamw.optimizer_state / MIB:.1f} MiB" in r.stderr
    assert not (tmp_path / "s").exists()


@needs_cgroup
def test_under_a_cgroup_limit_below_its_need_it_refuses_instead_of_being_killed(runner, training_bundle, photos, need, tmp_path):
    limit = need // 2
    with memory_cgroup(limit) as (enter, group):
        r = _finetune(runner, training_bundle, photos, tmp_path / "s", preexec_fn=enter)
    needed, named, source = _refusal(r)
    assert abs(needed - need / MIB) <= 0.05 and abs(named - limit / MIB) <= 0.05
    assert source.endswith(f"{group.name}/memory.limit_in_bytes"), source
    assert not (tmp_path / "s").exists()


@needs_cgroup
@pytest.mark.parametrize("margin", [0.15])  # edgetl.profiler.device's default safety margin
def test_with_the_plans_margin_it_completes_inside_the_limit(runner, training_bundle, photos, need, margin, tmp_path):
    limit = int(need / (1 - margin))
    with memory_cgroup(limit) as (enter, group):
        r = _finetune(runner, training_bundle, photos, tmp_path / "s", preexec_fn=enter)
        max_usage = int((group / "memory.max_usage_in_bytes").read_text())
        failures = int((group / "memory.failcnt").read_text())
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "s" / "state.json").read_text())["epoch"] == 1
    peak = float(re.findall(r"peak ([\d.]+) MiB", r.stderr)[-1]) * MIB
    print(f"need {need / MIB:.1f} MiB, cgroup limit {limit / MIB:.1f} MiB: VmHWM {peak / MIB:.1f} MiB, "
          f"cgroup max usage {max_usage / MIB:.1f} MiB, limit hits {failures}")  # fmt: skip
    assert f"limit {limit / MIB:.2f} MiB ({group}/memory.limit_in_bytes)" in r.stderr
    assert peak <= limit and max_usage <= limit


@needs_cgroup
def test_the_planners_choice_for_a_small_budget_completes_inside_that_budget(runner, training_bundle, photos, need, tmp_path):
    """``edgetl plan --runtime native`` (the planner over the exporter's memory plans) on a board
    whose budget the shared bundle's configuration (K=2, batch 4) fits and batch 8 does not: the
    planner's figure is the runner's, and the run completes in a cgroup limited to the board's budget."""
    import edgetl
    from edgetl.exporter.training import program_memory
    from edgetl.profiler.native import ProgramMemory
    from edgetl.profiler.planner import NATIVE_ANCHORS, plan

    manifest = json.loads((training_bundle / "manifest.json").read_text())
    train = manifest["programs"]["training"]
    bundle_memory = ProgramMemory(
        arena_bytes=manifest["memory"]["planned_arena_bytes"]["forward"],
        weights_file_bytes=manifest["files"][train["data"]]["bytes"],
        trainable_bytes=manifest["memory"]["trainable_parameter_bytes"],
        feature_bytes=4 * int(np.prod(train["methods"]["forward"]["inputs"][0]["shape"][1:])),
    )
    assert NATIVE_ANCHORS[1] == train["batch_size"] == 4

    def memory(policy, batch_size):  # the bundle's own figures at its batch, the exporter's emission at the other anchor
        assert policy == edgetl.TrainPolicy(blocks=2)
        if batch_size == 4:
            return bundle_memory
        model = edgetl.load_model("mobilenet_v2", num_classes=3)
        return program_memory(model, policy, batch_size=batch_size, image_size=64, num_classes=3)

    # usable memory halfway between the needs at batch 4 and 8 (the arena grows by what the
    # planner extrapolates from its two anchors): only batch 4 fits
    lo = memory(edgetl.TrainPolicy(blocks=2), NATIVE_ANCHORS[0])
    need_at_8 = need + (8 - 4) * (bundle_memory.arena_bytes - lo.arena_bytes) // (4 - NATIVE_ANCHORS[0])
    assert need_at_8 > need
    margin = 0.15
    budget = math.ceil((need + need_at_8) / 2 / (1 - margin))
    board = tmp_path / "board.toml"
    board.write_text(
        f'name = "small board"\nmemory_total = "512MiB"\nmemory_budget = {budget}\nsafety_margin = {margin}\n'
        'cores = 4\narch = "aarch64"\nnotes = "a board with little memory to spare"\n'
    )
    result = plan(
        board, "mobilenet_v2", image_size=64, num_classes=3, optimizer="sgd", runtime="native", program_memory=memory,
        images=12, runner_ups=0, min_blocks=2, max_blocks=2, batch_sizes=(4, 8),
    )  # fmt: skip
    chosen = result.chosen
    assert (chosen.blocks, chosen.batch_size) == (2, 4) and chosen.fits and chosen.peak == need
    assert any(c.batch_size == 8 and not c.fits for c in result.over_budget)  # the next batch would not fit
    with memory_cgroup(budget) as (enter, group):
        r = _finetune(runner, training_bundle, photos, tmp_path / "s", preexec_fn=enter)
    assert r.returncode == 0, r.stderr
    assert f"fine-tuning needs {chosen.peak / MIB:.2f} MiB, limit {budget / MIB:.2f} MiB" in r.stderr
    assert json.loads((tmp_path / "s" / "state.json").read_text())["epoch"] == 1
