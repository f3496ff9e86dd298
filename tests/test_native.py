"""The native device runner (deploy/native): built by the suite, run in child processes as on a device.

It shares the MobileNetV2 training bundle of tests/test_export.py (the ``training_bundle`` fixture of
tests/conftest.py: K=2, 64 px, batch 4, SGD lr 0.005 momentum 0.9). References: the Python transforms (preprocessing), ExecuTorch's Python
bindings over the same programs (bit for bit) and eager PyTorch (within float tolerance).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import edgetl
from edgetl.exporter import _executorch as et
from edgetl.exporter.bundle import manifest_bytes
from edgetl.exporter.weights import apply_device_weights
from tests.conftest import CLASSES, EXPORT_BATCH, EXPORT_IMAGE_SIZE, export_eager_net, fisher_yates, make_image_folder

BATCH, IMAGE_SIZE = EXPORT_BATCH, EXPORT_IMAGE_SIZE

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "deploy" / "native" / "build"


def run(runner: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(runner), *args], capture_output=True, text=True, timeout=600, **kw)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The runner's epoch order (finetune.cpp): the shuffle seeded with seed * 1000003 + epoch."""
    return fisher_yates(n, seed * 1000003 + epoch)


def preprocessed(paths: list[Path]) -> np.ndarray:
    """The Python side's eval transform (what the trainer feeds the model)."""
    from PIL import Image

    tf = edgetl.transforms_for("mobilenet_v2", image_size=IMAGE_SIZE, train=False)
    return np.stack([tf(Image.open(p).convert("RGB")).numpy() for p in paths])


def images_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".jpg"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """12 PNGs and 12 JPEGs of odd sizes: 3 classes x 8."""
    from PIL import Image

    root = make_image_folder(tmp_path_factory.mktemp("native") / "photos", per_class=8, size=45, seed=7)
    for p in images_of(root)[1::2]:
        Image.open(p).resize((51, 45)).save(p.with_suffix(".jpg"), quality=90)
        p.unlink()
    return root


def test_binary_maps_no_torch_and_no_python(runner):
    ldd = subprocess.run(["ldd", str(runner)], capture_output=True, text=True, check=True).stdout
    assert "libexecutorch.so" in ldd and "libexecutorch_backend_xnnpack.so" in ldd
    for banned in ("libtorch", "libc10", "libpython"):
        assert banned not in ldd, ldd


