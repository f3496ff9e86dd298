"""Trust: divergence never overwrites good weights, nonsense settings are refused up front, a
resumed run keeps its classes (issue 12's cases that live in the trainer and the run directory)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgetl._files import sha256_file
from edgetl.cli import main
from edgetl.errors import DivergedError, RunError
from edgetl.train.config import FinetuneConfig
from edgetl.train.run import CHECKPOINT, DIGESTS, FINAL_WEIGHTS, Run
from edgetl.train.trainer import finetune

ROOT = str(Path(__file__).resolve().parents[1])
SMALL = dict(model="mobilenet_v3_small", image_size=32, batch_size=8, val_fraction=0.25, label_smoothing=0.0, augment=False)


def _config(tmp_path, folder, weights, **kw) -> FinetuneConfig:
    return FinetuneConfig.from_dict({**SMALL, "data": str(folder), "weights": str(weights), "out": str(tmp_path / "run"), **kw})


def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, image_folder, pretrained_file, capsys):
    weights = pretrained_file("mobilenet_v3_small")
    good = _config(tmp_path, image_folder, weights, blocks=2, epochs=1, optimizer="sgd", lr=0.01)
    finetune(good, log=lambda _: None)
    before = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    # the same run continued for a second epoch at a learning rate that blows up
    (tmp_path / "run" / FINAL_WEIGHTS).unlink()
    exploding = FinetuneConfig.from_dict({**good.to_dict(), "epochs": 2})
    # resume refuses a different lr, so the blow-up is injected through the saved optimizer state
    state = dict(before)
    state["optimizer"]["param_groups"][0]["lr"] = 1e12
    state["optimizer"]["param_groups"][1]["lr"] = 1e12
    state["scheduler"]["base_lrs"] = [1e12, 1e12]
    torch.save(state, tmp_path / "run" / CHECKPOINT)
    digests = json.loads((tmp_path / "run" / DIGESTS).read_text())  # the edit is deliberate: record it
    (tmp_path / "run" / DIGESTS).write_text(json.dumps({**digests, CHECKPOINT: sha256_file(tmp_path / "run" / CHECKPOINT)}))
    with pytest.raises(DivergedError, match=r"diverged: .* the checkpoint of epoch 1 .* is kept"):
        finetune(exploding, resume=True, log=lambda _: None)
    after = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    assert after["epoch"] == 1
    for name, value in after["model"].items():
        assert torch.equal(value, state["model"][name]), name
    assert not (tmp_path / "run" / FINAL_WEIGHTS).exists()


def test_divergence_from_the_command_line_exits_non_zero(tmp_path, image_folder, pretrained_file, capsys):
    out = tmp_path / "run"
    argv = ["finetune", "--model", "mobilenet_v3_small", "--weights", str(pretrained_file("mobilenet_v3_small")), "--data"]
    argv += [str(image_folder), "--image-size", "32", "--epochs", "1", "--out", str(out), "--optimizer", "sgd", "--lr", "1e9"]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("edgetl: error: training diverged") and err.count("\n") == 1, err
    assert not (out / FINAL_WEIGHTS).exists() and not (out / CHECKPOINT).exists()


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--weight-decay", "-5", "weight_decay must be >= 0"),
        ("--lr", "inf", "lr must be a finite number > 0"),
        ("--lr", "-1", "lr must be a finite number > 0"),
        ("--epochs", "0", "epochs must be >= 1"),
        ("--momentum", "-0.5", "momentum must be >= 0"),
        ("--val-fraction", "1.5", "val_fraction must be in (0, 1)"),
        ("--image-size", "4", "image_size must be >= 8"),
    ],
)
def test_nonsense_values_are_refused_before_anything_is_written(tmp_path, image_folder, capsys, flag, value, message):
    out = tmp_path / "run"
    code = main(["finetune", "--data", str(image_folder), "--out", str(out), flag, value])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_resume_refuses_changed_classes(tmp_path, image_folder, pretrained_file):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    config = _config(tmp_path, data, pretrained_file("mobilenet_v3_small"), blocks=1, epochs=2)
    with Run(config.out) as run:
        run.start(config, ["blue", "green", "red"], resume=False)
    (data / "red").rename(data / "azure")  # sorts first now: every label would shift
    with pytest.raises(RunError, match=r"classes changed \(new: azure; gone: red\)"):
        finetune(config, resume=True, log=lambda _: None)
    shutil.copytree(data / "azure", data / "red")
    shutil.rmtree(data / "azure")
    shutil.copytree(data / "red", data / "violet")  # a class added
    with pytest.raises(RunError, match=r"classes changed \(new: violet\)"):
        finetune(config, resume=True, log=lambda _: None)


def _finetune_argv(out, folder, weights, *extra) -> list[str]:
    argv = ["finetune", "--model", "mobilenet_v3_small", "--weights", str(weights), "--data", str(folder), "--image-size", "32"]
    return argv + ["--epochs", "1", "--blocks", "1", "--out", str(out), *extra]


def test_a_full_disk_is_one_line_and_leaves_no_temporaries(tmp_path, image_folder, pretrained_file):
    """RLIMIT_FSIZE stands in for a full disk: config.json fits, the checkpoint (megabytes) does not."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "edgetl", *_finetune_argv(out, image_folder, pretrained_file("mobilenet_v3_small"))]
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))  # noqa: E731
    done = subprocess.run(argv, capture_output=True, text=True, preexec_fn=limit, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"edgetl: error: cannot write {out / CHECKPOINT}:"), done.stderr
    assert sorted(p.name for p in out.iterdir()) == [".edgetl.lock", "config.json"]  # no half-written hidden temporaries


