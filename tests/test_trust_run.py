"""Trust, round two (issue 25), the run directory and the settings: one writer per run, resume
never retrains a finished run, weights bound to their sha256, nonsense settings and the machine's
limits refused up front, divergence reported as one line."""

from __future__ import annotations

import pytest

from edgetl.cli import main
from edgetl.errors import ConfigError, DivergedError
from edgetl.train.config import FinetuneConfig
from edgetl.train.run import CHECKPOINT, FINAL_WEIGHTS
from edgetl.train.trainer import finetune

SMALL = dict(model="mobilenet_v2", image_size=32, batch_size=8, blocks=2, val_fraction=0.25, label_smoothing=0.0, augment=False)


def _config(tmp_path, folder, **kw) -> FinetuneConfig:
    return FinetuneConfig.from_dict({**SMALL, "data": str(folder), "out": str(tmp_path / "run"), "epochs": 1, **kw})


def _quiet(_line: str) -> None:
    pass


def test_weights_that_diverge_at_the_end_of_an_epoch_are_one_line(tmp_path, image_folder, capsys):
    """One SGD step an epoch at lr 1e30: the loss of that step is finite, the weights after it are not."""
    argv = ["finetune", "--model", "mobilenet_v2", "--data", str(image_folder), "--image-size", "32", "--batch-size", "8"]
    argv += ["--blocks", "2", "--epochs", "2", "--train-limit", "8", "--optimizer", "sgd", "--lr", "1e30", "--out", str(tmp_path / "run")]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("edgetl: error: training diverged: non-finite ") and err.count("\n") == 1, err
    assert "nothing was saved" in err
    assert not (tmp_path / "run" / CHECKPOINT).exists() and not (tmp_path / "run" / FINAL_WEIGHTS).exists()


@pytest.mark.parametrize(
    "text,message",
    [
        (b"epochs = 1\n# caf\xe9\n", "is not UTF-8 text"),
        (b"seed = 18446744073709551616\n", "seed must be in [0, "),
        (b"seed = -1\n", "seed must be in [0, "),
        (b"warmup_epochs = inf\n", "warmup_epochs must be a finite number, got inf"),
        (b"momentum = inf\n", "momentum must be a finite number, got inf"),
    ],
)
def test_a_bad_config_file_is_one_line_and_writes_nothing(tmp_path, image_folder, capsys, text, message):
    config = tmp_path / "settings.toml"
    config.write_bytes(text)
    out = tmp_path / "run"
    code = main(["finetune", "--config", str(config), "--data", str(image_folder), "--out", str(out), "--image-size", "32"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("edgetl: error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_device_profile_that_is_not_utf8_is_one_line(tmp_path, capsys):
    device = tmp_path / "pi.toml"
    device.write_bytes(b'name = "Pi \xff"\n')
    code = main(["plan", "--device", str(device), "--model", "mobilenet_v2", "--image-size", "32"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"edgetl: error: device profile {device} is not UTF-8 text (byte 11)\n", err


def test_an_image_size_beyond_the_image_limit_is_refused():
    with pytest.raises(ConfigError, match=r"image_size must be <= 65535"):
        FinetuneConfig(image_size=65536)
