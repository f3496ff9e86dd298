"""The server's global model after each round, written atomically, and resuming from it.

``global.pt`` holds the whole model's state dict (the server keeps the full model; clients only
ever send parts) together with the round it completed and the history, in one file written by
:func:`~edgetl._files.atomic_write`: a crash or ``kill -9`` leaves the previous round's file or
this round's, never half of one. It is read with ``weights_only=True`` (tensors and plain data
only). ``history.json`` is a readable copy of the per-round figures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetl._files import atomic_write_json, load_torch, remove_stale_temporaries, save_torch
from edgetl.errors import RunError

GLOBAL_FILE = "global.pt"
HISTORY_FILE = "history.json"


@dataclass
class RoundState:
    """Where a fleet run stands: the last completed round, the global tensors, the history."""

    round: int
    arrays: dict[str, np.ndarray]
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


def save_round(out: str | os.PathLike, state: RoundState) -> Path:
    """Write ``state`` to ``out/global.pt`` (atomically), then ``out/history.json``."""
    out = Path(out)
    payload = {
        "round": state.round,
        # a copy, not np.ascontiguousarray: that turns 0-d tensors (num_batches_tracked) into shape (1,)
        "model": {k: torch.from_numpy(np.array(v, copy=True, order="C")) for k, v in state.arrays.items()},
        "history": state.history,
        "config": state.config,
    }
    path = save_torch(out / GLOBAL_FILE, payload)
    atomic_write_json(out / HISTORY_FILE, state.history)
    return path


def load_round(out: str | os.PathLike) -> RoundState | None:
    """The last saved round in ``out``, or None when there is none."""
    path = Path(out) / GLOBAL_FILE
    remove_stale_temporaries(path)
    if not path.exists():
        return None
    try:
        payload = load_torch(path)
        return RoundState(
            round=int(payload["round"]),
            arrays={k: v.numpy() for k, v in payload["model"].items()},
            history=list(payload["history"]),
            config=dict(payload["config"]),
        )
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise RunError(f"{path} is not a fleet checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