def test_preprocessing_equals_the_python_transforms(runner):
    """JPEG/PNG decoding, resize (bilinear and bicubic), crop and normalisation, bit for bit, 85 images x 7 specs."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "tests/native_preprocess_compare.py"), "--binary", str(BUILD / "edgetl-preprocess")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    assert "worst max abs diff: 0 " in r.stdout or "0 failing case(s)" in r.stdout, r.stdout[-500:]


def test_classify_equals_the_python_bindings_and_eager(runner, photos, training_bundle, export_run):
    bundle = training_bundle
    paths = images_of(photos)
    out = run(runner, "classify", str(bundle), str(photos), "--top-k", "3", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    x = preprocessed(paths)
    program = et.Program(bundle / "model.pte")
    logits = np.concatenate([program.run("forward", x[i : i + 1])[0] for i in range(len(x))])
    probs = torch.softmax(torch.from_numpy(logits).double(), 1).numpy()
    net = edgetl.load_model("mobilenet_v2", num_classes=len(CLASSES))
    net.load_state_dict(torch.load(export_run / "model.pt", weights_only=True)["model"])
    with torch.no_grad():
        eager_top1 = net.eval()(torch.from_numpy(x)).argmax(1).numpy()
    for row, p, top1 in zip(rows, probs, eager_top1, strict=True):
        assert row["top"][0]["label"] == CLASSES[int(np.argmax(p))] == CLASSES[int(top1)]
        for entry in row["top"]:
            assert abs(entry["prob"] - p[CLASSES.index(entry["label"])]) < 1e-5, (row, p)
    plain = run(runner, "classify", str(bundle), str(paths[0]), "--top-k", "1")
    name, prob = plain.stdout.strip().split(": ")[1].split()
    assert plain.returncode == 0 and name == rows[0]["top"][0]["label"] and abs(float(prob) - rows[0]["top"][0]["prob"]) < 5e-4


def test_three_steps_equal_the_python_path_bit_for_bit_and_eager(runner, photos, tmp_path, training_bundle, export_run):
    """One epoch of 12 images = 3 SGD steps (momentum 0.9): against ExecuTorch's Python bindings
    (same programs, same SGD rule: identical bytes) and against eager MobileTL in PyTorch."""
    bundle = training_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    train = manifest["programs"]["training"]
    data = tmp_path / "data"
    for cls in CLASSES:
        shutil.copytree(photos / cls, data / cls, ignore=lambda d, names: [n for n in sorted(names)[4:]])
    r = run(
        runner,
        "finetune",
        str(bundle),
        str(data),
        "--state",
        str(tmp_path / "state"),
        "--epochs",
        "1",
        "--threads",
        "1",
        "--val",
        str(data),
    )
    assert r.returncode == 0, r.stderr
    native = et.read_ptd((tmp_path / "state" / "trained.ptd").read_bytes())
    loss_native = json.loads((tmp_path / "state" / "state.json").read_text())["history"][0]["loss"]

    paths = images_of(data)
    labels = np.array([CLASSES.index(p.parent.name) for p in paths])
    x = preprocessed(paths)
    bottom = et.Program(bundle / "bottom.pte")
    feats = np.concatenate([bottom.run("forward", x[i : i + BATCH])[0] for i in range(0, len(x), BATCH)])
    order = epoch_order(len(paths), seed=0, epoch=0)
    batches = [np.array(order[s * BATCH : (s + 1) * BATCH]) for s in range(len(paths) // BATCH)]
    assert len(batches) == 3

    opt = train["optimizer"]
    session = et.TrainingSession(bundle / "train.pte", bundle / "train.ptd", buffer_names=train["buffers"])
    sgd, losses = None, []
    for idx in batches:
        losses.append(float(session.forward_backward(feats[idx], labels[idx])[0]))
        sgd = sgd or session.sgd(opt["lr"], momentum=opt["momentum"], weight_decay=opt["weight_decay"])
        sgd.step()
    python = session.state()
    assert set(native) >= set(python)
    for name, value in python.items():
        assert np.array_equal(native[name].reshape(-1), np.asarray(value).reshape(-1)), name
    assert loss_native == pytest.approx(np.mean(losses), abs=1e-6)

    net = export_eager_net(export_run).train()
    sgd_eager = torch.optim.SGD([p for _, p in net.trainable_parameters()], lr=opt["lr"], momentum=opt["momentum"])
    eager_losses = []
    for idx in batches:
        loss = torch.nn.functional.cross_entropy(net.forward_top(torch.from_numpy(feats[idx])), torch.from_numpy(labels[idx]))
        sgd_eager.zero_grad()
        loss.backward()
        sgd_eager.step()
        eager_losses.append(loss.item())
    np.testing.assert_allclose(losses, eager_losses, rtol=0, atol=1e-6)
    state = net.state_dict()
    for name in train["trainable_parameters"] + [b for b in train["buffers"] if "running" in b]:
        ref = state[name].detach().numpy().reshape(-1)
        # relative to the tensor's scale: running variances reach the hundreds
        assert np.abs(native[name].reshape(-1) - ref).max() <= 1e-6 * max(1.0, float(np.abs(ref).max())), name

    # classify with the trained weights: the bindings' predict over the same .ptd, and eager with
    # the device weights loaded (apply_device_weights, how they come back to the workstation)
    out = run(runner, "classify", str(bundle), str(data), "--trained", str(tmp_path / "state"), "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    top = et.Program(bundle / "train.pte", tmp_path / "state" / "trained.ptd")
    logits = np.concatenate([top.run("predict", feats[i : i + BATCH])[0] for i in range(0, len(feats), BATCH)])
    probs = torch.softmax(torch.from_numpy(logits).double(), 1).numpy()
    device = export_eager_net(export_run)
    device.load_state_dict(apply_device_weights(device.state_dict(), tmp_path / "state" / "trained.ptd"))
    with torch.no_grad():
        eager_top1 = device.eval().forward_top(torch.from_numpy(feats)).argmax(1).numpy()
    for row, p, top1 in zip(rows, probs, eager_top1, strict=True):
        assert row["top"][0]["label"] == CLASSES[int(np.argmax(p))] == CLASSES[int(top1)]
        assert abs(row["top"][0]["prob"] - p.max()) < 1e-5
    val_accuracy = json.loads((tmp_path / "state" / "state.json").read_text())["history"][0]["val_accuracy"]
    assert val_accuracy == pytest.approx(float((probs.argmax(1) == labels).mean()))


def _finetune_cmd(runner: Path, bundle: Path, data: Path, state: Path, epochs: int) -> list[str]:
    return [
        str(runner),
        "finetune",
        str(bundle),
        str(data),
        "--state",
        str(state),
        "--epochs",
        str(epochs),
        "--threads",
        "1",
        "--seed",
        "3",
        "--lr",
        "0.0005",
    ]


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("native-many") / "photos", per_class=60, size=40, seed=11)


def test_kill_9_mid_epoch_then_resume_equals_an_uninterrupted_run(runner, many_photos, tmp_path, training_bundle):
    epochs = 6
    whole = subprocess.run(_finetune_cmd(runner, training_bundle, many_photos, tmp_path / "whole", epochs), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr

    state = tmp_path / "cut"
    proc = subprocess.Popen(
        _finetune_cmd(runner, training_bundle, many_photos, state, epochs), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not (state / "state.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.002)
    maps = Path(f"/proc/{proc.pid}/maps").read_text()  # a running fine-tune: what it has mapped
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "libexecutorch.so" in maps
    assert not any(lib in maps for lib in ("libtorch", "libc10", "libpython")), "a torch or Python library is mapped"
    saved = json.loads((state / "state.json").read_text())
    assert 1 <= saved["epoch"] < epochs, "the kill came too late to interrupt training"

    resumed = subprocess.run(_finetune_cmd(runner, training_bundle, many_photos, state, epochs), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {saved['epoch']}" in resumed.stdout
    a, b = json.loads((tmp_path / "whole" / "state.json").read_text()), json.loads((state / "state.json").read_text())
    assert [h["epoch"] for h in b["history"]] == list(range(1, epochs + 1))
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert (tmp_path / "whole" / "trained.ptd").read_bytes() == (state / "trained.ptd").read_bytes()
    assert (tmp_path / "whole" / a["momentum"]).read_bytes() == (state / b["momentum"]).read_bytes()
    # .edgetl.lock: the one-writer lock, released by the kill (the resume above took it)
    assert sorted(p.name for p in state.iterdir()) == sorted(["state.json", "trained.ptd", b["weights"], b["momentum"], ".edgetl.lock"])


def test_training_gives_the_same_bits_at_any_thread_count(runner, photos, tmp_path, training_bundle):
    """edgetl's kernels sum every output element in one order whatever the pool's size: two epochs
    at 1, 2 and 4 threads end with the same weights and momentum, byte for byte."""
    runs = {}
    for threads in (1, 2, 4):
        state = tmp_path / f"t{threads}"
        cmd = _finetune_cmd(runner, training_bundle, photos, state, 2)
        cmd[cmd.index("--threads") + 1] = str(threads)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        s = json.loads((state / "state.json").read_text())
        runs[threads] = ((state / s["weights"]).read_bytes(), (state / s["momentum"]).read_bytes(), [h["loss"] for h in s["history"]])
    assert runs[1] == runs[2] == runs[4]


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [line for line in r.stderr.strip().splitlines() if not re.match(r"epoch \d+/\d+ step", line)]  # progress
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("edgetl-device: error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("name", ["train.ptd", "train.pte", "bottom.pte"])
def test_a_corrupted_program_or_weights_file_fails_with_one_line(runner, tmp_path, name, training_bundle):
    damaged = tmp_path / "bundle"
    shutil.copytree(training_bundle, damaged)
    data = bytearray((damaged / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (damaged / name).write_bytes(bytes(data))
    _one_line_error(run(runner, "info", str(damaged)), name, "damaged")


def test_a_bundle_whose_weights_belong_to_another_model_fails_with_one_line(runner, tmp_path, photos, training_bundle):
    """Hashes made consistent, so only the runtime can tell: the weights file names another network's tensors."""
    from executorch.exir._serialize.data_serializer import DataPayload
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    other = tmp_path / "bundle"
    shutil.copytree(training_bundle, other)
    serializer = FlatTensorSerializer()
    payload = serializer.deserialize((other / "train.ptd").read_bytes())
    renamed = DataPayload(buffers=payload.buffers, named_data={f"other.{k}": v for k, v in payload.named_data.items()})
    blob = bytes(serializer.serialize(renamed))
    (other / "train.ptd").write_bytes(blob)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["files"]["train.ptd"]["sha256"] = hashlib.sha256(blob).hexdigest()
    (other / "manifest.json").write_bytes(manifest_bytes(manifest))  # sealed as the exporter seals it
    _one_line_error(run(runner, "finetune", str(other), str(photos), "--state", str(tmp_path / "s"), "--epochs", "1"), "train.pte")
    assert not (tmp_path / "s" / "state.json").exists()


