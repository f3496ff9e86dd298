"""New classes on the device: ``edgetl-device finetune`` with class folders the bundle does not know.

The spare-class bundle of tests/conftest.py (MobileNetV2 K=2, 64 px, batch 4, 3 classes + 2
spare). References: the imprinting formula computed in Python over the Python transforms and
ExecuTorch's Python bindings; the refusals are one line, exit status 2, nothing written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgetl
from edgetl.exporter import _executorch as et
from tests.conftest import CLASSES, EXPORT_BATCH, SPARE, make_image_folder, make_new_classes


def device(runner: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(runner), *map(str, args)], capture_output=True, text=True, timeout=600)


def refused(done: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2 and one error line (after a warning per unreadable image it skipped)."""
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("edgetl-device: warning: skipping")]
    assert done.returncode == 2 and len(lines) == 1, (done.returncode, done.stdout, done.stderr)
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def new_photos(tmp_path_factory) -> Path:
    return make_new_classes(tmp_path_factory.mktemp("new-classes") / "train", per_class=6)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    return make_new_classes(tmp_path_factory.mktemp("new-held-out") / "val", per_class=4, seed=9)


@pytest.fixture(scope="module")
def imprinted(runner, spare_bundle, new_photos, tmp_path_factory) -> Path:
    state = tmp_path_factory.mktemp("imprinted") / "state"
    done = device(runner, "finetune", spare_bundle, new_photos, "--state", state, "--epochs", "0")
    assert done.returncode == 0, done.stderr
    assert "new class purple: output 3, imprinted from 6 images" in done.stdout
    return state


def _embeddings(bundle: Path, paths: list[Path]) -> np.ndarray:
    """Python's side: eval transform -> bottom.pte -> train.pte's embed (the bundle's weights)."""
    tf = edgetl.transforms_for("mobilenet_v2", image_size=64, train=False)
    x = np.stack([tf(Image.open(p).convert("RGB")).numpy() for p in paths])
    pad = -len(x) % EXPORT_BATCH
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)])
    bottom, top = et.Program(bundle / "bottom.pte"), et.Program(bundle / "train.pte", bundle / "train.ptd")
    out = []
    for i in range(0, len(x), EXPORT_BATCH):
        out.append(top.run("embed", bottom.run("forward", x[i : i + EXPORT_BATCH])[0])[0])
    return np.concatenate(out)[: len(paths)]


def test_imprinting_sets_each_new_row_from_its_photos_mean_normalised_embedding(imprinted, spare_bundle, new_photos):
    """Each new row: the active rows' mean plus the unit mean direction of the new photos'
    embeddings from the manifest's centre, scaled to the active rows' own parts' mean norm; the
    bias makes the centre score like an average class (new_classes.h)."""
    s = json.loads((imprinted / "state.json").read_text())
    assert s["classes"] == [*CLASSES, "purple", "yellow"] and s["epoch"] == 0
    assert [(a["name"], a["images"]) for a in s["added_classes"]] == [("purple", 6), ("yellow", 6)]
    before = et.read_ptd((spare_bundle / "train.ptd").read_bytes())
    after = et.read_ptd((imprinted / s["weights"]).read_bytes())
    known = len(CLASSES)
    w0 = before["classifier.1.weight"].reshape(known + SPARE, -1)
    w1 = after["classifier.1.weight"].reshape(known + SPARE, -1)
    assert after["classifier.1.active"].tolist() == [1.0] * (known + SPARE)
    assert np.array_equal(w1[:known], w0[:known]), "the known classes' rows are untouched"
    spare = json.loads((spare_bundle / "manifest.json").read_text())["programs"]["training"]["spare_classes"]
    centre = np.asarray(spare["embedding_mean"], np.float64)
    assert spare["embedding_mean_images"] == 100 and centre.shape == (spare["embedding_size"],)
    rows = w0[:known].astype(np.float64)
    shared = rows.mean(0)
    scale = np.linalg.norm(rows - shared, axis=1).mean()
    b0 = before["classifier.1.bias"].reshape(-1)[:known].astype(np.float64)
    for row, name in ((known, "purple"), (known + 1, "yellow")):
        e = _embeddings(spare_bundle, sorted((new_photos / name).iterdir())).astype(np.float64) - centre
        u = (e / np.linalg.norm(e, axis=1, keepdims=True)).mean(0)
        u /= np.linalg.norm(u)
        want = shared + scale * u
        assert np.abs(w1[row] - want).max() < 2e-3 * np.abs(want).max(), name
        bias = after["classifier.1.bias"].reshape(-1)[row]
        assert abs(bias - (b0.mean() - scale * u @ centre)) < 2e-3 * max(1.0, abs(bias)), name


