"""The run directory: the one owner of what ``edgetl finetune`` writes and what everyone reads.

::

    runs/NAME/
      config.json         FinetuneConfig.to_dict() and the class names, written when the run starts
      checkpoint.pt       after every epoch: model, optimizer, schedule, epoch, history, config
      checkpoint.prev.pt  the epoch before: what a resume falls back to when checkpoint.pt is damaged
      metrics.csv         one row an epoch
      model.pt            the final weights: state dict, model name, class names, policy
      sha256.json         the sha256 of each weights file above (two while one is being replaced)
      .edgetl.lock        the writer's lock and pid (``edgetl._files.lock_directory``)

Every file is written atomically (:mod:`edgetl._files`) and holds only tensors and plain values
(``weights_only=True`` loads it). The exporter, profiler and command line read runs only through
:class:`Run` and :func:`read_weights`.

One writer: :meth:`Run.start` locks the directory until :meth:`Run.release` (the trainer holds it
for the whole run; the kernel drops it when the process dies), so a second ``--resume`` of the same
run is refused with the first one's pid. Readers take no lock: ``edgetl export`` and ``profile``
read a run while it trains (every file is replaced atomically, and checked against its digest), and
what they write into it (``RUN/bundle``, ``RUN/memory.json``) is none of the trainer's files.

Integrity: a weights file is read only when its bytes match the sha256 recorded for it in
``sha256.json``; otherwise it is one :class:`~edgetl.errors.RunError` line naming the file. A
resume whose ``checkpoint.pt`` is damaged or missing continues from ``checkpoint.prev.pt`` (the
epoch before, itself checked), saying so; without a good one it is refused. A directory without
``sha256.json`` (a run assembled by hand) is read unchecked.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgetl._files import (
    LOCK_FILE,
    atomic_write_json,
    atomic_write_text,
    load_torch,
    lock_directory,
    remove_stale_temporaries,
    save_torch,
    sha256_bytes,
    sha256_file,
    unlock_directory,
)
from edgetl.errors import ConfigError, RunError
from edgetl.train.config import FinetuneConfig
from edgetl.train.policy import TrainPolicy

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
FINAL_WEIGHTS = "model.pt"
METRICS = "metrics.csv"
DIGESTS = "sha256.json"
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


def _load(path: Path | io.BytesIO, name: Path | None = None) -> dict[str, Any]:
    path_name = name or path
    try:
        data = load_torch(path)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is an unreadable file to the user
        first = (str(exc).splitlines() or [""])[0]
        raise RunError(f"cannot read {path_name}: {type(exc).__name__}: {first}") from None
    if not isinstance(data, dict):
        raise RunError(f"{path_name} does not hold a dictionary of tensors")
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
        self._lock: int | None = None
        self._checkpoint_good = False  # checkpoint.pt on disk is the one sha256.json records

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Drop the directory lock :meth:`start` took (nothing when it holds none)."""
        if self._lock is not None:
            unlock_directory(self._lock)
            self._lock = None

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

    def digests(self) -> dict[str, list[str]] | None:
        """``sha256.json``: file name -> the sha256 digests its bytes may have (one; two while it is
        being replaced); None without the file."""
        path = self.path / DIGESTS
        if not path.is_file():
            return None
        values = {k: [v] if isinstance(v, str) else v for k, v in _read_json(path).items()}
        if not all(isinstance(v, list) and v and all(isinstance(d, str) for d in v) for v in values.values()):
            raise RunError(f"{path} does not map file names to sha256 digests")
        return values

    def read(self, name: str) -> dict[str, Any]:
        """Weights file ``name`` of the run, its bytes checked against ``sha256.json`` first."""
        path = self.path / name
        for attempt in range(3):
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise RunError(f"cannot read {path}: {exc.strerror}") from None
            digests = self.digests()
            if digests is None:
                break
            if name not in digests:
                raise RunError(
                    f"{path} has no sha256 in {self.path / DIGESTS} (interrupted while saving it?); resume the run to rewrite it"
                )
            if sha256_bytes(data) in digests[name]:
                break
            if attempt < 2:  # a writer may be between the file and its digest: read both again
                time.sleep(0.2)
        else:
            raise RunError(f"{path} does not match its sha256 in {self.path / DIGESTS}: the file changed after edgetl wrote it")
        return _load(io.BytesIO(data), path)

    def checkpoint(self, *, fallback: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any] | None:
        """The last end-of-epoch checkpoint, or None before the first epoch ends.

        With ``fallback``, a damaged or missing ``checkpoint.pt`` gives way to ``checkpoint.prev.pt``
        (the epoch before, checked too), with a line to ``log``; without it, the damage is an error.
        """
        recorded = (self.digests() or {}).get(CHECKPOINT)
        try:
            if not (self.path / CHECKPOINT).is_file():
                if recorded is None:
                    return None
                raise RunError(f"{self.path / CHECKPOINT} is missing (it is recorded in {self.path / DIGESTS})")
            state = self.read(CHECKPOINT)
            self._checkpoint_good = True
        except RunError as exc:
            if not fallback or not (self.path / PREVIOUS_CHECKPOINT).is_file():
                raise
            try:
                state = self.read(PREVIOUS_CHECKPOINT)
            except RunError:
                raise exc from None
            if log is not None:
                log(f"warning: {exc}; using {PREVIOUS_CHECKPOINT} (epoch {state.get('epoch')}) instead")
        state["config"] = _as_dict(state.get("config"))
        return state

    # --- writing (the trainer) -----------------------------------------------------------------

    def start(
        self, config: FinetuneConfig, classes: list[str], *, resume: bool, log: Callable[[str], None] | None = None
    ) -> dict[str, Any] | None:
        """Lock the directory (until :meth:`release`) and open it for ``config``: new (it must be
        empty) or, with ``resume``, the run it holds (same settings but :data:`RESUME_FREE`, same
        classes). Writes ``config.json`` and returns the checkpoint to resume from (None: start at
        epoch 0). A resume never starts a finished run (``model.pt``) over, nor one whose recorded
        checkpoints are all damaged or missing."""
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"--out {self.path} is a file, not a directory")
        created = not self.path.exists()
        if not resume:
            self._refuse_other_files()  # before locking: a refused directory is left without a lock file
        if self._lock is None:
            self._lock = lock_directory(self.path)
        try:
            return self._start(config, classes, resume=resume, log=log)
        except BaseException:
            self.release()
            if created:  # leave nothing behind where nothing was
                (self.path / LOCK_FILE).unlink(missing_ok=True)
                if not any(self.path.iterdir()):
                    self.path.rmdir()
            raise

    def _start(self, config: FinetuneConfig, classes: list[str], *, resume: bool, log) -> dict[str, Any] | None:
        state = None
        self._settle_digests()
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
            if not (self.path / CHECKPOINT).is_file() and (self.path / FINAL_WEIGHTS).is_file():
                raise RunError(
                    f"cannot resume {self.path}: it holds a finished {FINAL_WEIGHTS} but no {CHECKPOINT} to continue from; "
                    "starting over would overwrite it, so choose another --out"
                )
            state = self.checkpoint(fallback=True, log=log)
            done = int(state.get("epoch", 0)) if state else 0
            if done > config.epochs:  # config.json would then disagree with the weights and metrics
                raise RunError(f"cannot resume {self.path} for {config.epochs} epoch(s): it has trained {done} already")
        elif not resume:
            self._refuse_other_files()  # again, now that no other writer can add any
        for name in (CONFIG, CHECKPOINT, PREVIOUS_CHECKPOINT, FINAL_WEIGHTS, METRICS, DIGESTS):  # what a killed run left half-written
            remove_stale_temporaries(self.path / name)
        atomic_write_json(self.path / CONFIG, {**config.to_dict(), "classes": list(classes)})  # also proves it is writable
        return state

    def _settle_digests(self) -> None:
        """A writer killed while it replaced a file left two digests for it: keep the one of the
        file on disk (a damaged file keeps both, and fails its check)."""
        for name, digests in (self.digests() or {}).items():
            if len(digests) > 1 and (self.path / name).is_file():
                actual = sha256_file(self.path / name)
                if actual in digests:
                    self._record(name, [actual])

    def _refuse_other_files(self) -> None:
        if self.path.is_dir() and any(p.name != LOCK_FILE for p in self.path.iterdir()):
            raise RunError(f"run directory {self.path} already holds files; pass --resume to continue it or choose another --out")

    def save_checkpoint(self, state: dict[str, Any], config: FinetuneConfig) -> None:
        """``state`` (model, optimizer, scheduler, epoch, history) and the config, atomically; the
        checkpoint it replaces becomes ``checkpoint.prev.pt`` when it was intact."""
        current = (self.digests() or {}).get(CHECKPOINT, [])
        if self._checkpoint_good and len(current) == 1:
            self._keep_as_previous(current[0])
        self._save(CHECKPOINT, {**state, "config": config.to_dict()})
        self._checkpoint_good = True

    def _keep_as_previous(self, digest: str) -> None:
        """``checkpoint.pt`` also as ``checkpoint.prev.pt`` (a hard link, a copy where the file
        system has none), recorded first: at every instant each file on disk has its digest."""
        self._record(PREVIOUS_CHECKPOINT, [digest])
        source, tmp = self.path / CHECKPOINT, self.path / f".{PREVIOUS_CHECKPOINT}.link.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, self.path / PREVIOUS_CHECKPOINT)

    def _save(self, name: str, obj: dict[str, Any]) -> Path:
        """Write weights file ``name`` with its sha256 in ``sha256.json``: while the new file
        replaces the old one, both digests are recorded, so a reader (or a resume after a crash)
        finds whichever is on disk recorded."""
        old = [d for d in (self.digests() or {}).get(name, []) if (self.path / name).is_file()][:1]
        new: list[str] = []

        def record(tmp: Path) -> None:
            new.append(sha256_file(tmp))
            self._record(name, old + new)

        path = save_torch(self.path / name, obj, before_replace=record)
        self._record(name, new)
        return path

    def _record(self, name: str, digests: list[str]) -> None:
        values = {**(self.digests() or {}), name: digests}
        atomic_write_json(self.path / DIGESTS, {k: v[0] if len(v) == 1 else v for k, v in values.items()})

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
        return self._save(
            FINAL_WEIGHTS, {"model": state_dict, "model_name": model_name, "classes": list(classes), "policy": policy.to_dict()}
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
    data = (
        run.read(weights.name) if run is not None and weights.name in (CHECKPOINT, PREVIOUS_CHECKPOINT, FINAL_WEIGHTS) else _load(weights)
    )
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
