"""The device contract on 64-bit ARM: edgetl-device cross-built for aarch64 (``build.sh --target
aarch64``) and run under qemu-aarch64 user-mode emulation, against the x86-64 runner.

The two architectures agree closely, not bit for bit: XNNPACK computes differently per architecture
and GCC fuses multiply-adds on aarch64 (``optimizer.cpp``, the depthwise kernels). What is bit-exact is
each architecture with itself (a resume after ``kill -9`` equals an uninterrupted run). Emulation
proves correctness, not speed or memory: the runs are kept to 12 images, 3 steps an epoch.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgetl.exporter import _executorch as et
from tests.conftest import CLASSES, make_image_folder

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "deploy" / "native" / "build-aarch64"
#: classification probabilities of the two architectures
PROB_TOLERANCE = 1e-5
#: the epoch's mean loss of the two architectures
LOSS_TOLERANCE = 1e-5
#: trained weights and running statistics, relative to each tensor's largest magnitude (at least 1)
WEIGHT_TOLERANCE = 1e-4

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64" or not shutil.which("apt-get"),
    reason="cross-building for aarch64 and emulating it is done from a Debian x86-64 machine",
)


@pytest.fixture(scope="module")
def arm_runner() -> list[str]:
    """build.sh --target aarch64, as a user runs it; the command that runs the result under qemu."""
    BUILD.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(BUILD.parent / ".build-aarch64.lock", "w") as lock:  # xdist workers build one at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = subprocess.run(
            ["bash", str(ROOT / "deploy/native/build.sh"), "--target", "aarch64", str(BUILD)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHON": sys.executable},  # its pip downloads the aarch64 wheel
        )
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"aarch64 runner built in {time.perf_counter() - t0:.1f}s")
    binary = BUILD / "edgetl-device"
    kind = subprocess.run(["file", "-b", str(binary)], capture_output=True, text=True).stdout
    assert "ARM aarch64" in kind, kind
    return ["qemu-aarch64", "-L", "/", str(binary)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """12 PNGs, 3 classes x 4: one epoch is 3 steps of the shared bundle's batch 4."""
    return make_image_folder(tmp_path_factory.mktemp("arm") / "photos", per_class=4, size=45, seed=7)


def run(cmd: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=600)


def finetune(cmd: list[str], bundle: Path, data: Path, state: Path, epochs: int) -> list[str]:
    return [*cmd, "--threads", "1", "finetune", str(bundle), str(data), "--state", str(state), "--epochs", str(epochs), "--val", str(data)]


def trained(state: Path) -> tuple[dict, dict[str, np.ndarray], bytes]:
    s = json.loads((state / "state.json").read_text())
    return s, et.read_ptd((state / s["weights"]).read_bytes()), (state / s["momentum"]).read_bytes()


def assert_close(arm: Path, x86: Path) -> float:
    """The two states: same epochs and accuracy, loss within LOSS_TOLERANCE, every tensor within
    WEIGHT_TOLERANCE of its scale. Returns the largest weight difference."""
    (sa, wa, _), (sx, wx, _) = trained(arm), trained(x86)
    assert [h["epoch"] for h in sa["history"]] == [h["epoch"] for h in sx["history"]]
    for ha, hx in zip(sa["history"], sx["history"], strict=True):
        assert ha["val_accuracy"] == hx["val_accuracy"] and ha["accuracy"] == hx["accuracy"], (ha, hx)
        assert abs(ha["loss"] - hx["loss"]) <= LOSS_TOLERANCE, (ha, hx)
    assert sorted(wa) == sorted(wx)
    worst = 0.0
    for name in wx:
        diff = float(np.abs(wa[name].astype(np.float64) - wx[name]).max()) if wx[name].size else 0.0
        assert diff <= WEIGHT_TOLERANCE * max(1.0, float(np.abs(wx[name]).max())), (name, diff)
        worst = max(worst, diff)
    return worst


