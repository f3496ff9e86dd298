"""The trainer end to end: it learns, resumes after kill -9, caches features, refuses bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from edgetl import FinetuneConfig, finetune
from edgetl._files import load_torch
from edgetl.cli import main

SMALL = dict(image_size=32, batch_size=8, lr=3e-3, label_smoothing=0.0, val_fraction=0.25, workers=0)


def _config(tmp_path, folder, weights, **kw) -> FinetuneConfig:
    values = {**SMALL, "data": str(folder), "weights": str(weights), "out": str(tmp_path / "run"), **kw}
    return FinetuneConfig.from_dict(values)


@pytest.mark.parametrize("model", ["mobilenet_v2", "mobilenet_v3_small"])
@pytest.mark.parametrize("method", ["mobiletl", "vanilla"])
def test_training_reduces_loss_and_beats_chance(tmp_path, image_folder, pretrained_file, model, method):
    config = _config(tmp_path, image_folder, pretrained_file(model), model=model, method=method, blocks=2, epochs=4, augment=False)
    result = finetune(config, log=lambda _: None)
    history = result.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_acc"] >= 0.6  # 3 classes: chance is 1/3
    run = Path(config.out)
    assert {p.name for p in run.iterdir()} == {"config.json", "metrics.csv", "checkpoint.pt", "model.pt"}
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
        from edgetl import FinetuneConfig, finetune
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
    assert [line for line in printed.splitlines() if line.startswith("epoch ")][0].startswith("epoch 1/1 train_loss")
    assert "final val_acc" in printed


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
        ("blocks", ["--blocks", "40"], "only 17 inverted-residual blocks"),
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


def test_corrupt_image_is_skipped_with_a_warning(tmp_path, image_folder, pretrained_file):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    (data / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    config = _config(tmp_path, data, pretrained_file("mobilenet_v2"), blocks=1, epochs=1)
    with pytest.warns(UserWarning, match="skipping 1 unreadable image"):
        result = finetune(config, log=lambda _: None)
    assert result.history[0]["train_loss"] > 0


def test_existing_run_directory_is_refused(tmp_path, image_folder, pretrained_file):
    config = _config(tmp_path, image_folder, pretrained_file("mobilenet_v2"), blocks=1, epochs=1)
    Path(config.out).mkdir()
    (Path(config.out) / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="already holds files"):
        finetune(config, log=lambda _: None)
