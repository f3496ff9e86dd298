"""The run directory: the one owner of what ``edgetl finetune`` writes and what everyone reads.

::

    runs/NAME/
      config.json     FinetuneConfig.to_dict() and the class names, written when the run starts
      checkpoint.pt   after every epoch: model, optimizer, schedule, epoch, history, config
      metrics.csv     one row an epoch
      model.pt        the final weights: state dict, model name, class names, policy

Every file is written atomically (:mod:`edgetl._files`) and holds only tensors and plain values
(``weights_only=True`` loads it). The exporter, profiler and command line read runs only through
:class:`Run` and :func:`read_weights`.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgetl._files import atomic_write_json, atomic_write_text, load_torch, remove_stale_temporaries, save_torch
from edgetl.errors import ConfigError, RunError
from edgetl.train.config import FinetuneConfig
from edgetl.train.policy import TrainPolicy

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
FINAL_WEIGHTS = "model.pt"
METRICS = "metrics.csv"
#: settings that may differ between a run and its resumption
RESUME_FREE = frozenset({"epochs", "workers", "out"})


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"cannot read {path}: {exc}") from None
    if not isinstance(value, dict):
        raise RunError(f"{path} does not hold a JSON object")
    return value


def _load(path: Path) -> dict[str, Any]:
    try:
        data = load_torch(path)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is an unreadable file to the user
        first = (str(exc).splitlines() or [""])[0]
        raise RunError(f"cannot read {path}: {type(exc).__name__}: {first}") from None
    if not isinstance(data, dict):
        raise RunError(f"{path} does not hold a dictionary of tensors")
    return data


def _as_dict(value: Any) -> dict[str, Any] | None:
    """A policy or config as stored: a dict (or, in runs made before 0.2, a JSON string)."""
    if isinstance(value, str):
        value = json.loads(value)
    return value if isinstance(value, dict) else None


class Run:
    """A run directory of ``edgetl finetune`` (see the module docstring for its files)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def is_run(self) -> bool:
        return (self.path / CONFIG).is_file()

    # --- reading -------------------------------------------------------------------------------

    def saved_values(self) -> dict[str, Any]:
        """``config.json`` as plain values, the class names removed."""
        if not self.is_run():
            raise RunError(f"{self.path} is not an edgetl run directory (no {CONFIG})")
        values = _read_json(self.path / CONFIG)
        values.pop("classes", None)
        return values

    def config(self) -> FinetuneConfig:
        """The run's settings."""
        try:
            return FinetuneConfig.from_dict(self.saved_values())
        except ConfigError as exc:
            raise RunError(f"{self.path / CONFIG}: {exc}") from None

    def classes(self) -> list[str]:
        classes = _read_json(self.path / CONFIG).get("classes")
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise RunError(f"{self.path / CONFIG} holds no list of class names")
        return classes

    def checkpoint(self) -> dict[str, Any] | None:
        """The last end-of-epoch checkpoint, or None before the first epoch ends."""
        path = self.path / CHECKPOINT
        if not path.is_file():
            return None
        state = _load(path)
        state["config"] = _as_dict(state.get("config"))
        return state

    # --- writing (the trainer) -----------------------------------------------------------------

    def start(self, config: FinetuneConfig, classes: list[str], *, resume: bool) -> dict[str, Any] | None:
        """Open the directory for ``config``: new (it must be empty) or, with ``resume``, the run
        it holds (same settings but :data:`RESUME_FREE`, same classes). Writes ``config.json``
        and returns the checkpoint to resume from (None: start at epoch 0)."""
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"--out {self.path} is a file, not a directory")
        state = None
        if resume and self.is_run():
            saved = self.config()  # through the config type: settings added since the run default alike
            diff = [f for f in config.to_dict() if f not in RESUME_FREE and getattr(saved, f) != getattr(config, f)]
            if diff:
                raise RunError(f"cannot resume {self.path}: the run was made with different {', '.join(diff)}")
            before = self.classes()
            if before != classes:
                diff = (("new", set(classes) - set(before)), ("gone", set(before) - set(classes)))
                detail = "; ".join(f"{label}: {', '.join(sorted(names))}" for label, names in diff if names) or "order differs"
                raise RunError(f"cannot resume {self.path}: the data's classes changed ({detail})")
            state = self.checkpoint()
        elif not resume and self.path.exists() and any(self.path.iterdir()):
            raise RunError(f"run directory {self.path} already holds files; pass --resume to continue it or choose another --out")
        for name in (CONFIG, CHECKPOINT, FINAL_WEIGHTS, METRICS):  # what a killed run left half-written
            remove_stale_temporaries(self.path / name)
        atomic_write_json(self.path / CONFIG, {**config.to_dict(), "classes": list(classes)})  # also proves it is writable
        return state

    def save_checkpoint(self, state: dict[str, Any], config: FinetuneConfig) -> None:
        """``state`` (model, optimizer, scheduler, epoch, history) and the config, atomically."""
        save_torch(self.path / CHECKPOINT, {**state, "config": config.to_dict()})

    def write_metrics(self, history: list[dict[str, float]]) -> None:
        if not history:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
        atomic_write_text(self.path / METRICS, buf.getvalue())

    def save_final(self, state_dict: dict[str, torch.Tensor], *, model_name: str, classes: list[str], policy: TrainPolicy) -> Path:
        """The trained weights, loadable with ``edgetl.load_model(name, weights=path)``."""
        return save_torch(
            self.path / FINAL_WEIGHTS,
            {"model": state_dict, "model_name": model_name, "classes": list(classes), "policy": policy.to_dict()},
        )


