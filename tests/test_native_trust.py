"""What the device runner (and the Python code reading its files) trusts and refuses: one writer per
state directory, weights bound to their sha256, names that stay inside their directory, image and
number sizes bounded before any work, a .npy header read as numpy reads it, a full disk.

Each test runs ``edgetl-device`` in a child process on the shared training bundle (tests/conftest.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from edgetl.exporter.bundle import ExportBundle, manifest_bytes
from edgetl.exporter.errors import ExportError
from edgetl.exporter.weights import device_weights_file
from tests.conftest import make_image_folder
from tests.test_native import _one_line_error, run

LOCK = ".edgetl.lock"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("trust") / "photos", per_class=8, size=40, seed=5)


@pytest.fixture(scope="module")
def trained(runner, training_bundle, data, tmp_path_factory) -> Path:
    """A state directory after one epoch (tests copy it before changing anything)."""
    state = tmp_path_factory.mktemp("trained") / "state"
    r = run(runner, "finetune", str(training_bundle), str(data), "--state", str(state), "--epochs", "1")
    assert r.returncode == 0, r.stderr
    return state


def _copy_state(trained: Path, to: Path) -> Path:
    shutil.copytree(trained, to)
    (to / LOCK).unlink(missing_ok=True)
    return to


def _edit_state(state: Path, **fields) -> None:
    s = json.loads((state / "state.json").read_text())
    (state / "state.json").write_text(json.dumps(s | fields))


def _finetune(runner: Path, bundle: Path, data: Path, state: Path, *args: str) -> subprocess.CompletedProcess:
    return run(runner, "finetune", str(bundle), str(data), "--state", str(state), *args)


# --- one writer per state directory ---------------------------------------------------------------


def test_a_second_writer_of_a_state_directory_is_refused_naming_the_holder(runner, tmp_path, training_bundle, data):
    """The lock is the Python side's convention too: flock on STATE/.edgetl.lock, the holder's pid inside."""
    state = tmp_path / "state"
    state.mkdir()
    with open(state / LOCK, "w") as held:  # another process's lock, held as edgetl holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        _one_line_error(_finetune(runner, training_bundle, data, state, "--epochs", "1"), "in use", "pid 4242")
        npy = tmp_path / "npy"
        assert run(runner, "export-weights", str(training_bundle), str(training_bundle / "train.ptd"), "--out", str(npy)).returncode == 0
        _one_line_error(run(runner, "import-weights", str(training_bundle), str(npy), "--state", str(state)), "in use", "pid 4242")
    assert not (state / "state.json").exists() and not (state / ".features.cache").exists()


def test_a_writer_killed_with_sigkill_leaves_no_stale_lock(runner, tmp_path, training_bundle, data):
    state = tmp_path / "state"
    cmd = [str(runner), "finetune", str(training_bundle), str(data), "--state", str(state), "--epochs", "50", "--feature-budget", "0"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not ((state / LOCK).is_file() and (state / LOCK).read_text() == f"{first.pid}\n"):
            time.sleep(0.005)
        assert (state / LOCK).read_text() == f"{first.pid}\n", "the runner wrote no lock with its pid"
        first.send_signal(signal.SIGSTOP)  # holds the lock while the second writer tries
        _one_line_error(_finetune(runner, training_bundle, data, state, "--epochs", "1"), f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    again = _finetune(runner, training_bundle, data, state, "--epochs", "1")
    assert again.returncode == 0, again.stderr
    assert (state / LOCK).read_text().strip().isdigit()


# --- weights bound to their sha256 ------------------------------------------------------------------


def test_a_bit_flip_in_the_device_weights_is_refused_by_every_reader(runner, tmp_path, training_bundle, data, trained):
    state = _copy_state(trained, tmp_path / "state")
    s = json.loads((state / "state.json").read_text())
    assert s["weights_sha256"] and s["epoch"] == 1
    weights = state / s["weights"]
    blob = bytearray(weights.read_bytes())
    blob[len(blob) - 100] ^= 0x01  # one bit of the last tensors' bytes
    weights.write_bytes(bytes(blob))
    (state / "trained.ptd").unlink()  # the hard link shares the flipped bytes; a copy keeps it simple
    shutil.copy(weights, state / "trained.ptd")
    for r in (
        run(runner, "classify", str(training_bundle), str(data), "--trained", str(state)),
        run(runner, "classify", str(training_bundle), str(data), "--trained", str(weights)),
        _finetune(runner, training_bundle, data, state, "--epochs", "2"),
        run(runner, "export-weights", str(training_bundle), str(state), "--out", str(tmp_path / "npy")),
    ):
        _one_line_error(r, s["weights"], "damaged", "sha256")
    linked = run(runner, "classify", str(training_bundle), str(data), "--trained", str(state / "trained.ptd"))
    _one_line_error(linked, "trained.ptd", "damaged")
    assert json.loads((state / "state.json").read_text())["epoch"] == 1
    for path in (state, state / "trained.ptd"):
        with pytest.raises(ExportError, match="damaged"):
            device_weights_file(path, model_name="mobilenet_v2", classes=None)
    assert device_weights_file(trained, model_name="mobilenet_v2", classes=None) == (trained / s["weights"], s["classes"])


# --- names stay inside their directory; epoch in range --------------------------------------------


def test_state_json_names_outside_the_directory_and_bad_epochs_are_refused(runner, tmp_path, training_bundle, data, trained):
    a = _copy_state(trained, tmp_path / "sA")
    sa = json.loads((a / "state.json").read_text())
    a_files = {p.name: p.read_bytes() for p in a.iterdir()}
    for i, (fields, needle) in enumerate(
        (
            ({"weights": f"../sA/{sa['weights']}"}, "not a plain file name"),
            ({"weights": str(a / sa["weights"])}, "not a plain file name"),
            ({"momentum": f"../sA/{sa['momentum']}"}, "not a plain file name"),
            ({"adamw_moments": f"../sA/{sa['momentum']}", "adamw_moments_sha256": sa["weights_sha256"]}, "not a plain file name"),
            ({"optimizer": "adam"}, 'optimizer "adam" is not sgd or adamw'),
            ({"optimizer_steps": -1}, "optimizer_steps -1"),
            ({"weights": ""}, "not a plain file name"),
            ({"epoch": -5}, "epoch -5"),
            ({"epoch": 10**12}, "epoch 1000000000000"),
            ({"epoch": "3"}, "epoch"),
            ({"history": {"1": 2}}, "history is not a list"),
        )
    ):
        b = _copy_state(trained, tmp_path / f"sB{i}")
        _edit_state(b, **fields)
        _one_line_error(_finetune(runner, training_bundle, data, b, "--epochs", "3"), "state.json", needle)
        _one_line_error(run(runner, "classify", str(training_bundle), str(data), "--trained", str(b)), needle)
        if "weights" in fields:
            with pytest.raises(ExportError, match="not a plain file name"):
                device_weights_file(b, model_name="mobilenet_v2", classes=None)
    assert {p.name: p.read_bytes() for p in a.iterdir()} == a_files  # sA neither trained from nor deleted


def _resealed(bundle: Path, to: Path, edit) -> Path:
    """A copy of ``bundle`` whose manifest ``edit`` changes, sealed again: anyone can recompute the seal."""
    shutil.copytree(bundle, to)
    manifest = json.loads((to / "manifest.json").read_text())
    edit(manifest)
    manifest.pop("manifest_sha256", None)
    (to / "manifest.json").write_bytes(manifest_bytes(manifest))
    return to


def test_a_resealed_manifest_cannot_name_files_outside_its_directory(runner, tmp_path, training_bundle, trained):
    from edgetl.fleet.device import DeviceClient, DeviceClientError

    def rename_layout_key(m):
        layout = m["programs"]["training"]["weights_layout"]
        layout["../../../../PWNED"] = layout.pop(sorted(layout)[0])

    def rename_file(m):
        m["files"]["../train.ptd"] = m["files"].pop("train.ptd")
        m["programs"]["training"]["data"] = "../train.ptd"

    def unlisted_program(m):
        m["programs"]["inference"]["file"] = "bottom.pte.unlisted"

    deep = tmp_path / "a" / "b" / "c" / "d"
    deep.mkdir(parents=True)
    for i, (edit, needle) in enumerate(
        ((rename_layout_key, "PWNED"), (rename_file, "../train.ptd"), (unlisted_program, "not listed in its files"))
    ):
        bundle = _resealed(training_bundle, tmp_path / f"bundle{i}", edit)
        if edit is unlisted_program:
            shutil.copy(bundle / "bottom.pte", bundle / "bottom.pte.unlisted")
        _one_line_error(run(runner, "info", str(bundle)), needle)
        _one_line_error(run(runner, "export-weights", str(bundle), str(trained), "--out", str(deep / "out")), needle)
        with pytest.raises(ExportError, match="not a plain file name|has no bottom.pte.unlisted"):  # names at load, a program at use
            ExportBundle.load(bundle).file(ExportBundle.load(bundle, check=False).manifest.programs.inference.file)
        if edit is rename_layout_key:
            with pytest.raises(DeviceClientError, match="not a plain file name"):
                _ = DeviceClient(bundle, runner).trained_names
    assert not [p for p in tmp_path.rglob("PWNED*")]
    assert not (deep / "out").exists() or not any((deep / "out").iterdir())


# --- bounded by the input's size ------------------------------------------------------------------


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny valid PNG (1 x 1) whose IHDR claims width x height, its CRC made consistent."""
    from PIL import Image

    Image.new("RGB", (1, 1)).save(path)
    blob = bytearray(path.read_bytes())
    at = blob.index(b"IHDR")
    blob[at + 4 : at + 12] = struct.pack(">II", width, height)
    blob[at + 17 : at + 21] = struct.pack(">I", zlib.crc32(bytes(blob[at : at + 17])))
    path.write_bytes(bytes(blob))
    return path


