"""int8 export (``edgetl export --quantize int8``): PT2E-quantized XNNPACK programs, calibrated on the
run's own training images, checked for agreement with float32 on its validation images, refused
when they lose too much, and run by the native device runner.

The run: a stand-in pretrained MobileNetV2 (tests/conftest.py) whose classifier is fitted on real
Fashion-MNIST photos (32 px; 300 training / 100 validation images, Debian's dataset-fashion-mnist),
so the float32 model is decisive and agreement means something.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import edgetl
from edgetl.cli import main
from edgetl.data.fashion_mnist import DEBIAN_DIR, FashionMNIST, write_image_folder
from edgetl.exporter import _executorch as et
from edgetl.exporter import calibration as cal
from edgetl.exporter import quantize
from edgetl.exporter.config import ExportConfig
from edgetl.exporter.errors import ExportError
from edgetl.train.config import FinetuneConfig
from edgetl.train.policy import TrainPolicy
from edgetl.train.run import Run
from tests.conftest import make_image_folder, pretrained_model

pytestmark = pytest.mark.skipif(
    not (DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").exists(), reason="Debian's dataset-fashion-mnist not installed"
)

SIZE, BATCH, TRAIN, VAL, CALIBRATION = 32, 4, 300, 100, 64
#: stated threshold: int8 model.pte agrees with float32 eager on at least 90% of the 100 real photos
MIN_AGREEMENT = 90.0


def cli(argv: list[str]) -> int:
    return main(["--debug", *argv])


@pytest.fixture(scope="module")
def fashion_run(tmp_path_factory) -> Path:
    """A finished run on Fashion-MNIST: stand-in pretrained MobileNetV2, classifier fitted on the
    frozen features of the run's 300 training images (a linear probe: seconds, decisive)."""
    work = tmp_path_factory.mktemp("int8-run")
    pretrained = pretrained_model("mobilenet_v2", make_image_folder(work / "source", per_class=20, seed=1), image_size=SIZE, steps=30)
    config = FinetuneConfig(
        model="mobilenet_v2",
        data="fashion-mnist",
        train_limit=TRAIN,
        val_limit=VAL,
        image_size=SIZE,
        batch_size=BATCH,
        policy=TrainPolicy(blocks=2),
        out=str(work / "run"),
    )
    calibration, _ = cal.from_run(config, model="mobilenet_v2", image_size=SIZE, count=TRAIN, seed=0)
    train = FashionMNIST(split="train")
    labels = torch.tensor([int(train.targets[int(name[6:-1])]) for name in calibration.items])
    torch.manual_seed(0)
    model = edgetl.load_model("mobilenet_v2", num_classes=10)
    model.load_state_dict({k: v for k, v in pretrained.state_dict().items() if not k.startswith("classifier")}, strict=False)
    model.eval()
    with torch.no_grad():
        features = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(model.features(calibration.images), 1), 1)
    head = model.classifier[1]
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(head(features), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    run = Run(config.out)
    run.start(config, list(train.classes), resume=False)
    run.save_final(model.state_dict(), model_name="mobilenet_v2", classes=list(train.classes), policy=config.policy)
    return Path(config.out)


@pytest.fixture(scope="module")
def int8_bundle(fashion_run, tmp_path_factory) -> Path:
    """``edgetl export --quantize int8`` of the run (no --training: an int8 lowering is the slow part
    of the suite; the int8 bottom's fine-tuning is measured by benchmarks/int8_bottom.py)."""
    out = tmp_path_factory.mktemp("int8") / "dist"
    argv = ["export", "--checkpoint", str(fashion_run), "--out", str(out), "--quantize", "int8"]
    assert cli([*argv, "--calibration-images", str(CALIBRATION)]) == 0
    return out


def _eager(run: Path) -> torch.nn.Module:
    model = edgetl.load_model("mobilenet_v2", num_classes=10)
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True)["model"])
    return model.eval()


