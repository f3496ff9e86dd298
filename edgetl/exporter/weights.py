"""Weights coming into the exporter: a checkpoint's state dict into its architecture, and the
weights a device trained (a ``.ptd``) over a state dict."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from edgetl.errors import EdgetlError
from edgetl.exporter import _executorch as et
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
    statistics) put in place; names and sizes must match."""
    path = Path(ptd)
    try:
        tensors = et.read_ptd(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - any read or parse failure is an unreadable file to the user
        raise ExportError(f"cannot read device weights {path}: {exc}") from None
    state = dict(state)
    for name, value in tensors.items():
        if name not in state:
            raise ExportError(f"device weights {path} hold {name}, which the checkpoint does not have (another model?)")
        if value.size != state[name].numel():
            raise ExportError(f"device weights {path}: {name} has {value.size} values, the checkpoint {state[name].numel()}")
        state[name] = torch.from_numpy(value.copy()).reshape(state[name].shape).to(state[name].dtype)
    return state