def test_a_program_needing_kernels_the_runner_lacks_is_refused_with_one_line(runner, tmp_path, photos, training_bundle):
    """The manifest lists edgetl's kernels the training program calls; the runner checks them before any work."""
    manifest = json.loads((training_bundle / "manifest.json").read_text())
    listed = manifest["programs"]["training"]["custom_operators"]
    assert {f"edgetl_export::{op}.out" for op in ("pointwise_nhwc", "pointwise_grad_input", "pointwise_grad_weight")} <= set(listed)
    other = tmp_path / "bundle"
    shutil.copytree(training_bundle, other)
    manifest["programs"]["training"]["custom_operators"] = [*listed, "edgetl_export::from_a_newer_edgetl.out"]
    (other / "manifest.json").write_bytes(manifest_bytes(manifest))
    for args in (["finetune", str(other), str(photos), "--state", str(tmp_path / "s"), "--epochs", "1"],
                 ["classify", str(other), str(photos), "--trained", str(training_bundle / "train.ptd")]):  # fmt: skip
        _one_line_error(run(runner, *args), "train.pte needs kernels this edgetl-device lacks: edgetl_export::from_a_newer_edgetl.out")
    assert not (tmp_path / "s").exists()


def test_info_names_the_runner_and_a_bundle_for_a_newer_runtime_is_refused(runner, tmp_path, training_bundle):
    import importlib.metadata
    import platform

    built = importlib.metadata.version("executorch").split("+")[0]  # the wheel the suite builds against
    info = json.loads(run(runner, "info", str(training_bundle)).stdout)
    assert info["runner"] == {"arch": platform.machine(), "executorch": built}
    assert run(runner, "--version").stdout.strip() == f"edgetl-device {platform.machine()}, ExecuTorch {built}"
    major, minor = (int(v) for v in built.split(".")[:2])
    manifest = json.loads((training_bundle / "manifest.json").read_text())
    assert manifest["runtime"]["executorch_series"] == f"{major}.{minor}"
    other = tmp_path / "bundle"
    shutil.copytree(training_bundle, other)
    for series, refused in ((f"{major}.{minor + 1}", True), (f"{major + 1}.0", True), (f"{major}.{minor - 1}", False), ("1.x", True)):
        manifest["runtime"]["executorch_series"] = series
        (other / "manifest.json").write_bytes(manifest_bytes(manifest))
        r = run(runner, "info", str(other))
        if not refused:
            assert r.returncode == 0, r.stderr
        elif series == "1.x":
            _one_line_error(r, "runtime.executorch_series '1.x' is not MAJOR.MINOR")
        else:
            _one_line_error(r, f"needs ExecuTorch {series} (runtime.executorch_series), this edgetl-device is built against {built}")


