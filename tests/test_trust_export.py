"""Issue 12, exporter and device side: bad input and faults reproduced by users.

One ``edgetl export --training`` of the shared run (tests/conftest.py ``export_run``) is made per
module, through the command line in a child process as a user runs it; everything else reuses it.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import edgetl
from edgetl.exporter import _executorch as et
from edgetl.exporter import bundle as bundle_mod
from edgetl.exporter.errors import ExportError
from edgetl.exporter.weights import device_weights_file
from tests.conftest import CLASSES, EXPORT_BATCH, EXPORT_LR, EXPORT_MOMENTUM, make_image_folder

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "import sys; from edgetl.cli import main; sys.exit(main(sys.argv[1:]))"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def edgetl_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=ENV, timeout=900, **kw)


def one_error_line(done: subprocess.CompletedProcess, *needles: str, prefix: str = "edgetl: error: ") -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode in (1, 2) and len(lines) == 1, (done.returncode, done.stdout[-2000:], done.stderr[-3000:])
    assert lines[0].startswith(prefix), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def cli_export(export_run, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``edgetl export --training`` of the shared run, in a child process: (bundle, the finished process)."""
    out = tmp_path_factory.mktemp("trust-export") / "dist"
    done = edgetl_cli(
        "export", "--checkpoint", str(export_run), "--out", str(out), "--training",
        "--batch-size", str(EXPORT_BATCH), "--lr", str(EXPORT_LR), "--momentum", str(EXPORT_MOMENTUM),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done


def run_device(binary: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("trust-photos") / "photos", per_class=4, size=40, seed=3)


@pytest.fixture(scope="module")
def device_state(cli_export, runner, photos, tmp_path_factory) -> Path:
    """One epoch of on-device fine-tuning of the bundle: its state directory."""
    state = tmp_path_factory.mktemp("trust-state") / "state"
    done = run_device(runner, "finetune", str(cli_export[0]), str(photos), "--state", str(state), "--epochs", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    return state


def resealed_copy(bundle: Path, dest: Path, edit) -> Path:
    """A copy of ``bundle`` whose manifest ``edit`` changed, sealed again as the exporter seals it
    (another export of the same network: same programs and weights, other classes or optimizer)."""
    shutil.copytree(bundle, dest)
    data = json.loads((dest / "manifest.json").read_text())
    edit(data)
    (dest / "manifest.json").write_bytes(bundle_mod.manifest_bytes(data))
    return dest


# --- 1. weights bound to their classes and model ----------------------------------------------------------


def test_a_state_directory_of_another_bundle_with_the_same_weights_is_refused(cli_export, runner, device_state, photos, tmp_path):
    """1(a): the same run exported with the class list reversed, or another --lr, has the same train.ptd."""
    bundle = cli_export[0]
    assert run_device(runner, "classify", str(bundle), str(photos), "--trained", str(device_state)).returncode == 0
    state = json.loads((device_state / "state.json").read_text())
    assert state["classes"] == list(CLASSES) and state["model"] == "mobilenet_v2"
    assert state["bundle_manifest_sha256"] == json.loads((bundle / "manifest.json").read_text())["manifest_sha256"]

    def reverse_classes(m):
        m["model"]["classes"] = m["model"]["classes"][::-1]

    def other_lr(m):
        m["programs"]["training"]["optimizer"]["lr"] = 0.1

    for edit in (reverse_classes, other_lr):
        other = resealed_copy(bundle, tmp_path / edit.__name__, edit)
        assert run_device(runner, "info", str(other)).returncode == 0  # a valid bundle in itself
        line = one_error_line(
            run_device(runner, "classify", str(other), str(photos), "--trained", str(device_state)), "another bundle", prefix=""
        )
        if edit is reverse_classes:
            assert "classes" in line, line
        resumed = run_device(runner, "finetune", str(other), str(photos), "--state", str(device_state), "--epochs", "2")
        one_error_line(resumed, "another bundle", prefix="")


def test_device_weights_trained_for_other_classes_are_refused_by_export(export_run, device_state, tmp_path):
    """1(b): a checkpoint whose classes are in another order than the bundle the device trained from."""
    run = tmp_path / "run"
    shutil.copytree(export_run, run)
    ckpt = torch.load(run / "model.pt", weights_only=True)
    ckpt["classes"] = ckpt["classes"][::-1]
    torch.save(ckpt, run / "model.pt")
    config = json.loads((run / "config.json").read_text())
    config["classes"] = config["classes"][::-1]
    (run / "config.json").write_text(json.dumps(config))
    for weights in (device_state, device_state / "trained.ptd"):
        done = edgetl_cli("export", "--checkpoint", str(run), "--out", str(tmp_path / "dist"), "--device-weights", str(weights))
        one_error_line(done, "classes", str(list(CLASSES)))
        assert not (tmp_path / "dist").exists()
    # the checks themselves: the matching checkpoint passes, another model fails, a bare .ptd passes (tensors checked later)
    assert device_weights_file(device_state, model_name="mobilenet_v2", classes=list(CLASSES)) == (
        device_state / json.loads((device_state / "state.json").read_text())["weights"],
        list(CLASSES),
    )
    with pytest.raises(ExportError, match="trained for mobilenet_v2"):
        device_weights_file(device_state, model_name="efficientnet_lite0", classes=list(CLASSES))
    bare = tmp_path / "copied.ptd"
    shutil.copy(device_state / "trained.ptd", bare)
    assert device_weights_file(bare, model_name="mobilenet_v2", classes=["x", "y", "z"]) == (bare, None)
    with pytest.raises(ExportError, match="without state.json"):
        device_weights_file(tmp_path, model_name="mobilenet_v2", classes=None)


def test_a_hand_edited_manifest_is_detected(cli_export, runner, photos, tmp_path):
    """1(c): two class names swapped in manifest.json, nothing else changed (its files' hashes all fit)."""
    bundle = tmp_path / "dist"
    shutil.copytree(cli_export[0], bundle)
    edgetl.ExportBundle.load(bundle)
    assert run_device(runner, "info", str(bundle)).returncode == 0
    text = (bundle / "manifest.json").read_text()
    a, b = CLASSES[0], CLASSES[1]
    swapped = text.replace(f'"{a}"', "\0").replace(f'"{b}"', f'"{a}"').replace("\0", f'"{b}"')
    assert swapped != text and json.loads(swapped)["model"]["classes"][:2] == [b, a]
    (bundle / "manifest.json").write_text(swapped)
    with pytest.raises(ExportError, match="manifest.json was modified after export"):
        edgetl.ExportBundle.load(bundle)
    for args in (["info", str(bundle)], ["classify", str(bundle), str(photos)]):
        one_error_line(run_device(runner, *args), "manifest.json was modified after export", prefix="")
    # reformatted or without its checksum: refused as well
    (bundle / "manifest.json").write_text(json.dumps({k: v for k, v in json.loads(text).items() if k != "manifest_sha256"}))
    one_error_line(run_device(runner, "info", str(bundle)), "no manifest_sha256", prefix="")
    with pytest.raises(ExportError, match="no manifest_sha256"):
        edgetl.ExportBundle.load(bundle)


# --- 2. nothing of the user's is deleted; replacing is atomic ---------------------------------------------


def _tiny_bundle(out: Path, payload: bytes, *, overwrite: bool = True) -> None:
    from tests.test_export import _tiny_manifest

    with bundle_mod.BundleWriter(out, overwrite=overwrite) as writer:
        writer.write("a.bin", payload)
        writer.commit(_tiny_manifest())


def test_force_never_deletes_the_users_files(export_run, tmp_path):
    out = tmp_path / "dist"
    _tiny_bundle(out, b"old", overwrite=False)
    (out / "NOTES.txt").write_text("my notes")
    (out / "photos").mkdir()
    (out / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    done = edgetl_cli("export", "--checkpoint", str(export_run), "--out", str(out), "--force")
    one_error_line(done, "NOTES.txt", "photos", "not part of its bundle")
    assert (out / "NOTES.txt").read_text() == "my notes" and (out / "photos" / "cat.jpg").is_file()
    assert edgetl.ExportBundle.load(out).manifest.files["a.bin"].bytes == 3
    with pytest.raises(ExportError, match="not part of its bundle"):
        _tiny_bundle(out, b"new")
    (out / "NOTES.txt").unlink()
    shutil.rmtree(out / "photos")
    _tiny_bundle(out, b"new!")  # only the bundle's own files: replaced
    assert edgetl.ExportBundle.load(out).manifest.files["a.bin"].bytes == 4


def test_force_never_deletes_hidden_files_that_look_like_temporaries(tmp_path):
    """The user's `.a.bin.backup.tmp` inside the bundle and `.dist.notes.tmp` beside it are the user's:
    the exporter's temporaries live only in its own `.partial` directory."""
    out = tmp_path / "dist"
    _tiny_bundle(out, b"old", overwrite=False)
    mine = {out / ".a.bin.backup.tmp": b"backup", out / ".manifest.json.old.tmp": b"old manifest"}
    beside = {tmp_path / ".dist.notes.tmp": b"notes", tmp_path / ".dist.4194999.album.partial" / "2026" / "cat.jpg": b"\xff\xd8"}
    for path, data in {**mine, **beside}.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    with pytest.raises(
        ExportError, match=r"holds files that are not part of its bundle \(\.a\.bin\.backup\.tmp, \.manifest\.json\.old\.tmp\)"
    ):
        _tiny_bundle(out, b"new")
    assert edgetl.ExportBundle.load(out).manifest.files["a.bin"].bytes == 3
    for path in mine:
        path.unlink()
    _tiny_bundle(out, b"new!")  # only the bundle's own files now: replaced
    assert edgetl.ExportBundle.load(out).manifest.files["a.bin"].bytes == 4
    assert {path: path.read_bytes() for path in beside} == beside


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077], ids=["022", "027", "077"])
def test_the_bundle_directory_follows_the_umask_like_its_files(tmp_path, mask):
    old = os.umask(mask)
    try:
        _tiny_bundle(tmp_path / "dist", b"x", overwrite=False)
    finally:
        os.umask(old)
    assert oct(stat.S_IMODE((tmp_path / "dist").stat().st_mode)) == oct(0o777 & ~mask)
    assert oct(stat.S_IMODE((tmp_path / "dist" / "a.bin").stat().st_mode)) == oct(0o666 & ~mask)


_SWAP_CHILD = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from edgetl.exporter import bundle as bundle_mod
from tests.test_export import _tiny_manifest
out = Path({out!r})
real_rename = os.rename
def rename(src, dst, *a, **kw):  # die right after any rename that moved the target away
    real_rename(src, dst, *a, **kw)
    if Path(src) == out:
        os.kill(os.getpid(), signal.SIGKILL)
os.rename = rename if {kill_after_rename} else real_rename
print("ready", flush=True)
i = 0
while True:
    i += 1
    with bundle_mod.BundleWriter(out, overwrite=True) as w:
        w.write("a.bin", b"x" * (i % 50000))
        w.commit(_tiny_manifest())
    if {once}:
        break
"""


def _swap_child(out: Path, *, kill_after_rename: bool, once: bool) -> subprocess.Popen:
    code = _SWAP_CHILD.format(root=str(ROOT), out=str(out), kill_after_rename=kill_after_rename, once=once)
    child = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    return child


def test_replacing_a_bundle_leaves_a_complete_one_in_place_at_every_instant(tmp_path):
    out = tmp_path / "dist"
    _tiny_bundle(out, b"first", overwrite=False)
    # killed right after a rename of the target (the moment between the old code's two renames)
    child = _swap_child(out, kill_after_rename=True, once=True)
    child.wait(timeout=120)
    assert (out / "manifest.json").is_file(), "the target was gone after a kill during the swap"
    edgetl.ExportBundle.load(out)
    # killed at random times while it replaces the bundle over and over; a watcher never sees it absent
    rng = random.Random(0)
    for _ in range(8):
        child = _swap_child(out, kill_after_rename=False, once=False)
        deadline = time.monotonic() + 0.05 + 0.5 * rng.random()
        missing = 0
        while time.monotonic() < deadline:
            missing += not (out / "manifest.json").exists()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        assert missing == 0
        edgetl.ExportBundle.load(out)  # complete: the manifest and every file it lists, hashes matching
    # what the kills left beside the target (hidden .partial directories) goes with the next export
    (tmp_path / ".dist.4194999.q1w2e3.partial").mkdir()  # no such process
    (tmp_path / ".dist.4194999.q1w2e3.partial" / "a.bin").write_bytes(b"x")
    assert len(list(tmp_path.iterdir())) > 1
    _tiny_bundle(out, b"last")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist"]
    assert edgetl.ExportBundle.load(out).manifest.files["a.bin"].bytes == 4


# --- 3. disk and permission faults ------------------------------------------------------------------------


def test_a_full_disk_during_export_is_one_line(export_run, tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: the programs (megabytes) cannot be written."""
    out = tmp_path / "dist"
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, 512 * 1024))  # noqa: E731
    done = edgetl_cli("export", "--checkpoint", str(export_run), "--out", str(out), preexec_fn=limit)
    one_error_line(done, "model.pte")
    assert "Traceback" not in done.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_bad_out_is_found_before_any_work(export_run, tmp_path, monkeypatch, capsys):
    from edgetl.cli import main
    from edgetl.train import run

    def no_work(*a, **kw):
        raise AssertionError("the checkpoint was read before --out was checked")

    monkeypatch.setattr(run, "read_weights", no_work)
    (tmp_path / "file").write_text("x")
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "NOTES.txt").write_text("x")
    # /proc/self stands for a read-only directory: the tests run as root, whom permissions do not stop
    for out, needle in (
        (tmp_path / "file", "not a directory"),
        (tmp_path / "file" / "dist", "is a file"),
        (Path("/proc/self/dist"), "not writable"),
        (user_dir, "other content"),
    ):
        assert main(["export", "--checkpoint", str(export_run), "--out", str(out), "--force"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("edgetl: error: ") and needle in err and len(err.strip().splitlines()) == 1, err


# --- 4. quiet by default, honest progress -----------------------------------------------------------------


def test_a_training_export_prints_edgetls_lines_only(cli_export):
    _, done = cli_export
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.stderr.strip() == "", done.stderr[-3000:]
    assert not [line for line in lines if "warn" in line.lower() or "failed to load" in line.lower()], lines
    assert len(lines) <= 15, "\n".join(lines)
    # each long stage is announced before it starts, its result after
    order = ["lowering model.pte", "model.pte: XNNPACK", "lowering bottom.pte", "bottom.pte: frozen bottom"]
    order += ["exporting the training program"]
    order += ["train.pte + train.ptd:", "device kernels: "]
    order += ["verifying 3 SGD steps", "3 SGD steps, ExecuTorch vs eager", "verified and written", "bundle: "]
    at = [next((i for i, line in enumerate(lines) if stage in line), None) for stage in order]
    assert None not in at and at == sorted(at), list(zip(order, at, strict=True))
    # the device kernels the program needs, and where they came from (the suite builds them)
    kernels = next(line for line in lines if "device kernels: " in line)
    assert "pointwise_grad_weight" in kernels and str(et.load_native_kernels()) in kernels, kernels


_NOISY_CHILD = """
import logging, os, sys, warnings
from edgetl.cli.export import third_party_output
from edgetl.errors import EdgetlError
verbose, fail = sys.argv[1] == "1", sys.argv[2]
with third_party_output(verbose=verbose):
    warnings.warn("a FutureWarning of some library", FutureWarning)
    logging.getLogger("torchao").warning("Failed to load a library")
    os.write(2, b"[cpuinfo_utils.cpp:87] Failed to open midr file\\n")
    print("edgetl's own line", flush=True)
    if fail == "bug":
        raise RuntimeError("a bug")
    if fail == "user":
        raise EdgetlError("a user error")
"""


@pytest.mark.parametrize(
    ("verbose", "fail", "shown"),
    [("0", "no", False), ("1", "no", True), ("0", "bug", True), ("0", "user", False)],
)
def test_third_party_output_is_hidden_unless_verbose_or_a_bug(verbose, fail, shown):
    done = subprocess.run([sys.executable, "-c", _NOISY_CHILD, verbose, fail], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.stdout == "edgetl's own line\n"
    assert ("Failed to open midr file" in done.stderr) == shown, done.stderr
    if verbose == "1":
        assert "FutureWarning" in done.stderr and "Failed to load" in done.stderr
    elif fail != "no":
        assert ("Traceback" in done.stderr) and ("FutureWarning" not in done.stderr)
    else:
        assert done.stderr == ""


def test_replace_dir_without_an_atomic_exchange_still_replaces(tmp_path, monkeypatch):
    """Where renameat2(RENAME_EXCHANGE) is missing, two renames (documented: the target is briefly absent)."""
    target, new = tmp_path / "dist", tmp_path / ".dist.1.x.partial"
    for d, text in ((target, "old"), (new, "new")):
        d.mkdir()
        (d / "manifest.json").write_text(text)
    monkeypatch.setattr(bundle_mod, "_exchange", lambda a, b: False)
    bundle_mod.replace_dir(new, target)
    assert (target / "manifest.json").read_text() == "new" and (new / "manifest.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dist.1.x.partial", "dist"]
    monkeypatch.undo()
    bundle_mod.replace_dir(new, target)  # the atomic exchange swaps them back
    assert (target / "manifest.json").read_text() == "old" and (new / "manifest.json").read_text() == "new"