def test_the_imprinted_classifier_names_and_recognises_the_new_classes(imprinted, runner, spare_bundle, held_out):
    done = device(runner, "classify", spare_bundle, held_out, "--trained", imprinted, "--json", "--top-k", "5")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 8
    right = sum(Path(r["path"]).parent.name == r["top"][0]["label"] for r in rows)
    assert right >= 7, rows
    assert all({t["label"] for t in r["top"]} == {*CLASSES, "purple", "yellow"} for r in rows)


def test_training_after_imprinting_keeps_the_new_classes_on(imprinted, runner, spare_bundle, new_photos, held_out, tmp_path):
    state = tmp_path / "state"
    shutil.copytree(imprinted, state)
    done = device(runner, "finetune", spare_bundle, new_photos, "--state", state, "--epochs", "2", "--val", held_out)
    assert done.returncode == 0, done.stderr
    s = json.loads((state / "state.json").read_text())
    assert s["epoch"] == 2 and s["classes"][-2:] == ["purple", "yellow"]
    assert et.read_ptd((state / s["weights"]).read_bytes())["classifier.1.active"].tolist() == [1.0] * (len(CLASSES) + SPARE)
    assert s["history"][-1]["val_accuracy"] >= 0.5  # chance is 0.2; a masked-off new class scores 0
    # export-weights carries them; edgetl export --device-weights makes a 5-class bundle of them
    out = tmp_path / "npy"
    assert device(runner, "export-weights", spare_bundle, state, "--out", out).returncode == 0
    assert np.load(out / "classifier.1.weight.npy").shape[0] == len(CLASSES) + SPARE


def test_device_added_classes_reach_the_workstation(imprinted, spare_bundle, export_run, runner, held_out, tmp_path):
    from edgetl.cli import main

    out = tmp_path / "dist"
    assert main(["--debug", "export", "--checkpoint", str(export_run), "--device-weights", str(imprinted), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["classes"] == [*CLASSES, "purple", "yellow"]
    plain = device(runner, "classify", out, held_out, "--json").stdout.splitlines()
    trained = device(runner, "classify", spare_bundle, held_out, "--trained", imprinted, "--json").stdout.splitlines()
    assert [json.loads(a)["top"][0]["label"] for a in plain] == [json.loads(b)["top"][0]["label"] for b in trained]


@pytest.mark.parametrize(
    "name, why",
    [(".hidden", "starts with '.'"), ("a\x01b", "control character"), ("x" * 129, "longer than 128")],
)
def test_a_class_folder_that_is_not_a_plain_name_is_refused(runner, spare_bundle, new_photos, tmp_path, name, why):
    data = tmp_path / "data"
    shutil.copytree(new_photos / "purple", data / name)
    refused(device(runner, "finetune", spare_bundle, data, "--state", tmp_path / "s", "--epochs", "1"), why)
    assert not (tmp_path / "s" / "state.json").exists()


def test_more_new_classes_than_spare_outputs_is_refused_before_anything_is_written(runner, spare_bundle, new_photos, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(new_photos, data)
    shutil.copytree(new_photos / "purple", data / "teal")
    line = refused(device(runner, "finetune", spare_bundle, data, "--state", tmp_path / "s", "--epochs", "1"), "3 new classes")
    assert "only 2 of the bundle's 2 spare outputs are left" in line
    assert not (tmp_path / "s").exists()


def test_a_new_class_without_a_readable_image_is_refused(runner, spare_bundle, tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=4, size=24)
    (data / "broken").mkdir()
    (data / "broken" / "a.png").write_bytes(b"not a png")
    refused(device(runner, "finetune", spare_bundle, data, "--state", tmp_path / "s", "--epochs", "1"), "broken has no readable image")
    assert not (tmp_path / "s" / "state.json").exists()


def test_a_bundle_without_spare_outputs_says_how_to_get_them(runner, training_bundle, new_photos, tmp_path):
    refused(device(runner, "finetune", training_bundle, new_photos, "--state", tmp_path / "s"), "--spare-classes")


def test_a_fleet_refuses_a_bundle_with_spare_classes(spare_bundle, runner):
    from edgetl.fleet.device import DeviceClient, DeviceClientError

    with pytest.raises(DeviceClientError, match="spare classes"):
        DeviceClient(spare_bundle, runner).check_fits(
            model="mobilenet_v2", method="mobiletl", image_size=64, classes=list(CLASSES), offered={}
        )