def test_state_of_another_bundle_unknown_classes_and_bad_values_fail_with_one_line(runner, tmp_path, photos, training_bundle):
    bundle = training_bundle
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.json").write_text(json.dumps({"epoch": 1, "history": [], "bundle_ptd_sha256": "0" * 64, "weights": None}))
    _one_line_error(run(runner, "classify", str(bundle), str(photos), "--trained", str(state)), "another bundle")
    _one_line_error(run(runner, "finetune", str(bundle), str(photos), "--state", str(state)), "another bundle")
    other = tmp_path / "photos"
    shutil.copytree(photos, other)
    (other / "red").rename(other / "purple")
    _one_line_error(run(runner, "finetune", str(bundle), str(other), "--state", str(tmp_path / "s")), "purple")
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())
    for args, needle in (
        (["--epochs", "0"], "--epochs"),
        (["--lr", "-1"], "--lr"),
        (["--batch-size", "3"], "batch 4"),
        (["--threads", "-1"], "--threads"),
        (["--momentum", "1.5"], "--momentum"),
    ):
        _one_line_error(run(runner, "finetune", str(bundle), str(photos), "--state", str(tmp_path / "t"), *args), needle)
    _one_line_error(run(runner, "classify", str(bundle), str(photos), "--top-k", "0"), "--top-k")


