"""int8 export (``edgetl export --quantize int8``): PT2E-quantized XNNPACK programs, calibrated on the
run's own training images, checked for agreement with float32 on its validation images, refused
when they lose too much, and run by the native device runner.

The run: MobileNetV2 trained on real Fashion-MNIST photos of three classes (32 px; 300 training / 99
validation photos from Debian's dataset-fashion-mnist), so the float32 model is decisive and
agreement means something.
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
from edgetl.data.fashion_mnist import DEBIAN_DIR, FashionMNIST
from edgetl.exporter import _executorch as et
from edgetl.exporter import calibration as cal
from edgetl.exporter import quantize
from edgetl.exporter.config import ExportConfig
from edgetl.exporter.errors import ExportError
from edgetl.train.config import FinetuneConfig
from edgetl.train.policy import TrainPolicy
from edgetl.train.run import Run
from tests.conftest import calibrate

pytestmark = pytest.mark.skipif(
    not (DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").exists(), reason="Debian's dataset-fashion-mnist not installed"
)

SIZE, BATCH, TRAIN, VAL, CALIBRATION = 32, 4, 300, 99, 64
#: three Fashion-MNIST classes: Trouser, Sandal, Bag
CLASSES = (1, 5, 8)
#: stated threshold: int8 model.pte agrees with float32 eager on at least 90% of the 99 real photos
MIN_AGREEMENT = 90.0
MAX_DROP = 5.0


def cli(argv: list[str]) -> int:
    return main(["--debug", *argv])


def _write_photos(dataset: FashionMNIST, out: Path, per_class: int) -> Path:
    """The first ``per_class`` photos of each of :data:`CLASSES` as an ImageFolder of PNGs."""
    from PIL import Image

    for k in CLASSES:
        name = dataset.classes[k]
        (out / name).mkdir(parents=True)
        idx = (dataset.targets == k).nonzero().flatten()[:per_class].tolist()
        for i in idx:
            Image.fromarray(dataset.images[i].numpy(), mode="L").save(out / name / f"{i:05d}.png")
    return out


@pytest.fixture(scope="module")
def fashion_run(tmp_path_factory) -> Path:
    """A finished run on real Fashion-MNIST photos (trousers, sandals, bags; 300 training photos,
    a separate folder of 99 validation photos), MobileNetV2 trained in full for 25 steps, batch
    norm statistics then set on the training photos: decisive (85% validation accuracy), so
    agreement means something."""

    work = tmp_path_factory.mktemp("int8-run")
    train = _write_photos(FashionMNIST(split="train"), work / "train", TRAIN // len(CLASSES))
    val = _write_photos(FashionMNIST(split="test"), work / "val", VAL // len(CLASSES))
    config = FinetuneConfig(
        model="mobilenet_v2",
        data=str(train),
        val_data=str(val),
        image_size=SIZE,
        batch_size=BATCH,
        policy=TrainPolicy(blocks=2),
        out=str(work / "run"),
    )
    images, _ = cal.from_run(config, model="mobilenet_v2", image_size=SIZE, count=TRAIN, seed=0)
    classes = sorted(FashionMNIST.classes[k] for k in CLASSES)
    labels = torch.tensor([classes.index(Path(name).parent.name) for name in images.items])
    torch.manual_seed(0)
    model = edgetl.load_model("mobilenet_v2", num_classes=len(CLASSES)).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(25):
        idx = torch.randint(0, len(labels), (32,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(images.images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    calibrate(model, images.images)
    with Run(config.out) as run:
        run.start(config, classes, resume=False)
        run.save_final(model.state_dict(), model_name="mobilenet_v2", classes=classes, policy=config.policy)
    return Path(config.out)


@pytest.fixture(scope="module")
def int8_bundle(fashion_run, tmp_path_factory) -> Path:
    """``edgetl export --quantize int8`` of the run (no --training: an int8 lowering is the slow part
    of the suite; the int8 bottom's fine-tuning is measured by benchmarks/int8_bottom.py)."""
    out = tmp_path_factory.mktemp("int8") / "dist"
    argv = ["export", "--checkpoint", str(fashion_run), "--out", str(out), "--quantize", "int8"]
    # 5 points allowed: on 99 photos one image is 1.01 points, and this test is about agreement
    assert cli([*argv, "--calibration-images", str(CALIBRATION), "--max-accuracy-drop", str(MAX_DROP)]) == 0
    return out


def _eager(run: Path) -> torch.nn.Module:
    model = edgetl.load_model("mobilenet_v2", num_classes=len(CLASSES))
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True)["model"])
    return model.eval()


def test_int8_export_agrees_with_float32_on_real_photos_and_records_its_calibration(int8_bundle, fashion_run):
    bundle = edgetl.ExportBundle.load(int8_bundle)
    m = bundle.manifest
    q = m.quantization
    assert q.programs == ["model.pte"] and q.scheme == et.INT8_SCHEME and q.max_accuracy_drop == MAX_DROP
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
    assert accuracy[0] > 80.0, "the fixture's float32 model must be decisive for agreement to mean something"
    assert agreement >= MIN_AGREEMENT, (agreement, accuracy)
    check = q.checks[0]
    assert (check.path, check.images) == ("model.pte", VAL)
    assert (check.top1_agreement, check.fp32_accuracy, check.int8_accuracy) == pytest.approx((agreement, *accuracy))
    assert check.accuracy_drop <= MAX_DROP
    # int8 indeed: weights are one byte each (float32 would be four)
    params = sum(p.numel() for p in eager.parameters())
    assert (int8_bundle / "model.pte").stat().st_size < 1.6 * params


