"""Weights coming into the exporter: a checkpoint's state dict into its architecture, and the
weights a device trained (a ``.ptd``) over a state dict."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgetl._device_state import DeviceStateError, read_state
from edgetl._files import plain_name
from edgetl.errors import EdgetlError
from edgetl.exporter import _executorch as et
from edgetl.exporter.bundle import sha256_file
from edgetl.exporter.errors import ExportError
from edgetl.models.zoo import MODELS, architecture_mismatch, load_model


def check_architecture(name: str, state: Mapping[str, torch.Tensor], *, source: str = "the model") -> None:
    """Raise :class:`ExportError` unless ``state`` has architecture ``name``'s keys and shapes
    (any classifier size), naming the architecture it looks like instead."""
    try:
        mismatch = architecture_mismatch(name, state)
    except EdgetlError as exc:  # an unknown name
        raise ExportError(str(exc)) from None
    if mismatch is not None:
        others = [n for n in MODELS if n != name and architecture_mismatch(n, state) is None]
        hint = f"; it looks like {others[0]}" if others else ""
        raise ExportError(f"{source} does not hold {name} weights ({mismatch[:300]}){hint}")


def load_weights(name: str, state: Mapping[str, torch.Tensor], num_classes: int, *, source: str = "the model") -> nn.Module:
    """Architecture ``name`` (eval mode) holding ``state``; a clear :class:`ExportError` naming
    the architecture ``state`` looks like when it is another model's."""
    check_architecture(name, state, source=source)
    model = load_model(name, num_classes=num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # keys and shapes fit: a classifier of another size than num_classes
        raise ExportError(f"{source} does not fit {name} with {num_classes} classes: {str(exc).splitlines()[-1].strip()}") from None
    return model.eval()


def apply_device_weights(state: Mapping[str, torch.Tensor], ptd: str | Path) -> dict[str, torch.Tensor]:
    """``state`` with the tensors of a device-written ``.ptd`` (trained parameters, running
    statistics) put in place; names and sizes must match.

    A bundle exported with spare classes has a classifier with more rows than the checkpoint and
    an ``active`` vector: the rows of the active outputs (the checkpoint's classes, then those the
    device added) replace the classifier, which then has one output per active row."""
    path = Path(ptd)
    try:
        tensors = et.read_ptd(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - any read or parse failure is an unreadable file to the user
        raise ExportError(f"cannot read device weights {path}: {exc}") from None
    state = dict(state)
    for mask in [n for n in tensors if n.endswith(".active") and n not in state]:
        active = tensors.pop(mask).reshape(-1)
        used = int(np.count_nonzero(active))
        if not (active[:used] == 1).all() or active[used:].any():
            raise ExportError(f"device weights {path}: the active outputs of {mask} are not its first {used}")
        head = mask.rpartition(".")[0]
        for name in (f"{head}.weight", f"{head}.bias"):
            if name in tensors and name in state:
                rows = tensors[name].reshape(len(active), -1)[:used]
                tensors[name] = rows.reshape((used, *state[name].shape[1:]))
                state[name] = torch.empty(tensors[name].shape, dtype=state[name].dtype)
    for name, value in tensors.items():
        if name not in state:
            raise ExportError(f"device weights {path} hold {name}, which the checkpoint does not have (another model?)")
        if value.size != state[name].numel():
            raise ExportError(f"device weights {path}: {name} has {value.size} values, the checkpoint {state[name].numel()}")
        state[name] = torch.from_numpy(value.copy()).reshape(state[name].shape).to(state[name].dtype)
    return state


def device_weights_file(path: str | Path, *, model_name: str, classes: Sequence[str] | None) -> tuple[Path, list[str] | None]:
    """The ``.ptd`` that ``edgetl export --device-weights PATH`` means, checked against the
    checkpoint, and the device's classes (the checkpoint's, then those the device added; None
    without a ``state.json``).

    ``PATH`` is a state directory of ``edgetl-device finetune --state`` (its last saved weights) or
    a ``.ptd`` file. Where a ``state.json`` is there (the directory's, or beside the file), the
    model and the class list it records (those of the bundle the device trained from) must be the
    checkpoint's: a device trained on other classes, or another network, is refused; the weights
    file it names (a plain name inside the directory) and ``trained.ptd`` must match its
    ``weights_sha256``. A bare ``.ptd`` records neither; :func:`apply_device_weights` then checks
    only that its tensors' names and sizes fit the checkpoint.
    """
    path = Path(path)
    state_dir = path if path.is_dir() else path.parent
    state_file = state_dir / "state.json"
    if path.is_dir() and not state_file.is_file():
        raise ExportError(f"device weights {path} is a directory without state.json (not an edgetl-device --state directory)")
    if not path.exists():
        raise ExportError(f"device weights {path} do not exist")
    if not state_file.is_file():
        return path, None
    try:
        state = read_state(state_file)
    except DeviceStateError as exc:
        raise ExportError(f"{exc} (written by another edgetl-device?): fine-tune again with this edgetl-device") from None
    what = f"device weights {path} (per {state_file})"
    if state.model != model_name:
        raise ExportError(f"{what} were trained for {state.model}, the checkpoint is {model_name}")
    if classes is not None and state.classes[: len(classes)] != list(classes):
        raise ExportError(f"{what} were trained for the classes {state.classes}, the checkpoint has {list(classes)}")
    if path.is_dir():
        name = state.weights
        if name is None:
            raise ExportError(f"{path} holds no trained weights yet (state.json names none): run edgetl-device finetune first")
        path = path / plain_name(name, f"{state_file}: weights", ExportError)
        if not path.is_file():
            raise ExportError(f"{state_file} names {path}, which is missing")
    if path.name in (state.weights, "trained.ptd"):  # the weights state.json records (trained.ptd: a link to them)
        recorded = state.weights_sha256
        if recorded is None:
            raise ExportError(f"{state_file} records no weights_sha256 (written by an older edgetl-device): fine-tune again")
        if sha256_file(path) != recorded:
            raise ExportError(f"device weights {path} are damaged (sha256 mismatch with {state_file}); the device keeps no earlier epoch")
    return path, state.classes