def test_unreadable_images_are_skipped_with_one_warning_each(runner, tmp_path, photos, training_bundle):
    data = tmp_path / "data"
    shutil.copytree(photos, data)
    jpg = next(data.rglob("*.jpg"))
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])  # a truncated JPEG
    (data / "red" / "notes.png").write_text("not an image")
    r = run(runner, "finetune", str(training_bundle), str(data), "--state", str(tmp_path / "s"), "--epochs", "1")
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 2 and any(str(jpg) in w for w in warnings) and any("notes.png" in w for w in warnings), warnings


def test_a_state_directory_that_cannot_be_written_fails_before_training(runner, photos, training_bundle):
    # /proc/self is a directory nobody, root included, can create files in
    _one_line_error(run(runner, "finetune", str(training_bundle), str(photos), "--state", "/proc/self"), "not writable")


def test_a_full_disk_keeps_the_previous_epoch(runner, tmp_path, photos, training_bundle):
    """RLIMIT_FSIZE makes writes fail with EFBIG past a size, as a full disk fails them with ENOSPC."""
    bundle = training_bundle
    state = tmp_path / "state"
    ok = run(runner, "finetune", str(bundle), str(photos), "--state", str(state), "--epochs", "1")
    assert ok.returncode == 0, ok.stderr
    before = {p.name: p.read_bytes() for p in state.iterdir() if p.name != ".edgetl.lock"}  # the lock holds each run's pid
    limit = (bundle / "train.ptd").stat().st_size // 2

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = run(runner, "finetune", str(bundle), str(photos), "--state", str(state), "--epochs", "2", preexec_fn=small_files)
    _one_line_error(r, "cannot write", "previous file is kept")
    after = {p.name: p.read_bytes() for p in state.iterdir() if p.name != ".edgetl.lock"}
    assert after == before  # no temporary file left, nothing half-written, epoch 1 still current
    assert json.loads(after["state.json"])["epoch"] == 1