@dataclass(frozen=True)
class TrainedWeights:
    """What a consumer (export, profile) takes from a run directory or a weights file."""

    model_name: str
    state_dict: dict[str, torch.Tensor]
    classes: list[str] | None
    policy: TrainPolicy | None
    config: FinetuneConfig | None
    source: str

    @property
    def num_classes(self) -> int:
        """Outputs of the classifier (its last 2-D weight)."""
        shapes = [v.shape for k, v in self.state_dict.items() if k.endswith("weight") and isinstance(v, torch.Tensor) and v.dim() == 2]
        if not shapes:
            raise RunError(f"{self.source} holds no classifier weights")
        return int(shapes[-1][0])


def read_weights(path: str | Path, *, model: str | None = None) -> TrainedWeights:
    """Read a run directory (its ``model.pt``, or the last ``checkpoint.pt`` while it is
    unfinished) or a weights file (edgetl's ``model.pt`` / ``checkpoint.pt``, or a plain state
    dict, with ``model`` naming the architecture)."""
    path = Path(path)
    config: FinetuneConfig | None = None
    run: Run | None = None
    if path.is_dir():
        run = Run(path)
        config = run.config()
        weights = path / FINAL_WEIGHTS if (path / FINAL_WEIGHTS).is_file() else path / CHECKPOINT
        if not weights.is_file():
            raise RunError(f"{path} holds no weights ({FINAL_WEIGHTS} or {CHECKPOINT}); has the run finished an epoch?")
    elif path.is_file():
        weights = path
        if Run(path.parent).is_run():
            run = Run(path.parent)
            config = run.config()
    else:
        raise RunError(f"checkpoint {path} does not exist")
    data = _load(weights)
    saved_config = _as_dict(data.get("config"))
    if config is None and saved_config is not None:  # a trainer checkpoint moved out of its run
        config = FinetuneConfig.from_dict(saved_config)
    state = data["model"] if isinstance(data.get("model"), dict) else data
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunError(f"{weights} does not hold a state dict of tensors")
    stored = data.get("model_name") or (config.model if config else None)
    if config is not None and stored != config.model:
        raise RunError(f"checkpoint from another model: {weights} holds {stored} weights but {CONFIG} says {config.model}")
    names = [n for n in (model, stored) if n]
    if not names:
        raise RunError(f"{weights} does not say which architecture it is; pass --model")
    if len(set(names)) > 1:
        raise RunError(f"checkpoint from another model: {weights} holds {stored} weights but --model says {model}")
    policy_dict = _as_dict(data.get("policy"))
    policy = TrainPolicy(**policy_dict) if policy_dict else (config.policy if config else None)
    classes = data.get("classes") or (run.classes() if run else None)
    return TrainedWeights(names[0], state, list(classes) if classes else None, policy, config, str(weights))
