"""The replay set: ``edgetl export --replay-per-class`` (file format, draw, features) and
``edgetl-device finetune --replay-ratio`` (batch mixing against a Python re-implementation through
ExecuTorch's bindings, resume, refusals, memory).

One export of its own (the shared stand-in MobileNetV2 run, K=2, 64 px, batch 4) with a data
folder whose class ``red`` holds fewer training images than asked.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetl.exporter import _executorch as et
from edgetl.exporter.bundle import manifest_bytes
from edgetl.exporter.config import ExportConfig
from edgetl.exporter.errors import ExportError
from edgetl.exporter.replay import MAGIC, QuantizedRows, draw_per_class, quantization_error, quantize_rows, replay_bytes
from tests.conftest import CLASSES, EXPORT_BATCH, EXPORT_IMAGE_SIZE, fisher_yates, make_image_folder

PER_CLASS = 5
#: the device's replay stream constant (replay.h: "replay")
REPLAY_STREAM = 0x7265706C6179


def run(runner: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(runner), *args], capture_output=True, text=True, timeout=600)


# --- the file and the draw, in Python ------------------------------------------------------------


def test_rows_quantize_per_channel_and_read_back_bit_for_bit():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((7, 5, 3, 2)) * np.array([0.1, 1.0, 30.0, 0.0, 2.0]).reshape(1, 5, 1, 1)).astype(np.float32)
    rows = quantize_rows(x, np.arange(7) % 3)
    assert rows.values.dtype == np.int8 and rows.scales.dtype == np.float32
    np.testing.assert_array_equal(rows.scales, (np.abs(x).max(axis=(0, 2, 3)) / np.float32(127)).astype(np.float32))
    assert rows.scales[3] == 0 and not rows.values[:, 3].any()  # an all-zero channel
    assert np.abs(rows.values).max() == 127
    # symmetric rounding: each value within half a step of its channel's scale
    err = np.abs(x - rows.dequantized())
    assert (err <= rows.scales.reshape(1, -1, 1, 1) / 2 * (1 + 1e-6)).all()
    data = rows.to_bytes()
    assert data[:8] == MAGIC and len(data) == replay_bytes(7, (5, 3, 2)) == 24 + 4 * 5 + 7 * (4 + 30)
    back = QuantizedRows.from_bytes(data)
    np.testing.assert_array_equal(back.values, rows.values)
    np.testing.assert_array_equal(back.labels, np.arange(7) % 3)
    assert back.dequantized().tobytes() == rows.dequantized().tobytes()
    max_err, rel = quantization_error(x, rows)
    assert max_err == pytest.approx(float(err.max())) and 0 < rel < 0.01
    with pytest.raises(ExportError, match="holds 60 bytes"):
        QuantizedRows.from_bytes(data[:60])


def test_draw_is_seeded_per_class_and_takes_all_of_a_small_class():
    labels = [0] * 10 + [1] * 2 + [2] * 6
    a, b = draw_per_class(labels, 3, 4, seed=1), draw_per_class(labels, 3, 4, seed=1)
    assert a == b and [labels[i] for i in a] == [0] * 4 + [1] * 2 + [2] * 4
    assert draw_per_class(labels, 3, 4, seed=2) != a
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1)).tolist()
    assert a[:4] == sorted([i for i in order if labels[i] == 0][:4])  # the first of the class in the seeded order


def test_a_replay_set_needs_a_training_export():
    with pytest.raises(ExportError, match="need a training export"):
        ExportConfig(replay_per_class=3)
    with pytest.raises(ExportError, match=">= 0"):
        ExportConfig(training=True, replay_per_class=-1)


# --- the export --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def replay_run(export_run, tmp_path_factory) -> Path:
    """The shared run with a data folder (no held-out part): red has 3 images, fewer than PER_CLASS."""
    work = tmp_path_factory.mktemp("replay-run")
    data = make_image_folder(work / "data", per_class=8, size=40, seed=5)
    for p in sorted((data / "red").iterdir())[3:]:
        p.unlink()
    run_dir = work / "run"
    shutil.copytree(export_run, run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "data": str(data), "val_data": str(data)}))
    return run_dir


@pytest.fixture(scope="module")
def replay_bundle(replay_run, tmp_path_factory) -> Path:
    from edgetl.cli import main

    out = tmp_path_factory.mktemp("replay-bundle") / "dist"
    argv = ["--debug", "export", "--checkpoint", str(replay_run), "--out", str(out), "--training", "--verify-steps", "1"]
    argv += ["--batch-size", str(EXPORT_BATCH), "--replay-per-class", str(PER_CLASS), "--seed", "4"]
    assert main(argv) == 0
    return out


def test_export_stores_bottom_features_of_the_drawn_images(replay_bundle, replay_run):
    import edgetl
    from edgetl.data.folder import load_image

    manifest = json.loads((replay_bundle / "manifest.json").read_text())
    section = manifest["replay"]
    feature_shape = manifest["programs"]["training"]["methods"]["forward"]["inputs"][0]["shape"][1:]
    assert section["class_counts"] == [PER_CLASS, PER_CLASS, 3] and section["count"] == 2 * PER_CLASS + 3
    assert section["per_class"] == PER_CLASS and section["seed"] == 4 and section["feature_shape"] == feature_shape
    data = (replay_bundle / "replay.bin").read_bytes()
    assert section["bytes"] == len(data) == manifest["files"]["replay.bin"]["bytes"] == replay_bytes(section["count"], feature_shape)
    assert section["bytes_per_row"] == int(np.prod(feature_shape)) + 4
    assert manifest["files"]["replay.bin"]["sha256"] == hashlib.sha256(data).hexdigest()

    # the items named, through the device's evaluation transform and bottom.pte, quantized: the file
    root = Path(json.loads((replay_run / "config.json").read_text())["data"])
    tf = edgetl.transforms_for("mobilenet_v2", image_size=EXPORT_IMAGE_SIZE, train=False)
    x = torch.stack([tf(load_image(str(root / item))) for item in section["items"]])
    labels = np.array([CLASSES.index(item.split("/")[0]) for item in section["items"]])
    bottom = et.Program(replay_bundle / "bottom.pte")
    xs = torch.cat([x, x.new_zeros((-len(x) % EXPORT_BATCH, *x.shape[1:]))]).numpy()
    feats = np.concatenate([bottom.run("forward", xs[i : i + EXPORT_BATCH])[0] for i in range(0, len(xs), EXPORT_BATCH)])[: len(x)]
    assert quantize_rows(feats, labels).to_bytes() == data
    max_err, rel = quantization_error(feats, QuantizedRows.from_bytes(data))
    assert section["max_abs_error"] == pytest.approx(max_err) and section["relative_rms_error"] == pytest.approx(rel)


def test_the_manifest_and_state_with_a_replay_set_fit_their_types_and_schemas(runner, replay_bundle, photos, tmp_path):
    import jsonschema

    from edgetl._device_state import read_state
    from edgetl.exporter.bundle import ExportBundle

    schemas = Path(__file__).resolve().parents[1] / "deploy" / "schema"
    manifest = json.loads((replay_bundle / "manifest.json").read_text())
    jsonschema.validate(manifest, json.loads((schemas / "manifest.schema.json").read_text()))
    assert ExportBundle.load(replay_bundle).manifest.replay.count == 2 * PER_CLASS + 3
    assert _finetune(runner, replay_bundle, photos, tmp_path / "state", "--epochs", "1").returncode == 0
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    jsonschema.validate(state, json.loads((schemas / "state.schema.json").read_text()))
    assert read_state(tmp_path / "state").history[0].replay.ratio == 0.5


def test_info_shows_the_replay_set(runner, replay_bundle):
    r = run(runner, "info", str(replay_bundle))
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)["replay"]
    assert shown["count"] == 2 * PER_CLASS + 3 and shown["bytes"] > 0 and "items" not in shown


# --- the device ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """12 photos of the known classes (4 each), other than the run's."""
    return make_image_folder(tmp_path_factory.mktemp("replay-photos") / "photos", per_class=4, size=44, seed=9)