def test_the_native_peak_prediction_holds_against_the_measured_process(runner, many_photos, tmp_path, training_bundle):
    """edgetl.profiler.native's sum (runtime, features, weights file, planned arena, momentum) against VmHWM."""
    from edgetl.profiler.native import native_peak_of_bundle

    bundle = training_bundle
    images = len(images_of(many_photos))
    predicted = native_peak_of_bundle(json.loads((bundle / "manifest.json").read_text()), images=images)
    # the runner's own VmHWM (--verbose): a child's ru_maxrss would include this big process, whose
    # memory a vforked child holds until it execs
    r = subprocess.run(
        [*_finetune_cmd(runner, training_bundle, many_photos, tmp_path / "s", 1), "--verbose"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    measured = float(re.findall(r"peak ([\d.]+) MiB", r.stderr)[-1]) * 2**20
    print(f"native peak: predicted {predicted.total / 2**20:.1f} MiB {predicted.to_dict()}, measured {measured / 2**20:.1f} MiB")
    assert abs(predicted.total - measured) <= 0.10 * measured


# --- weights as .npy files, and a fleet client that trains through the runner ---------------------


def _ptd_tensors(path: Path) -> dict[str, np.ndarray]:
    """The exporter's own reader of a .ptd (the reference for the runner's .npy files)."""
    return et.read_ptd(path.read_bytes())


def test_weights_leave_and_enter_the_runner_as_npy_files(runner, tmp_path, training_bundle):
    bundle = training_bundle
    ptd = _ptd_tensors(bundle / "train.ptd")
    r = run(runner, "export-weights", str(bundle), str(bundle / "train.ptd"), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    files = {p.stem: np.load(p, allow_pickle=False) for p in (tmp_path / "out").glob("*.npy")}
    layout = json.loads((bundle / "manifest.json").read_text())["programs"]["training"]["weights_layout"]
    assert sorted(files) == sorted(ptd) == sorted(layout)
    for name, value in files.items():  # numpy reads them back: same values, the layout's shape and dtype
        assert value.shape == tuple(layout[name]["shape"]) and value.dtype == np.dtype(layout[name]["dtype"]), name
        assert np.array_equal(value.reshape(-1), ptd[name].reshape(-1)), name

    # import: the given tensors replace the bundle's, the others keep the bundle's values
    given = tmp_path / "in"
    given.mkdir()
    head = "classifier.1.weight"
    np.save(given / f"{head}.npy", files[head] * 2 + 1)
    kept = next(n for n in files if n.endswith(".bias") and n != "classifier.1.bias")
    r = run(runner, "import-weights", str(bundle), str(given), "--state", str(tmp_path / "state"))
    assert r.returncode == 0 and "imported 1 of the bundle's" in r.stdout, r.stderr
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    started = _ptd_tensors(tmp_path / "state" / state["weights"])
    assert state["epoch"] == 0 and np.array_equal(started[head].reshape(files[head].shape), files[head] * 2 + 1)
    assert np.array_equal(started[kept], ptd[kept])
    r = run(runner, "export-weights", str(bundle), str(tmp_path / "state"), "--out", str(tmp_path / "back"))
    assert r.returncode == 0 and np.array_equal(np.load(tmp_path / "back" / f"{head}.npy"), files[head] * 2 + 1)

    # what a server or a disk can hand the runner that it must refuse, each with one line and nothing written
    bad_cases = [
        ("other.weight", np.zeros(3, np.float32), "no tensor other.weight"),
        (head, np.zeros((3, 7), np.float32), "has shape (3, 7)"),
        (head, files[head].astype(np.float64), "dtype '<f8'"),
        (head, np.where(np.arange(files[head].size).reshape(files[head].shape) == 5, np.nan, files[head]), "non-finite value at index 5"),
        (head, np.asfortranarray(files[head]), "Fortran-order"),
    ]
    for i, (name, value, needle) in enumerate(bad_cases):
        folder = tmp_path / f"bad{i}"
        folder.mkdir()
        np.save(folder / f"{name}.npy", value)
        _one_line_error(run(runner, "import-weights", str(bundle), str(folder), "--state", str(folder / "s")), needle)
        assert not (folder / "s" / "state.json").exists()
    _one_line_error(run(runner, "import-weights", str(bundle), str(given), "--state", str(tmp_path / "state")), "already holds weights")


_DEVICE_CLIENT = """
import json, sys
import numpy as np
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
    setattr(TaskIdentity, name, value)
from edgetl.fleet.client import train, train_message_content
from edgetl.fleet.config import FleetConfig
work, node = sys.argv[1], json.loads(sys.argv[2])
job = json.loads(open(work + "/job.json").read())
arrays = dict(np.load(work + "/global.npz"))
msg = Message(content=train_message_content(arrays, FleetConfig.from_record(job["config"]), 1, job["classes"]),
              message_type=MessageType.TRAIN, dst_node_id=7)
reply = train(msg, Context(1, 7, node, RecordDict(), {}))
np.savez(work + "/reply.npz", **{k: a.numpy() for k, a in reply.content["arrays"].items()})
print(json.dumps({"metrics": dict(reply.content["metrics"]), "torch": "torch" in sys.modules}))
"""


def test_a_fleet_client_trains_through_the_runner_without_torch(runner, tmp_path, training_bundle, export_run, image_folder):
    """A device client (node config ``bundle``) in a process that never loads torch; its reply is
    the runner's own training from the server's tensors, bit for bit, and the server accepts it
    next to an eager client's."""
    pytest.importorskip("flwr")
    from edgetl.fleet.client import _seed
    from edgetl.fleet.client import app as client_app
    from edgetl.fleet.local import build_network
    from edgetl.fleet.payload import shared_keys, to_arrays
    from edgetl.fleet.server import run_fleet
    from tests.conftest import LoopbackGrid, set_task_identity, small_fleet_config

    weights = tmp_path / "pretrained.pt"  # the fleet's model is the bundle's: same weights, classes, K, size
    torch.save(torch.load(export_run / "model.pt", weights_only=True)["model"], weights)
    config = small_fleet_config(
        tmp_path, image_folder, model="mobilenet_v2", weights=str(weights), image_size=IMAGE_SIZE, blocks=2, batch_size=BATCH,
        optimizer="sgd", lr=0.01,
    )  # fmt: skip
    net = build_network(config, num_classes=len(CLASSES), blocks=config.blocks)
    offered = to_arrays(net.state_dict(), shared_keys(net))
    np.savez(tmp_path / "global.npz", **offered)
    (tmp_path / "job.json").write_text(json.dumps({"config": config.to_record(), "classes": list(CLASSES)}))
    node = {"bundle": str(training_bundle), "data": str(image_folder), "runner": str(runner)}
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", _DEVICE_CLIENT, str(tmp_path), json.dumps(node)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    reply = dict(np.load(tmp_path / "reply.npz"))
    assert out["torch"] is False
    layout = json.loads((training_bundle / "manifest.json").read_text())["programs"]["training"]["weights_layout"]
    assert sorted(reply) == sorted(n for n in layout if not n.endswith("num_batches_tracked")) and set(reply) <= set(offered)
    assert out["metrics"]["num-examples"] == len(images_of(image_folder)) and out["metrics"]["blocks"] == 2
    # the ClientApp process (flwr, numpy) plus the runner: an eager client's process alone is above 400 MiB
    assert 0 < out["metrics"]["peak-rss-bytes"] < 300 * 2**20

    # the reference: the runner by hand, from the same tensors, seed and learning rate
    given = tmp_path / "given"
    given.mkdir()
    for name in reply:
        np.save(given / f"{name}.npy", offered[name])
    seed = str(_seed(config, 1, {"partition": None}, 7))
    ref = str(tmp_path / "ref")
    for args in (
        ("import-weights", str(training_bundle), str(given), "--state", ref),
        ("finetune", str(training_bundle), str(image_folder), "--state", ref, "--epochs", "1", "--seed", seed, "--lr", "0.01"),
        ("export-weights", str(training_bundle), ref, "--out", str(tmp_path / "ref-out")),
    ):
        assert run(runner, *args).returncode == 0
    for name, value in reply.items():
        assert np.array_equal(value, np.load(tmp_path / "ref-out" / f"{name}.npy")), name
    assert any(not np.array_equal(reply[k], offered[k]) for k in reply)

    # federated evaluation on the device (bottom.pte + predict with the given tensors) equals eager
    from edgetl.data.folder import build_datasets
    from edgetl.fleet.device import DeviceClient
    from edgetl.fleet.local import accuracy
    from edgetl.fleet.payload import load_arrays

    loss, acc, count = DeviceClient.from_node(node).evaluate(reply, str(image_folder))
    load_arrays(net, reply)
    tf = edgetl.transforms_for("mobilenet_v2", image_size=IMAGE_SIZE, train=False)
    eager_loss, eager_acc = accuracy(net, build_datasets(image_folder, train_transform=tf, eval_transform=tf, val_data=image_folder).val)
    assert count == len(images_of(image_folder)) and acc == eager_acc and abs(loss - eager_loss) < 1e-4, (loss, eager_loss, acc, eager_acc)

    # a mixed fleet, an eager client and the device client, both accepted and averaged in both
    # rounds; under FedBN the device keeps its norms' statistics (the server rejects any it sent)
    # and evaluates with them on its own held-out folder
    from edgetl.fleet.client import LOCAL_STATS

    fedbn = dataclasses.replace(config, fedbn=True, rounds=2, out=str(tmp_path / "fedbn"))
    with pytest.MonkeyPatch.context() as mp:
        set_task_identity(mp)
        nodes = [{"partition-id": 0, "num-partitions": 2}, {**node, "val": str(image_folder)}]
        grid = LoopbackGrid([client_app, client_app], node_configs=nodes)
        history = run_fleet(grid, fedbn)
    assert [(row["sampled"], row["accepted"], row["rejected"]) for row in history] == [(2, 2, [])] * 2, history
    assert all(row["federated_acc"] is not None for row in history), history
    own = {k: a.numpy() for k, a in grid.contexts[1].state[LOCAL_STATS].items()}
    bundle_stats = _ptd_tensors(training_bundle / "train.ptd")
    assert own and all(k.endswith(("running_mean", "running_var")) for k in own)
    assert all(not np.array_equal(v.reshape(-1), bundle_stats[k].reshape(-1)) for k, v in own.items())
