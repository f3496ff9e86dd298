"""One schema per file the workstation and the device exchange (deploy/schema/): what the Python
writer writes fits it, the C++ reader refuses what does not (one line each), one Python type reads
``state.json``, and the manifest's seal hashes a canonical form that reindenting cannot break."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from edgetl._device_state import DeviceState, DeviceStateError, read_state
from edgetl._files import sha256_bytes
from edgetl.exporter.bundle import ExportBundle, manifest_bytes
from edgetl.exporter.errors import ExportError
from edgetl.exporter.manifest import FORMAT
from tests.conftest import make_image_folder
from tests.test_native import _one_line_error, run

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "deploy" / "schema"


def _schema(name: str) -> dict:
    return json.loads((SCHEMA / name).read_text())


def test_the_schema_files_are_the_types_that_write_them():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "schemas.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # the format name is stated by the Python type and read by the runner: the same string
    assert _schema("manifest.schema.json")["properties"]["format"] == {"const": FORMAT}
    assert f'kFormat = "{FORMAT}"' in (ROOT / "deploy/native/src/bundle.cpp").read_text()


def test_the_exporters_manifest_fits_its_schema(training_bundle):
    manifest = json.loads((training_bundle / "manifest.json").read_text())
    jsonschema.validate(manifest, _schema("manifest.schema.json"))
    for edit in (lambda m: m["model"].pop("classes"), lambda m: m["input"].update(image_size="64"), lambda m: m.update(format="x")):
        broken = copy.deepcopy(manifest)
        edit(broken)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, _schema("manifest.schema.json"))


@pytest.fixture(scope="module")
def trained(runner, training_bundle, tmp_path_factory) -> Path:
    """A state directory after one epoch."""
    data = make_image_folder(tmp_path_factory.mktemp("schema") / "photos", per_class=4, size=40, seed=7)
    state = tmp_path_factory.mktemp("schema-state") / "state"
    r = run(runner, "finetune", str(training_bundle), str(data), "--state", str(state), "--epochs", "1")
    assert r.returncode == 0, r.stderr
    return state


def test_the_devices_state_fits_its_schema_and_reads_as_one_type(trained, training_bundle):
    raw = json.loads((trained / "state.json").read_text())
    jsonschema.validate(raw, _schema("state.schema.json"))
    state = read_state(trained)
    assert isinstance(state, DeviceState) and state.epoch == 1 == len(state.history) == state.history[0].epoch
    assert state.bundle_manifest_sha256 == json.loads((training_bundle / "manifest.json").read_text())["manifest_sha256"]
    assert (state.weights, state.history[0].images, state.history[0].loss) == (
        raw["weights"],
        raw["history"][0]["images"],
        raw["history"][0]["loss"],
    )


#: documents violating state.schema.json: a required key missing, or of the wrong type
STATE_VIOLATIONS = [
    ("history", None, "history"),
    ("model", None, "model"),
    ("classes", None, "classes"),
    ("bundle_ptd_sha256", None, "bundle_ptd_sha256"),
    ("weights", None, "weights"),
    ("epoch", None, "epoch"),
    ("history", {"epoch": 1}, "history"),
    ("model", 3, "model"),
    ("classes", "blue green red", "classes"),
    ("classes", [1, 2, 3], "classes"),
    ("epoch", "1", "epoch"),
    ("weights", 7, "weights"),
]


@pytest.mark.parametrize(("key", "value", "named"), STATE_VIOLATIONS)
def test_a_state_violating_its_schema_is_refused_by_every_reader(runner, training_bundle, trained, tmp_path, key, value, named):
    state = tmp_path / "state"
    shutil.copytree(trained, state)
    (state / ".edgetl.lock").unlink(missing_ok=True)
    raw = json.loads((state / "state.json").read_text())
    if value is None:
        raw.pop(key)
    else:
        raw[key] = value
    (state / "state.json").write_text(json.dumps(raw, indent=2))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(raw, _schema("state.schema.json"))
    with pytest.raises(DeviceStateError, match=re.escape(key)):
        read_state(state)
    _one_line_error(run(runner, "export-weights", str(training_bundle), str(state), "--out", str(tmp_path / "npy")), named)


def _resealed(bundle: Path, to: Path, edit) -> Path:
    shutil.copytree(bundle, to)
    manifest = json.loads((to / "manifest.json").read_text())
    edit(manifest)
    (to / "manifest.json").write_bytes(manifest_bytes(manifest))
    return to


def _delete(*path: str | int):
    def edit(m):
        for key in path[:-1]:
            m = m[key]
        del m[path[-1]]

    return edit


def _set(value, *path: str | int):
    def edit(m):
        for key in path[:-1]:
            m = m[key]
        m[path[-1]] = value

    return edit


#: documents violating manifest.schema.json in a key the runner reads (resealed: the seal holds)
MANIFEST_VIOLATIONS = {
    "no classes": _delete("model", "classes"),
    "classes not names": _set([1, 2, 3], "model", "classes"),
    "no model name": _delete("model", "name"),
    "image size a string": _set("64", "input", "image_size"),
    "no mean": _delete("input", "mean"),
    "no interpolation": _delete("input", "interpolation"),
    "no inference program": _delete("programs", "inference"),
    "batch size a float": _set(4.5, "programs", "training", "batch_size"),
    "no weights layout": _delete("programs", "training", "weights_layout"),
    "no optimizer lr": _delete("programs", "training", "optimizer", "lr"),
    "a file without sha256": _set({"bytes": 1}, "files", "train.pte"),
    "files a list": _set([], "files"),
}


@pytest.mark.parametrize("case", list(MANIFEST_VIOLATIONS))
def test_a_manifest_violating_its_schema_is_refused_with_one_line(runner, training_bundle, tmp_path, case):
    bundle = _resealed(training_bundle, tmp_path / "dist", MANIFEST_VIOLATIONS[case])
    data = json.loads((bundle / "manifest.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, _schema("manifest.schema.json"))
    with pytest.raises(ExportError):
        ExportBundle.load(bundle)
    _one_line_error(run(runner, "info", str(bundle)), "manifest.json")


def _legacy_sealed(data: dict) -> bytes:
    """A manifest sealed as bundles exported before the canonical form: the sha256 of the indented
    file without the seal's line."""
    data = {k: v for k, v in data.items() if k != "manifest_sha256"}
    unsealed = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    return (json.dumps({**data, "manifest_sha256": sha256_bytes(unsealed)}, indent=2, sort_keys=True) + "\n").encode()


