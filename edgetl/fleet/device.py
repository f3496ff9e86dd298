"""A fleet client that trains through the native device runner (``edgetl-device``): no torch.

A Raspberry Pi without PyTorch joins a fleet as a SuperNode whose node config names its bundle:

    flower-supernode ... --node-config 'bundle="/home/pi/fleet-bundle" data="/home/pi/photos" val="/home/pi/val"'

``bundle`` is a training bundle of the fleet's model (``edgetl fleet bundle``: the server's global
model, exported for the device's K and batch). Its K is the bundle's: the workstation plans it
for the device (``edgetl plan --runtime native``) when it exports the bundle. Each round the client
writes the received tensors its bundle trains as ``NAME.npy``, starts a fresh state directory from
them (``edgetl-device import-weights``), trains ``epochs`` epochs (``finetune``), reads the result
back (``export-weights``) and replies with the tensors the server sent that its bundle trains.
The process imports numpy, flwr and this package's torch-free modules only
(``tests/test_native.py`` checks that torch is never loaded).

The optimizer is the bundle's (SGD or AdamW, as it was exported); a fleet whose recipe says ``sgd``
also sets its learning rate. A bundle with spare classes is refused: the server averages each output
over clients, so a class one device added would be averaged with another's. ``epochs`` and ``seed``
come from the recipe; the batch is the bundle's (static shapes). Node config: ``bundle``, ``data``;
optional ``val`` (held-out ``ImageFolder`` for federated evaluation), ``runner`` (path of
``edgetl-device``; default: found on ``PATH``) and ``threads``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from edgetl._device_state import read_state
from edgetl._files import plain_name
from edgetl._rss import peak_rss_bytes
from edgetl.errors import EdgetlError
from edgetl.fleet.payload import RoundResult, is_stat_key

RUNNER = "edgetl-device"
#: batch norm's step counters are in the bundle's weights but never travel (momentum-based running stats ignore them)
_COUNTER_SUFFIX = ".num_batches_tracked"


class DeviceClientError(EdgetlError):
    """The device client cannot take part: a bundle that does not fit the fleet, or a failed runner."""


@dataclass(frozen=True)
class DeviceClient:
    """A device's runner and its bundle (read from the SuperNode's node config by :meth:`from_node`)."""

    bundle: Path
    runner: Path
    threads: int | None = None

    @classmethod
    def from_node(cls, node: Mapping[str, object]) -> DeviceClient:
        """The client a node config describes (``bundle``, optional ``runner`` and ``threads``)."""
        bundle = Path(str(node["bundle"]))
        if not (bundle / "manifest.json").is_file():
            raise DeviceClientError(f"node config bundle={bundle}: no manifest.json there (write one with 'edgetl fleet bundle')")
        runner = str(node.get("runner") or "") or shutil.which(RUNNER)
        if not runner or not os.access(runner, os.X_OK):
            where = f"node config runner={node.get('runner')!r}"
            raise DeviceClientError(f"no runnable {RUNNER} ({where}; build it with deploy/native/build.sh)")
        threads = node.get("threads")
        return cls(bundle, Path(runner), int(threads) if threads else None)

    @cached_property
    def manifest(self) -> dict:
        """The bundle's manifest, read once (a round consults it several times)."""
        return json.loads((self.bundle / "manifest.json").read_text())

    @cached_property
    def trained_names(self) -> list[str]:
        """State-dict names of what the bundle's training program trains (parameters, running statistics)."""
        layout = self.manifest["programs"].get("training", {}).get("weights_layout")
        if not layout:
            raise DeviceClientError(f"{self.bundle} has no training program (export it with --training)")
        # each becomes a file name NAME.npy: a manifest cannot name a path outside the round's directory
        names = [plain_name(name, f"{self.bundle / 'manifest.json'}: weights_layout", DeviceClientError) for name in layout]
        return sorted(name for name in names if not name.endswith(_COUNTER_SUFFIX))

    def check_fits(
        self, *, model: str, method: str, image_size: int, classes: list[str], offered: Mapping[str, np.ndarray], fedbn: bool = False
    ) -> None:
        """Raise :class:`DeviceClientError` unless this bundle trains a subset of what the fleet sends
        (under FedBN the norms' statistics are the device's own and never sent)."""
        m = self.manifest
        got = {
            "model": (m["model"]["name"], model),
            "method": (m["model"]["policy"]["method"], method),
            "image size": (m["input"]["image_size"], image_size),
            "classes": (list(m["model"]["classes"]), list(classes)),
        }
        for what, (bundle_value, fleet_value) in got.items():
            if bundle_value != fleet_value:
                hint = "export it with 'edgetl fleet bundle'"
                raise DeviceClientError(f"the bundle {self.bundle} has {what} {bundle_value}, the fleet {fleet_value}: {hint}")
        if m["programs"].get("training", {}).get("spare_classes"):
            # the server averages per key: a class one device added would be averaged with another
            # device's unrelated class in the same output, so local classes stay off the fleet
            raise DeviceClientError(
                f"the bundle {self.bundle} has spare classes (device-added classes cannot join the fleet's average): "
                "export it with 'edgetl fleet bundle'"
            )
        missing = [name for name in self.trained_names if name not in offered and not (fedbn and is_stat_key(name))]
        if missing:
            raise DeviceClientError(
                f"the bundle trains {len(missing)} tensor(s) the fleet does not share (e.g. {missing[0]}): its K "
                f"({m['model']['policy']['blocks']}) is above the fleet's blocks"
            )

    def run(self, *args: str | os.PathLike, timeout: float | None = None) -> str:
        """Run ``edgetl-device ARGS``; its stdout. A failure raises with the runner's own error line."""
        argv = [str(self.runner), *(["--threads", str(self.threads)] if self.threads else []), *map(str, args)]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise DeviceClientError(f"{RUNNER} {args[0]} did not finish within {timeout:.0f}s") from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            raise DeviceClientError(lines[-1] if lines else f"{RUNNER} {args[0]} exited with status {done.returncode}")
        return done.stdout

    def start_state(self, arrays: Mapping[str, np.ndarray], workdir: Path) -> Path:
        """A fresh state directory in ``workdir`` whose weights are the bundle's with ``arrays`` over them
        (the names the bundle trains; others are ignored)."""
        npy = workdir / "in"
        npy.mkdir()
        for name in (n for n in self.trained_names if n in arrays):
            np.save(npy / f"{name}.npy", np.ascontiguousarray(arrays[name], dtype=np.float32), allow_pickle=False)
        state = workdir / "state"
        self.run("import-weights", self.bundle, npy, "--state", state)
        return state

    def read_weights(self, state: Path, workdir: Path) -> dict[str, np.ndarray]:
        """The state directory's weights, by name (counters left out)."""
        out = workdir / "out"
        self.run("export-weights", self.bundle, state, "--out", out)
        return {name: np.load(out / f"{name}.npy", allow_pickle=False) for name in self.trained_names}

    def train(
        self, arrays: Mapping[str, np.ndarray], data: str, *, epochs: int, seed: int, lr: float | None, timeout: float
    ) -> RoundResult:
        """One round: train ``epochs`` epochs from ``arrays`` on ``data``; the trained tensors and figures."""
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="edgetl-round-") as tmp:
            work = Path(tmp)
            state = self.start_state(arrays, work)
            args = ["finetune", self.bundle, data, "--state", state, "--epochs", str(epochs), "--seed", str(seed)]
            self.run(*args, *(["--lr", repr(lr)] if lr is not None else []), timeout=timeout)
            trained = self.read_weights(state, work)
            last = read_state(state).history[-1]
        bad = [name for name, value in trained.items() if not np.isfinite(value).all()]
        if bad:
            raise DeviceClientError(f"local training diverged: non-finite weights in {bad[0]}")
        return RoundResult(
            arrays=trained,
            num_examples=last.images,
            train_loss=last.loss,
            train_acc=last.accuracy,
            seconds=time.perf_counter() - t0,
            # the device held both at once: this ClientApp process and the runner (its own VmHWM,
            # recorded per epoch; the kernel's child rusage would count the parent's pages at exec)
            peak_rss_bytes=peak_rss_bytes() + last.peak_rss_bytes,
        )

    def evaluate(self, arrays: Mapping[str, np.ndarray], val: str) -> tuple[float, float, int]:
        """Mean cross-entropy, accuracy and image count of ``arrays`` on ``val`` (one subfolder per class)."""
        classes = list(self.manifest["model"]["classes"])
        with tempfile.TemporaryDirectory(prefix="edgetl-eval-") as tmp:
            state = self.start_state(arrays, Path(tmp))
            lines = self.run("classify", self.bundle, val, "--trained", state, "--json", "--top-k", str(len(classes))).splitlines()
        loss, correct = 0.0, 0
        for line in lines:
            row = json.loads(line)
            label = Path(row["path"]).relative_to(val).parts[0]
            if label not in classes:
                raise DeviceClientError(f"{Path(val) / label} is not one of the bundle's classes ({', '.join(classes)})")
            probs = {entry["label"]: float(entry["prob"]) for entry in row["top"]}
            loss -= math.log(max(probs[label], 1e-12))
            correct += row["top"][0]["label"] == label
        if not lines:
            raise DeviceClientError(f"no readable images in {val}")
        return loss / len(lines), correct / len(lines), len(lines)