def _finetune(runner, bundle, data, state, *extra: str) -> subprocess.CompletedProcess:
    return run(runner, "finetune", str(bundle), str(data), "--state", str(state), "--threads", "1", "--seed", "3", *extra)


def test_an_epoch_with_replay_equals_the_python_path_bit_for_bit(runner, replay_bundle, photos, tmp_path):
    """Batch 4 at ratio 0.5: 2 photos (the epoch's shuffle) + 2 replay rows (the replay order,
    dequantized in Python) per step, 6 steps: the device's weights equal ExecuTorch's bindings'."""
    r = _finetune(runner, replay_bundle, photos, tmp_path / "state", "--epochs", "1", "--replay-ratio", "0.5")
    assert r.returncode == 0, r.stderr
    history = json.loads((tmp_path / "state" / "state.json").read_text())["history"]
    assert history[0]["replay"] == {"ratio": 0.5, "rows": 12} and history[0]["images"] == 12

    manifest = json.loads((replay_bundle / "manifest.json").read_text())
    train = manifest["programs"]["training"]
    paths = sorted(p for p in photos.rglob("*.png"))
    labels = np.array([CLASSES.index(p.parent.name) for p in paths])
    import edgetl
    from edgetl.data.folder import load_image

    tf = edgetl.transforms_for("mobilenet_v2", image_size=EXPORT_IMAGE_SIZE, train=False)
    x = torch.stack([tf(load_image(str(p))) for p in paths]).numpy()
    bottom = et.Program(replay_bundle / "bottom.pte")
    feats = np.concatenate([bottom.run("forward", x[i : i + EXPORT_BATCH])[0] for i in range(0, len(x), EXPORT_BATCH)])
    replay = QuantizedRows.from_bytes((replay_bundle / "replay.bin").read_bytes())
    rfeats, rlabels = replay.dequantized(), replay.labels.astype(np.int64)
    order = fisher_yates(len(paths), 3 * 1000003)
    rorder = fisher_yates(len(rlabels), (3 * 1000003) ^ REPLAY_STREAM)

    opt = train["optimizer"]
    session = et.TrainingSession(replay_bundle / "train.pte", replay_bundle / "train.ptd", buffer_names=train["buffers"])
    sgd = None
    for s in range(6):
        idx = order[2 * s : 2 * s + 2]
        ridx = [rorder[(2 * s + i) % len(rorder)] for i in range(2)]
        batch = np.concatenate([feats[idx], rfeats[ridx]])
        session.forward_backward(batch, np.concatenate([labels[idx], rlabels[ridx]]))
        sgd = sgd or session.sgd(opt["lr"], momentum=opt["momentum"], weight_decay=opt["weight_decay"])
        sgd.step()
    native = et.read_ptd((tmp_path / "state" / "trained.ptd").read_bytes())
    for name, value in session.state().items():
        assert np.array_equal(native[name].reshape(-1), np.asarray(value).reshape(-1)), name