@pytest.fixture(scope="module")
def two_epochs(arm_runner, runner, photos, training_bundle, tmp_path_factory) -> dict[str, Path]:
    """Two epochs (6 SGD steps) on each architecture."""
    out = tmp_path_factory.mktemp("arm-two-epochs")
    states = {}
    for arch, cmd in (("aarch64", arm_runner), ("x86_64", [str(runner)])):
        t0 = time.perf_counter()
        done = subprocess.run(finetune(cmd, training_bundle, photos, out / arch, 2), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        print(f"{arch}: 2 epochs of 12 images in {time.perf_counter() - t0:.1f}s")
        states[arch] = out / arch
    return states


def test_info_is_identical_but_for_the_architecture(arm_runner, runner, training_bundle):
    arm, x86 = run(arm_runner, "info", str(training_bundle)), run([str(runner)], "info", str(training_bundle))
    assert arm.returncode == 0 and x86.returncode == 0, arm.stderr + x86.stderr
    a, x = json.loads(arm.stdout), json.loads(x86.stdout)
    assert a["runner"]["arch"] == "aarch64" and x["runner"]["arch"] == "x86_64"
    assert a["runner"]["executorch"] == x["runner"]["executorch"]
    a.pop("runner"), x.pop("runner")
    assert a == x


def test_classify_agrees_with_x86(arm_runner, runner, photos, training_bundle):
    """model.pte through XNNPACK on each architecture: the same top-1, probabilities within PROB_TOLERANCE."""
    args = ("--threads", "1", "classify", str(training_bundle), str(photos), "--top-k", "3", "--json")
    arm, x86 = run(arm_runner, *args), run([str(runner)], *args)
    assert arm.returncode == 0 and x86.returncode == 0, arm.stderr + x86.stderr
    rows_a = [json.loads(line) for line in arm.stdout.splitlines()]
    rows_x = [json.loads(line) for line in x86.stdout.splitlines()]
    assert len(rows_a) == len(rows_x) == 12
    worst = 0.0
    for ra, rx in zip(rows_a, rows_x, strict=True):
        assert ra["path"] == rx["path"] and ra["top"][0]["label"] == rx["top"][0]["label"], (ra, rx)
        pa, px = ({e["label"]: e["prob"] for e in r["top"]} for r in (ra, rx))
        assert sorted(pa) == sorted(px) == sorted(CLASSES)
        worst = max(worst, *(abs(pa[c] - px[c]) for c in CLASSES))
    print(f"classify: largest probability difference aarch64 - x86_64 {worst:.2e}")
    assert worst <= PROB_TOLERANCE


def test_fine_tuning_agrees_with_x86(two_epochs):
    worst = assert_close(two_epochs["aarch64"], two_epochs["x86_64"])
    print(f"2 epochs: largest weight difference aarch64 - x86_64 {worst:.2e}")


def test_kill_9_then_resume_is_bit_identical_on_aarch64(arm_runner, photos, training_bundle, two_epochs, tmp_path):
    state = tmp_path / "cut"
    proc = subprocess.Popen(finetune(arm_runner, training_bundle, photos, state, 2), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (state / "state.json").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # qemu, and the emulated runner with it
    proc.wait()
    assert json.loads((state / "state.json").read_text())["epoch"] == 1, "the kill came too late to interrupt training"
    resumed = subprocess.run(finetune(arm_runner, training_bundle, photos, state, 2), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "resuming after epoch 1" in resumed.stdout, resumed.stderr
    (sa, _, ma), (sb, _, mb) = trained(two_epochs["aarch64"]), trained(state)
    assert [h["loss"] for h in sa["history"]] == [h["loss"] for h in sb["history"]]
    assert (two_epochs["aarch64"] / "trained.ptd").read_bytes() == (state / "trained.ptd").read_bytes() and ma == mb


def test_a_state_resumes_on_the_other_architecture(arm_runner, runner, photos, training_bundle, two_epochs, tmp_path):
    """Epoch 1 on one architecture, epoch 2 on the other: within tolerance of two epochs on either."""
    for first, second in ((arm_runner, [str(runner)]), ([str(runner)], arm_runner)):
        state = tmp_path / Path(first[-1]).parent.name
        done = subprocess.run(finetune(first, training_bundle, photos, state, 1), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        resumed = subprocess.run(finetune(second, training_bundle, photos, state, 2), capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0 and "resuming after epoch 1" in resumed.stdout, resumed.stderr
        assert_close(state, two_epochs["x86_64"])