def _jpeg_claiming(path: Path, width: int, height: int) -> Path:
    """A small JPEG whose frame header (SOF0) claims width x height."""
    from PIL import Image

    Image.new("RGB", (8, 8)).save(path, quality=90)
    blob = bytearray(path.read_bytes())
    at = blob.index(b"\xff\xc0")
    blob[at + 5 : at + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(blob))
    return path


def test_images_too_large_are_refused_from_their_header_naming_the_file(runner, tmp_path, training_bundle, data):
    from PIL import Image

    folder = tmp_path / "big"
    folder.mkdir()
    wide = folder / "wide.png"
    Image.new("RGB", (170000, 1), (90, 10, 10)).save(wide)  # 1 x 170000 pixels in a few hundred bytes
    long_jpeg = folder / "long.jpg"
    Image.new("RGB", (65000, 1), (90, 10, 10)).save(long_jpeg)  # decodable, but resized to a short side of 73: 4745000 x 73
    claims = [
        wide,
        long_jpeg,
        _png_claiming(folder / "claims.png", 9000, 9000),  # 81 M pixels > 2^26
        _jpeg_claiming(folder / "claims.jpg", 9000, 9000),
    ]
    for path in claims:
        r = run(runner, "classify", str(training_bundle), str(path))
        warning, error = r.stderr.strip().splitlines()
        assert r.returncode == 2 and "none of the images could be read" in error, r.stderr
        assert f"skipping {path}: image too large" in warning or ("image too large" in warning and str(path) in warning), r.stderr
    # in a training folder: skipped with a warning, as an undecodable file is
    train = tmp_path / "train"
    shutil.copytree(data, train)
    shutil.copy(wide, train / "red" / "wide.png")
    r = _finetune(runner, training_bundle, train, tmp_path / "state", "--epochs", "1")
    assert r.returncode == 0, r.stderr
    assert (
        [line for line in r.stderr.splitlines() if "warning" in line]
        == [line for line in r.stderr.splitlines() if "wide.png" in line and "image too large" in line]
        != []
    )