def test_a_resumed_run_repeats_the_replay_draw(runner, replay_bundle, photos, tmp_path):
    """Default ratio (0.5: 2 replay rows of 4) over 2 epochs, at once and as 1 + 1: the same bytes."""
    assert _finetune(runner, replay_bundle, photos, tmp_path / "once", "--epochs", "2").returncode == 0
    assert _finetune(runner, replay_bundle, photos, tmp_path / "twice", "--epochs", "1").returncode == 0
    r = _finetune(runner, replay_bundle, photos, tmp_path / "twice", "--epochs", "2")
    assert r.returncode == 0 and "resuming after epoch 1" in r.stdout, r.stderr
    once, twice = (json.loads((tmp_path / d / "state.json").read_text()) for d in ("once", "twice"))
    assert once["weights_sha256"] == twice["weights_sha256"]
    assert [h["replay"] for h in once["history"]] == [{"ratio": 0.5, "rows": 12}] * 2  # 12 photos / 2 per step = 6 steps


def _without_replay(bundle: Path, out: Path) -> Path:
    """``bundle`` with its replay set removed and the manifest sealed again."""
    shutil.copytree(bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["replay"], manifest["files"]["replay.bin"]
    (out / "replay.bin").unlink()
    (out / "manifest.json").write_bytes(manifest_bytes(manifest))
    return out


@pytest.mark.parametrize(
    ("ratio", "message"),
    [("1", "must be in [0, 1)"), ("-0.1", "must be in [0, 1)"), ("0.9", "leaves no photo in a batch of 4"), ("x", "must be a number")],
)
def test_a_bad_replay_ratio_fails_with_one_line(runner, replay_bundle, photos, tmp_path, ratio, message):
    r = _finetune(runner, replay_bundle, photos, tmp_path / "state", "--replay-ratio", ratio)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "state").exists()


