"""The trainer end to end: it learns, resumes after kill -9, caches features, refuses bad input."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from edgetl import FinetuneConfig, TrainPolicy, finetune
from edgetl._files import load_torch
from edgetl.cli import main
from edgetl.errors import RunError
from edgetl.models.zoo import num_blocks
from tests.conftest import write_truncated_jpeg

SMALL = dict(image_size=32, batch_size=8, lr=3e-3, label_smoothing=0.0, val_fraction=0.25, workers=0)


def _config(tmp_path, folder, weights, **kw) -> FinetuneConfig:
    values = {**SMALL, "data": str(folder), "weights": None if weights is None else str(weights), "out": str(tmp_path / "run"), **kw}
    return FinetuneConfig.from_dict(values)


def _steps_per_epoch(folder: Path) -> int:
    """Optimizer steps per epoch on ``folder`` under SMALL (held-out split, drop_last)."""
    images = sum(1 for p in folder.rglob("*.png"))
    return (images - round(images * SMALL["val_fraction"])) // SMALL["batch_size"]


# a stand-in pretraining and a 4-epoch run each: the embedded default (Lite0) and the smallest MobileNet
# train end to end here; every architecture's rewrite is checked step by step in test_prepare.py
@pytest.mark.slow
@pytest.mark.parametrize("model", ["efficientnet_lite0", "mobilenet_v3_small"])
@pytest.mark.parametrize("method", ["mobiletl", "vanilla"])
def test_training_reduces_loss_and_beats_chance(tmp_path, image_folder, pretrained_file, model, method):
    config = _config(tmp_path, image_folder, pretrained_file(model), model=model, method=method, blocks=2, epochs=4, augment=False)
    result = finetune(config, log=lambda _: None)
    history = result.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_acc"] >= 0.6  # 3 classes: chance is 1/3
    run = Path(config.out)
    files = {"config.json", "metrics.csv", "checkpoint.pt", "checkpoint.prev.pt", "model.pt", "sha256.json", ".edgetl.lock"}
    assert {p.name for p in run.iterdir()} == files
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 1 + config.epochs
    assert json.loads((run / "config.json").read_text())["policy"]["method"] == method
    # the final weights load back into the plain torchvision architecture
    from edgetl import load_model

    plain = load_model(model, weights=run / "model.pt", num_classes=3)
    assert set(plain.state_dict()) == set(result.model.state_dict())


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    return load_torch(run / "model.pt")["model"]


def test_resume_after_kill_9_ends_with_the_same_weights(tmp_path, image_folder, pretrained_file):
    kw = dict(model="mobilenet_v2", blocks=2, epochs=3, augment=True)
    straight = _config(tmp_path / "a", image_folder, pretrained_file("mobilenet_v2"), **kw)
    finetune(straight, log=lambda _: None)

    crashed = _config(tmp_path / "b", image_folder, pretrained_file("mobilenet_v2"), **kw)
    script = textwrap.dedent(f"""
        import os, signal, json
        from edgetl import FinetuneConfig, TrainPolicy, finetune
        config = FinetuneConfig.from_dict(json.loads({json.dumps(json.dumps(crashed.to_dict()))}))
        def on_step(epoch, step):
            if epoch == 1 and step == 2:  # mid-way through the second epoch
                os.kill(os.getpid(), signal.SIGKILL)
        finetune(config, on_step=on_step, log=lambda _: None)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    run = Path(crashed.out)
    assert load_torch(run / "checkpoint.pt")["epoch"] == 1
    assert not (run / "model.pt").exists()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]

    lines: list[str] = []
    result = finetune(crashed, resume=True, log=lines.append)
    assert lines[0].startswith("resuming") and len(result.history) == 3
    a, b = _final_state(Path(straight.out)), _final_state(run)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_feature_cache_matches_uncached_training_without_augmentation(tmp_path, image_folder, pretrained_file):
    # SGD: Adam turns float-rounding noise in near-zero gradients into lr-sized steps
    kw = dict(model="mobilenet_v3_small", blocks=2, epochs=2, augment=False, optimizer="sgd", lr=0.01)
    plain = finetune(_config(tmp_path / "plain", image_folder, pretrained_file("mobilenet_v3_small"), **kw), log=lambda _: None)
    lines: list[str] = []
    cached = finetune(
        _config(tmp_path / "cached", image_folder, pretrained_file("mobilenet_v3_small"), cache_features=True, **kw), log=lines.append
    )
    assert any(line.startswith("cached bottom features") for line in lines)
    a, b = plain.model.state_dict(), cached.model.state_dict()
    # the bottom runs in other batch compositions: equal up to float rounding
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    for x, y in zip(plain.history, cached.history, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
        assert x["val_acc"] == y["val_acc"]


def _cli(args, capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def test_finetune_leaves_the_callers_random_state_as_it_was(tmp_path, image_folder):
    """finetune forks torch's global generator: the state after it equals the state before, and
    the run's own randomness comes from config.seed, whatever the caller's state."""
    kw = dict(model="mobilenet_v2", blocks=1, epochs=1, augment=True)  # augmentation draws from the global generator
    torch.manual_seed(1234)
    torch.rand(7)  # an arbitrary, non-initial state
    before = torch.get_rng_state()
    first = finetune(_config(tmp_path / "a", image_folder, None, **kw), log=lambda _: None)
    assert torch.equal(torch.get_rng_state(), before)

    torch.manual_seed(999)  # another caller state: the same run
    second = finetune(_config(tmp_path / "b", image_folder, None, **kw), log=lambda _: None)
    a, b = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_help_shows_the_config_defaults(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["finetune", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrap argparse's line breaks
    options = text.split("options:", 1)[1]
    defaults = FinetuneConfig()
    for flag, value in [
        ("--epochs EPOCHS", defaults.epochs),
        ("--batch-size BATCH_SIZE", defaults.batch_size),
        ("--lr LR", defaults.lr),
        ("--image-size IMAGE_SIZE", defaults.image_size),
        ("--blocks BLOCKS", defaults.policy.blocks),
        ("--method {mobiletl,vanilla}", defaults.policy.method),
    ]:
        # the flag's own help text, up to its default: no other option's "(default: " in between
        assert re.search(re.escape(flag) + r" [^(]*\(default: " + re.escape(str(value)) + r"\)", options), (flag, value)


@pytest.mark.parametrize(
    "setting,message",
    [
        ('augment = "no"', "augment must be true or false, got 'no'"),
        ('epochs = "one"', "epochs must be an integer, got 'one'"),
        ("batch_size = 4.5", "batch_size must be an integer, got 4.5"),
        ("[policy]\nblok = 1", "unknown policy setting(s): blok"),
    ],
    ids=["augment", "epochs", "batch_size", "policy_key"],
)
def test_cli_config_file_with_a_wrong_value_is_one_line_naming_key_and_file(tmp_path, image_folder, capsys, setting, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'data = "{image_folder}"\nimage_size = 32\n{setting}\n')
    out = tmp_path / "run"
    code = main(["finetune", "--config", str(cfg), "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 2
    assert printed.err == f"edgetl: error: {cfg}: {message}\n"
    assert printed.out == "" and not out.exists()  # refused before anything ran


def test_cli_config_file_nested_policy_table(tmp_path, image_folder, capsys):
    cfg = tmp_path / "nested.toml"
    cfg.write_text(
        f'model = "mobilenet_v2"\ndata = "{image_folder}"\nimage_size = 32\nepochs = 1\nval_fraction = 0.25\n\n'
        '[policy]\nblocks = 1\nmethod = "vanilla"\nactivation_grad = "exact"\n'
    )
    code = main(["finetune", "--config", str(cfg), "--out", str(tmp_path / "table")])
    assert code == 0
    saved = json.loads((tmp_path / "table" / "config.json").read_text())["policy"]
    assert saved == TrainPolicy(1, "vanilla", "exact", "reuse").to_dict()
    assert "mobilenet_v2 K=1 vanilla" in capsys.readouterr().out
    # a flag overrides one field of the table and keeps the others
    code = main(["finetune", "--config", str(cfg), "--out", str(tmp_path / "flag"), "--blocks", "2"])
    assert code == 0
    saved = json.loads((tmp_path / "flag" / "config.json").read_text())["policy"]
    assert saved == TrainPolicy(2, "vanilla", "exact", "reuse").to_dict()


def test_cli_config_file_and_flags(tmp_path, image_folder, pretrained_file, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'model = "mobilenet_v2"\nepochs = 3\nblocks = 1\nimage-size = 32\ndata = "{image_folder}"\n'
        f'weights = "{pretrained_file("mobilenet_v2")}"\nval_fraction = 0.25\n'
    )
    out = tmp_path / "run"
    code = main(["finetune", "--config", str(cfg), "--epochs", "1", "--out", str(out), "--batch-size", "8"])
    printed = capsys.readouterr().out
    assert code == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["epochs"], saved["policy"]["blocks"], saved["image_size"]) == (1, 1, 32)
    epoch_lines = [line for line in printed.splitlines() if line.startswith("epoch ") and " train_loss " in line]
    assert [line.split(" train_loss")[0] for line in epoch_lines] == ["epoch 1/1"]
    assert sum(line.startswith("final val_acc ") for line in printed.splitlines()) == 1


@pytest.fixture
def bad_inputs(tmp_path, image_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = tmp_path / "noimg"
    shutil.copytree(image_folder, no_images)
    for f in (no_images / "green").iterdir():
        f.unlink()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    return {"empty": empty, "no_images": no_images, "garbage": garbage}


@pytest.mark.parametrize(
    "case,args,message",
    [
        ("missing", ["--data", "{tmp}/nope"], "data folder not found"),
        ("empty", ["--data", "{empty}"], "no class subfolders"),
        ("no_images", ["--data", "{no_images}"], "class 'green'"),
        ("model", ["--model", "resnet50"], "unknown model 'resnet50'"),
        ("blocks", ["--blocks", "40"], f"only {num_blocks('mobilenet_v2')} inverted-residual blocks"),
        ("weights", ["--weights", "{garbage}"], "cannot read weights"),
        ("weights_missing", ["--weights", "{tmp}/absent.pt"], "weights file not found"),
        ("epochs", ["--epochs", "0"], "epochs must be >= 1"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, image_folder, bad_inputs, capsys, case, args, message):
    subs = {"tmp": tmp_path, **bad_inputs}
    out = tmp_path / "run"
    base = ["finetune", "--data", str(image_folder), "--image-size", "32", "--epochs", "1", "--out", str(out)]
    code, err = _cli(base + [a.format(**subs) for a in args], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("edgetl: error: ") and message in err, err
    assert not out.exists()


def test_truncated_jpeg_is_skipped_with_one_log_line_and_training_runs(tmp_path, image_folder, pretrained_file, capsys):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    broken = write_truncated_jpeg(data / "red" / "broken.jpg")  # decoding it raises "image file is truncated"
    lines: list[str] = []
    steps: list[int] = []
    config = _config(tmp_path, data, pretrained_file("mobilenet_v2"), blocks=1, epochs=2, augment=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = finetune(config, log=lines.append, on_step=lambda epoch, step: steps.append(epoch))
    # one line, before training starts, naming the file and why
    assert [line for line in lines if "unreadable" in line or str(broken) in line] == lines[:1]
    assert lines[0].startswith(f"warning: skipping 1 unreadable image(s) in {data}: {broken} (OSError: image file is truncated")
    assert capsys.readouterr() == ("", "")  # nothing printed around log
    k = _steps_per_epoch(image_folder)  # the broken file is not among the training images
    assert steps == [0] * k + [1] * k
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert all(math.isfinite(row["train_loss"]) and 0.0 <= row["val_acc"] <= 1.0 for row in result.history)


def test_cli_reports_a_skipped_image_once_in_its_log(tmp_path, image_folder, capsys):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    broken = write_truncated_jpeg(data / "blue" / "cut.jpg")
    out = tmp_path / "run"
    code = main(
        [
            "finetune",
            "--data",
            str(data),
            "--image-size",
            "32",
            "--epochs",
            "1",
            "--blocks",
            "1",
            "--val-fraction",
            "0.25",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr()
    assert code == 0 and printed.err == ""
    named = [line for line in printed.out.splitlines() if str(broken) in line]
    assert len(named) == 1 and named[0].startswith("warning: skipping 1 unreadable image(s)")
    assert (out / "model.pt").is_file()


def test_existing_run_directory_is_refused(tmp_path, image_folder, pretrained_file):
    config = _config(tmp_path, image_folder, pretrained_file("mobilenet_v2"), blocks=1, epochs=1)
    Path(config.out).mkdir()
    (Path(config.out) / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="already holds files; pass --resume"):
        finetune(config, log=lambda _: None)
    assert [p.name for p in Path(config.out).iterdir()] == ["notes.txt"]
    assert (Path(config.out) / "notes.txt").read_text() == "mine"
