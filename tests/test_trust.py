"""Trust: divergence never overwrites good weights, nonsense settings are refused up front, a
resumed run keeps its classes (issue 12's cases that live in the trainer and the run directory)."""

from __future__ import annotations

import shutil

import pytest
import torch

from edgetl.cli import main
from edgetl.errors import DivergedError, RunError
from edgetl.train.config import FinetuneConfig
from edgetl.train.run import CHECKPOINT, FINAL_WEIGHTS, Run
from edgetl.train.trainer import finetune

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
    Run(config.out).start(config, ["blue", "green", "red"], resume=False)
    (data / "red").rename(data / "azure")  # sorts first now: every label would shift
    with pytest.raises(RunError, match=r"classes changed \(new: azure; gone: red\)"):
        finetune(config, resume=True, log=lambda _: None)
    shutil.copytree(data / "azure", data / "red")
    shutil.rmtree(data / "azure")
    shutil.copytree(data / "red", data / "violet")  # a class added
    with pytest.raises(RunError, match=r"classes changed \(new: violet\)"):
        finetune(config, resume=True, log=lambda _: None)