def test_replay_without_a_replay_set_or_with_a_damaged_one_fails_with_one_line(runner, replay_bundle, photos, tmp_path):
    plain = _without_replay(replay_bundle, tmp_path / "plain")
    r = _finetune(runner, plain, photos, tmp_path / "s1", "--replay-ratio", "0.25")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "needs a bundle with a replay set" in r.stderr, r.stderr
    r = _finetune(runner, plain, photos, tmp_path / "s2", "--epochs", "1")  # default: no replay
    assert r.returncode == 0, r.stderr
    assert "replay" not in json.loads((tmp_path / "s2" / "state.json").read_text())["history"][0]

    damaged = tmp_path / "damaged"
    shutil.copytree(replay_bundle, damaged)
    data = bytearray((damaged / "replay.bin").read_bytes())
    data[-1] ^= 0x01
    (damaged / "replay.bin").write_bytes(bytes(data))
    r = _finetune(runner, damaged, photos, tmp_path / "s3")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "replay.bin is damaged (sha256 mismatch" in r.stderr, r.stderr
    assert not (tmp_path / "s3").exists()


def test_a_resealed_replay_set_with_a_label_out_of_range_fails_with_one_line(runner, replay_bundle, photos, tmp_path):
    """The file's sha256 and the seal agree (anyone can recompute them): its contents are still checked."""
    bad = tmp_path / "bad"
    shutil.copytree(replay_bundle, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    data = bytearray((bad / "replay.bin").read_bytes())
    channels = manifest["replay"]["feature_shape"][0]
    data[24 + 4 * channels : 24 + 4 * channels + 4] = (7).to_bytes(4, "little")  # row 0's label
    (bad / "replay.bin").write_bytes(bytes(data))
    manifest["files"]["replay.bin"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (bad / "manifest.json").write_bytes(manifest_bytes(manifest))
    r = _finetune(runner, bad, photos, tmp_path / "state")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "row 0 has label 7" in r.stderr, r.stderr
    assert not (tmp_path / "state").exists()


def test_the_replay_set_counts_in_the_memory_need(runner, replay_bundle, photos, tmp_path):
    from edgetl.profiler.native import native_peak_of_bundle

    manifest = json.loads((replay_bundle / "manifest.json").read_text())
    with_replay = native_peak_of_bundle(manifest, images=12)
    without = native_peak_of_bundle(manifest, images=12, replay=False)
    assert with_replay.replay == manifest["replay"]["bytes"] and with_replay.total - without.total == manifest["replay"]["bytes"]
    r = _finetune(runner, replay_bundle, photos, tmp_path / "state", "--memory-limit", "1")
    assert r.returncode == 2 and f"replay set {manifest['replay']['bytes'] / 2**20:.1f} MiB" in r.stderr, r.stderr
    r = _finetune(runner, replay_bundle, photos, tmp_path / "state", "--memory-limit", "1", "--replay-ratio", "0")
    assert r.returncode == 2 and "replay set" not in r.stderr, r.stderr