def test_qat_export_is_checked_like_post_training_int8(fashion_run, tmp_path):
    """``--qat-epochs``: the int8 graph fine-tuned quantization-aware on the run's training images,
    then lowered and checked as the post-training one is: the recorded check is what the written
    program computes, it agrees with float32, its weights are int8, the manifest says how it was made."""
    out = tmp_path / "dist"
    argv = ["export", "--checkpoint", str(fashion_run), "--out", str(out), "--quantize", "int8", "--qat-epochs", "1"]
    assert cli([*argv, "--calibration-images", str(CALIBRATION), "--max-accuracy-drop", str(MAX_DROP)]) == 0
    q = edgetl.ExportBundle.load(out).manifest.quantization
    assert (q.qat_epochs, q.calibration.images, q.float_layers) == (1, CALIBRATION, [])
    _, validation = cal.from_run(Run(fashion_run).config(), model="mobilenet_v2", image_size=SIZE, count=1, seed=0)
    with torch.no_grad():
        fp32 = _eager(fashion_run)(validation.images).numpy()
    int8 = quantize.program_outputs(out / "model.pte", validation.images, 1)
    agreement = 100.0 * float((int8.argmax(1) == fp32.argmax(1)).mean())
    int8_accuracy = 100.0 * float((int8.argmax(1) == validation.labels.numpy()).mean())
    check = q.checks[0]
    assert (check.path, check.images) == ("model.pte", VAL) and check.accuracy_drop <= MAX_DROP
    assert (check.top1_agreement, check.int8_accuracy) == pytest.approx((agreement, int8_accuracy))
    assert agreement >= MIN_AGREEMENT, (agreement, check)
    params = sum(p.numel() for p in _eager(fashion_run).parameters())
    assert (out / "model.pte").stat().st_size < 1.6 * params


def _black_images(tmp_path: Path) -> Path:
    from PIL import Image

    black = tmp_path / "black"
    black.mkdir()
    for i in range(4):
        Image.new("RGB", (SIZE, SIZE)).save(black / f"{i}.png")
    return black


def test_int8_loss_beyond_the_threshold_is_refused_and_nothing_is_written(fashion_run, tmp_path, capsys):
    """Calibrated on black images, every activation range is that of a constant input: real photos
    saturate and int8 loses accuracy, more than the 0.5 points allowed: refused
    with one line, before lowering (mixed precision off)."""
    black = _black_images(tmp_path)
    out = tmp_path / "dist"
    code = main(
        [
            "export",
            "--checkpoint",
            str(fashion_run),
            "--out",
            str(out),
            "--quantize",
            "int8",
            "--calibration-data",
            str(black),
            "--max-accuracy-drop",
            "0.5",
            "--no-mixed-precision",
        ]
    )
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
    with pytest.raises(ExportError, match="observer must be one of minmax, moving_average, histogram"):
        ExportConfig(quantize="int8", observer="percentile")
    with pytest.raises(ExportError, match="--report and --observer are about an int8 export"):
        cli(["export", "--checkpoint", str(fashion_run), "--out", str(tmp_path / "x"), "--report", str(tmp_path / "r.json")])
    with pytest.raises(ExportError, match="needs quantize='int8'"):
        ExportConfig(qat_epochs=1)
    with pytest.raises(ExportError, match="QAT learning rate"):
        ExportConfig(quantize="int8", qat_epochs=1, qat_lr=0)
    with pytest.raises(ExportError, match="--report measures post-training int8"):
        argv = ["--quantize", "int8", "--qat-epochs", "1", "--report", str(tmp_path / "r.json")]
        cli(["export", "--checkpoint", str(fashion_run), "--out", str(tmp_path / "x"), *argv])
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


def test_native_runner_classifies_with_an_int8_bundle(runner, int8_bundle, fashion_run, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(fashion_run.parent / "val", photos)
    paths = sorted(photos.rglob("*.png"))[::6]
    for p in set(photos.rglob("*.png")) - set(paths):
        p.unlink()
    out = subprocess.run([str(runner), "classify", str(int8_bundle), str(photos), "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert sorted(r["path"] for r in rows) == [str(p) for p in paths]
    tf = edgetl.transforms_for("mobilenet_v2", image_size=SIZE, train=False)
    from PIL import Image

    x = torch.stack([tf(Image.open(r["path"]).convert("RGB")) for r in rows])
    logits = quantize.program_outputs(int8_bundle / "model.pte", x, 1)  # the same int8 program through the Python bindings
    classes = sorted(FashionMNIST.classes[k] for k in CLASSES)
    assert [r["top"][0]["label"] for r in rows] == [classes[i] for i in logits.argmax(1)]
    for row, z in zip(rows, logits, strict=True):  # probabilities as the bindings' logits give them
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        assert abs(row["top"][0]["prob"] - p.max()) < 1e-5
    info = subprocess.run([str(runner), "info", str(int8_bundle)], capture_output=True, text=True)
    assert json.loads(info.stdout)["quantization"]["programs"] == ["model.pte"]
