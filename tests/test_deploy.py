"""The device runner (deploy/edgetl_device.py), end to end, in child processes as on a device.

It shares the MobileNetV2 training bundle exported by tests/test_export.py (:func:`training_bundle`).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetl.exporter import _executorch as et
from edgetl.exporter.cli import apply_device_weights
from tests.conftest import CLASSES, make_image_folder
from tests.test_export import eager_net, training_bundle

RUNNER = Path(__file__).resolve().parents[1] / "deploy" / "edgetl_device.py"
STDLIB = set(sys.stdlib_module_names)


def run(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, str(RUNNER), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("device") / "photos", per_class=8, size=40, seed=5)


@pytest.fixture(scope="module")
def runner_module():
    spec = importlib.util.spec_from_file_location("edgetl_device_under_test", RUNNER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:  # module level only: what importing the file pulls in
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_runner_and_adapter_import_only_stdlib_numpy_pillow():
    bundle = training_bundle()
    for path in (RUNNER, bundle / "et_adapter.py"):
        assert _top_level_imports(path) - STDLIB <= {"numpy", "PIL"}, path


def test_finetune_survives_a_power_cut_resumes_and_classifies_with_its_weights(photos, tmp_path, runner_module):
    bundle = training_bundle()
    state = tmp_path / "state"
    # epoch 1 has 6 steps (24 images, batch 4); the 'power cut' comes 2 steps into epoch 2
    cut = run("finetune", str(bundle), str(photos), "--state", str(state), "--epochs", "3", "--stop-after-steps", "8")
    assert cut.returncode == 137, cut.stderr
    saved = json.loads((state / "state.json").read_text())
    assert saved["epoch"] == 1 and (state / saved["weights"]).is_file()

    done = run("finetune", str(bundle), str(photos), "--state", str(state), "--epochs", "3")
    assert done.returncode == 0, done.stderr
    assert "resuming after epoch 1" in done.stdout
    saved = json.loads((state / "state.json").read_text())
    history = saved["history"]
    print("device epochs:", [(h["epoch"], round(h["loss"], 4), round(h["accuracy"], 3)) for h in history])
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]
    assert sorted(p.name for p in state.iterdir()) == ["state.json", "trained.ptd", "weights-epoch0003.ptd"]

    # the trained weights changed only what the policy trains, and classification uses them
    bundle_manifest = json.loads((bundle / "manifest.json").read_text())
    trained = et.read_ptd((state / "trained.ptd").read_bytes())
    original = et.read_ptd((bundle / "train.ptd").read_bytes())
    assert set(trained) == set(bundle_manifest["programs"]["training"]["weights_layout"])
    assert any(not np.array_equal(trained[k], original[k]) for k in bundle_manifest["programs"]["training"]["trainable_parameters"])
    images = sorted(photos.rglob("*.png"))[::4]
    out = run("classify", str(bundle), *map(str, images), "--trained", str(state), "--top-k", "3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == len(images)
    net = eager_net()
    net.load_state_dict(apply_device_weights(net.state_dict(), state / "trained.ptd"))
    x = torch.from_numpy(np.stack([runner_module.preprocess(p, bundle_manifest["input"]) for p in images]))
    with torch.no_grad():
        probs = torch.softmax(net.eval()(x), 1).numpy()
    for line, p in zip(lines, probs, strict=True):
        name, prob = line.split(": ", 1)[1].split(", ")[0].split()
        assert name == CLASSES[int(p.argmax())] and abs(float(prob) - p.max()) < 2e-3, (line, p)

    plain = run("classify", str(bundle), str(images[0]))
    assert plain.returncode == 0 and plain.stdout.count(":") == 1, plain.stderr


def test_runner_needs_neither_edgetl_nor_torchvision(photos):
    """ExecuTorch's Python bindings load torch's libraries themselves; nothing else of ours or torchvision's."""
    code = (
        "import json, runpy, sys\n"
        "sys.argv = sys.argv[1:]\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
        "mods = sys.modules\n"
        "print(json.dumps({'code': code, 'edgetl': sorted(m for m in mods if m == 'edgetl' or m.startswith('edgetl.')),"
        " 'torchvision': 'torchvision' in mods, 'torch': 'torch' in mods}))\n"
    )
    image = next(photos.rglob("*.png"))
    r = run(str(RUNNER), "classify", str(training_bundle()), str(image), code=code)
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report == {"code": 0, "edgetl": [], "torchvision": False, "torch": True}, r.stderr


def test_runner_reports_missing_executorch():
    code = (
        "import runpy, sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'executorch':\n"
        "            raise ImportError('No module named ' + repr(name))\n"
        "sys.meta_path.insert(0, Hide())\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    r = run(str(RUNNER), "info", str(training_bundle()), code=code)
    assert r.returncode == 2 and "ExecuTorch is not installed" in r.stderr, r.stderr


def test_runner_rejects_a_damaged_bundle_and_unknown_classes(tmp_path, photos):
    damaged = tmp_path / "dist"
    shutil.copytree(training_bundle(), damaged)
    (damaged / "bottom.pte").write_bytes((damaged / "bottom.pte").read_bytes()[:-10])
    r = run("info", str(damaged))
    assert r.returncode == 2 and "damaged" in r.stderr
    other = tmp_path / "photos"
    shutil.copytree(photos, other)
    (other / "red").rename(other / "purple")
    r = run("finetune", str(training_bundle()), str(other), "--state", str(tmp_path / "s"), "--epochs", "1")
    assert r.returncode == 2 and "purple" in r.stderr and not (tmp_path / "s" / "state.json").exists()