def test_files_honour_the_umask_and_stale_temporaries_are_removed(tmp_path, image_folder, pretrained_file):
    out = tmp_path / "run"
    stale = out / f".{CHECKPOINT}.abc123.tmp"
    out.mkdir()
    stale.write_bytes(b"x" * 1000)  # what a kill -9 during a save leaves
    config = _config(tmp_path, image_folder, pretrained_file("mobilenet_v3_small"), blocks=1, epochs=1)
    old = os.umask(0o027)
    try:
        finetune(config, resume=True, log=lambda _: None)
    finally:
        os.umask(old)
    assert not stale.exists()
    for name in (CHECKPOINT, FINAL_WEIGHTS, "config.json", "metrics.csv"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o640, name


def test_an_out_that_is_a_file_is_refused(tmp_path, image_folder, pretrained_file, capsys):
    out = tmp_path / "run"
    out.write_text("mine")
    code = main(_finetune_argv(out, image_folder, pretrained_file("mobilenet_v3_small")))
    err = capsys.readouterr().err
    assert code == 2 and err == f"edgetl: error: --out {out} is a file, not a directory\n"
    assert out.read_text() == "mine"


def test_a_log_gets_progress_lines_within_an_epoch(tmp_path, image_folder, pretrained_file):
    """Not a terminal (pytest captures stderr): a line at each quarter of the epoch, then the epoch line."""
    lines: list[str] = []
    config = _config(tmp_path, image_folder, pretrained_file("mobilenet_v3_small"), blocks=1, epochs=1, batch_size=4)
    finetune(config, log=lines.append)
    steps = (3 * 24 - 18) // 4  # 72 images, a quarter held out for validation, batch 4
    every = steps // 4
    assert [line.split(" loss")[0] for line in lines[:-1]] == [f"epoch 1/1 step {k}/{steps}" for k in range(every, steps, every)]
    assert lines[-1].startswith("epoch 1/1 train_loss")


def test_torchvision_imported_before_edgetl_works():
    """A user's program that imports torchvision first (the environment's hook runs edgetl's shim)."""
    code = "import torchvision, torchvision.models; import edgetl.models.zoo; print(torchvision.models.mobilenet_v2().__class__.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0 and done.stdout.strip() == "MobileNetV2", done.stderr[-500:]


@pytest.mark.slow
def test_mobiletl_finetune_never_peaks_above_vanilla(tmp_path, image_folder):
    """The user's figure: the whole `edgetl finetune` process, OS peak RSS, vanilla and MobileTL side by side."""
    peaks = {}
    for method in ("vanilla", "mobiletl"):
        out = tmp_path / method
        argv = [sys.executable, "-m", "edgetl", "finetune", "--model", "efficientnet_lite0", "--blocks", "8", "--method", method]
        argv += ["--data", str(image_folder), "--image-size", "64", "--batch-size", "32", "--epochs", "1", "--out", str(out)]
        argv += ["--val-fraction", "0.1"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": ROOT})
        _, status, usage = os.wait4(proc.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read().decode()[-800:]
        peaks[method] = usage.ru_maxrss * 1024  # KiB on Linux
    assert peaks["mobiletl"] <= peaks["vanilla"], {m: round(p / 2**20, 1) for m, p in peaks.items()}  # 439 vs 467 MiB here


def test_a_profile_the_machine_cannot_hold_is_refused_up_front(capsys):
    code = main(["profile", "--model", "mobilenet_v2", "--blocks", "2", "--batch-size", "8", "--image-size", "100000"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("edgetl: error: measuring batch 8 at 100000 px needs about") and err.count("\n") == 1, err
