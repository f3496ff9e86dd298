"""``state.json``, the device's training state (written by ``deploy/native/src/state.cpp``), as one
type every Python reader uses: the exporter (``edgetl export --device-weights``) and the fleet's
device client. Torch-free: a device client imports it without PyTorch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetl._typed_json import Misfit, load, optional, schema
from edgetl.errors import EdgetlError

STATE_FILE = "state.json"


@dataclass(frozen=True)
class FeatureSeconds:
    """The feature pass before a process's first epoch: decoding images and running ``bottom.pte``."""

    decode: float
    bottom: float


@dataclass(frozen=True)
class ReplayUse:
    """How an epoch mixed the bundle's replay set into its batches (bundles with one)."""

    #: ``--replay-ratio``: each batch of B holds round(B * ratio) replay rows
    ratio: float
    #: replay rows the epoch trained on
    rows: int


@dataclass(frozen=True)
class EpochRow:
    """One epoch of ``edgetl-device finetune`` (sizes in bytes, times in seconds)."""

    epoch: int
    loss: float
    accuracy: float
    images: int
    peak_rss_bytes: int
    seconds: float
    images_per_s: float
    step_seconds: float
    optimizer_seconds: float
    features_seconds: FeatureSeconds | None = optional()
    val_accuracy: float | None = optional()
    replay: ReplayUse | None = optional()


@dataclass(frozen=True)
class AddedClass:
    """A class the device learned on its own (a spare output), imprinted from ``images`` photos
    after epoch ``epoch``."""

    name: str
    images: int
    epoch: int


@dataclass(frozen=True)
class DeviceState:
    """A state directory's ``state.json``: the bundle it trains (bound by the manifest's seal), the
    model and classes it records for the exporter's check, the last epoch's files and their sha256."""

    epoch: int
    history: list[EpochRow]
    bundle_manifest_sha256: str
    bundle_ptd_sha256: str
    model: str
    #: the bundle's classes, then those the device added (the outputs they took, in order)
    classes: list[str]
    #: the last saved weights (a ``.ptd`` in the directory); None before the first epoch or import
    weights: str | None
    weights_sha256: str | None = optional()
    #: SGD's momentum buffers (float32, the program's parameter order)
    momentum: str | None = optional()
    momentum_sha256: str | None = optional()
    added_classes: list[AddedClass] | None = optional()
    #: AdamW's exp_avg of every parameter, then its exp_avg_sq of every parameter (float32)
    adamw_moments: str | None = optional()
    adamw_moments_sha256: str | None = optional()
    #: the optimizer that trained the saved epochs (``"sgd"`` or ``"adamw"``; absent: SGD) and its steps
    optimizer: str | None = optional()
    optimizer_steps: int | None = optional()


class DeviceStateError(EdgetlError):
    """``state.json`` cannot be read or does not fit :class:`DeviceState` (the message says where)."""


def read_state(path: str | Path) -> DeviceState:
    """``path`` (a ``state.json``, or the state directory holding one) as a :class:`DeviceState`."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DeviceStateError(f"cannot read {path}: {exc}") from None
    try:
        return load(DeviceState, data)
    except Misfit as exc:
        raise DeviceStateError(f"{path} does not fit an edgetl-device state: {exc}") from None


def state_schema() -> dict[str, Any]:
    """The JSON Schema of ``state.json`` (``deploy/schema/state.schema.json`` holds it)."""
    return schema(DeviceState, title="edgetl-device training state (state.json)")