def test_int8_export_agrees_with_float32_on_real_photos_and_records_its_calibration(int8_bundle, fashion_run):
    bundle = edgetl.ExportBundle.load(int8_bundle)
    m = bundle.manifest
    q = m.quantization
    assert q.programs == ["model.pte"] and q.scheme == et.INT8_SCHEME and q.max_accuracy_drop == 1.0
    # the calibration set is the run's training images: a seeded subset, named and hashed
    config = Run(fashion_run).config()
    want, validation = cal.from_run(config, model="mobilenet_v2", image_size=SIZE, count=CALIBRATION, seed=0)
    assert (q.calibration.images, q.calibration.seed, q.calibration.items) == (CALIBRATION, 0, want.items)
    assert q.calibration.sha256 == want.sha256() and len(set(want.items)) == CALIBRATION and len(validation) == VAL
    # independent check: the written model.pte through ExecuTorch against eager float32
    eager = _eager(fashion_run)
    with torch.no_grad():
        fp32 = eager(validation.images).numpy()
    int8 = quantize.program_outputs(int8_bundle / "model.pte", validation.images, 1)
    agreement = 100.0 * float((int8.argmax(1) == fp32.argmax(1)).mean())
    y = validation.labels.numpy()
    accuracy = 100.0 * float((fp32.argmax(1) == y).mean()), 100.0 * float((int8.argmax(1) == y).mean())
    assert accuracy[0] > 40.0, "the fixture's float32 model must be decisive for agreement to mean something"
    assert agreement >= MIN_AGREEMENT, (agreement, accuracy)
    check = q.checks[0]
    assert (check.path, check.images) == ("model.pte", VAL)
    assert (check.top1_agreement, check.fp32_accuracy, check.int8_accuracy) == pytest.approx((agreement, *accuracy))
    assert check.accuracy_drop <= 1.0
    # int8 indeed: weights are one byte each (float32 would be four)
    params = sum(p.numel() for p in eager.parameters())
    assert (int8_bundle / "model.pte").stat().st_size < 1.6 * params


def test_int8_loss_beyond_the_threshold_is_refused_and_nothing_is_written(fashion_run, tmp_path, capsys):
    """Calibrated on black images, every activation range is that of a constant input: real photos
    saturate, int8 accuracy collapses, and the export is refused with one line."""
    black = tmp_path / "black"
    black.mkdir()
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (SIZE, SIZE)).save(black / f"{i}.png")
    out = tmp_path / "dist"
    code = main(["export", "--checkpoint", str(fashion_run), "--out", str(out), "--quantize", "int8", "--calibration-data", str(black)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "int8 refused: model.pte" in err[0] and "nothing written" in err[0], err
    assert not out.exists() and list(tmp_path.iterdir()) == [black]


def test_int8_settings_are_checked(fashion_run, tmp_path):
    with pytest.raises(ExportError, match="max accuracy drop"):
        ExportConfig(quantize="int8", max_accuracy_drop=-1)
    with pytest.raises(ExportError, match="quantize must be one of none, int8"):
        ExportConfig(quantize="int4")
    with pytest.raises(ExportError, match="add --quantize int8"):
        cli(["export", "--checkpoint", str(fashion_run), "--out", str(tmp_path / "x"), "--calibration-images", "10"])
    with pytest.raises(ExportError, match="needs a run directory"):
        model_pt = tmp_path / "model.pt"
        shutil.copy(fashion_run / "model.pt", model_pt)
        cli(["export", "--checkpoint", str(model_pt), "--out", str(tmp_path / "y"), "--quantize", "int8"])


def test_calibration_batches_have_the_programs_batch_and_cover_every_image():
    images = torch.arange(10.0).view(10, 1, 1, 1).expand(10, 3, 2, 2)
    batches = list(quantize.calibration_batches(images, 4))
    assert [len(b) for b in batches] == [4, 4, 4]
    seen = torch.cat(batches)[:, 0, 0, 0].tolist()
    assert seen == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_native_runner_classifies_with_an_int8_bundle(runner, int8_bundle, tmp_path):
    photos = write_image_folder(FashionMNIST(split="test"), tmp_path / "photos", indices=range(9000, 9016))
    paths = sorted(photos.rglob("*.png"))
    out = subprocess.run([str(runner), "classify", str(int8_bundle), str(photos), "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert sorted(r["path"] for r in rows) == [str(p) for p in paths]
    tf = edgetl.transforms_for("mobilenet_v2", image_size=SIZE, train=False)
    from PIL import Image

    x = torch.stack([tf(Image.open(r["path"]).convert("RGB")) for r in rows])
    logits = quantize.program_outputs(int8_bundle / "model.pte", x, 1)  # the same int8 program through the Python bindings
    classes = FashionMNIST.classes
    assert [r["top"][0]["label"] for r in rows] == [classes[i] for i in logits.argmax(1)]
    for row, z in zip(rows, logits, strict=True):  # probabilities as the bindings' logits give them
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        assert abs(row["top"][0]["prob"] - p.max()) < 1e-5
    info = subprocess.run([str(runner), "info", str(int8_bundle)], capture_output=True, text=True)
    assert json.loads(info.stdout)["quantization"]["programs"] == ["model.pte"]