@pytest.mark.parametrize(
    "option, value",
    [("--epochs", "4294967297"), ("--threads", "4294967297"), ("--feature-budget", "9223372036854775807"),
     ("--batch-size", "4294967300")],
)  # fmt: skip
def test_numeric_options_out_of_range_fail_with_one_line(runner, tmp_path, training_bundle, data, option, value):
    r = _finetune(runner, training_bundle, data, tmp_path / "state", option, value)
    _one_line_error(r, option, value)
    assert not (tmp_path / "state" / "state.json").exists()


# --- .npy header ----------------------------------------------------------------------------------


def _npy_with_header(path: Path, header: str, data: bytes) -> Path:
    text = header.encode("latin1")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + data)
    return path


def test_a_npy_header_is_read_as_numpy_reads_it(runner, tmp_path, training_bundle):
    layout = json.loads((training_bundle / "manifest.json").read_text())["programs"]["training"]["weights_layout"]
    counter = next(n for n, s in layout.items() if s["dtype"] == "int64" and s["shape"] == [])
    cases = {
        # numpy reads a one-field structured dtype of objects; the text of a 'descr' key is inside the field's name
        "object": "{\"descr\": [(\"'descr': '<i8'\", '|O')], 'fortran_order': False, 'shape': (), }",
        "object2": "{'descr': '|O', 'fortran_order': False, 'shape': (), }",
        "extra": "{'descr': '<i8', 'fortran_order': False, 'shape': (), 'descr2': '<i8', }",
        "twice": "{'descr': '|O', 'descr': '<i8', 'fortran_order': False, 'shape': (), }",
    }
    for what, header in cases.items():
        folder = tmp_path / what
        folder.mkdir()
        path = _npy_with_header(folder / f"{counter}.npy", header, np.int64(3).tobytes())
        if what in ("object", "object2"):  # numpy itself: an object array, never read without pickles
            with pytest.raises(ValueError, match="allow_pickle"):
                np.load(path, allow_pickle=False)
        _one_line_error(run(runner, "import-weights", str(training_bundle), str(folder), "--state", str(folder / "s")), path.name)
        assert not (folder / "s" / "state.json").exists()
    good = tmp_path / "good"
    good.mkdir()
    np.save(good / f"{counter}.npy", np.int64(3))
    r = run(runner, "import-weights", str(training_bundle), str(good), "--state", str(good / "s"))
    assert r.returncode == 0, r.stderr


# --- a full disk under the feature cache ----------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root in a container may mount one; skipped where it may not)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode
    ):
        pytest.skip("cannot mount a small tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_under_the_feature_cache_is_one_line_not_a_bus_error(runner, small_disk, training_bundle, tmp_path):
    manifest = json.loads((training_bundle / "manifest.json").read_text())
    per_image = 4 * int(np.prod(manifest["programs"]["training"]["methods"]["forward"]["inputs"][0]["shape"][1:]))
    images = 2 * 256 * 1024 // per_image + 8  # features of twice the disk
    data = make_image_folder(tmp_path / "photos", per_class=images // 3 + 1, size=24, seed=2)
    state = small_disk / "state"
    r = _finetune(runner, training_bundle, data, state, "--epochs", "1", "--feature-budget", "0")
    _one_line_error(r, "feature cache", "No space left")
    assert not (state / ".features.cache").exists()
    assert not (state / "state.json").exists()