def test_the_seal_survives_reindenting_and_older_bundles_are_still_read(runner, training_bundle, tmp_path):
    manifest = json.loads((training_bundle / "manifest.json").read_text())
    layouts = {
        "compact": json.dumps(manifest, separators=(",", ":")),
        "indent 4, keys unsorted": json.dumps(dict(reversed(list(manifest.items()))), indent=4),
        "tabs and CRLF": json.dumps(manifest, indent="\t").replace("\n", "\r\n"),
    }
    for label, text in layouts.items():
        bundle = tmp_path / label.replace(" ", "_").replace(",", "")
        shutil.copytree(training_bundle, bundle)
        (bundle / "manifest.json").write_text(text)
        ExportBundle.load(bundle)
        assert run(runner, "info", str(bundle)).returncode == 0, (label, run(runner, "info", str(bundle)).stderr)
    legacy = tmp_path / "legacy"
    shutil.copytree(training_bundle, legacy)
    (legacy / "manifest.json").write_bytes(_legacy_sealed(manifest))
    assert ExportBundle.load(legacy).manifest.manifest_sha256 != manifest["manifest_sha256"]
    assert run(runner, "info", str(legacy)).returncode == 0
    # a value changed under either seal is refused by both readers
    for name, text in (("new", (training_bundle / "manifest.json").read_text()), ("old", _legacy_sealed(manifest).decode())):
        edited = tmp_path / f"edited-{name}"
        shutil.copytree(training_bundle, edited)
        (edited / "manifest.json").write_text(text.replace('"batch_size": 4', '"batch_size": 2'))
        with pytest.raises(ExportError, match="modified after export"):
            ExportBundle.load(edited)
        _one_line_error(run(runner, "info", str(edited)), "modified after export")
