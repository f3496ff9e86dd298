"""What travels between server and clients: numpy arrays keyed by state-dict name.

A client trains the top K blocks under MobileTL, so it needs to send only: every trainable
parameter (the blocks' conv weights, the internal norms' shifts, the last norms' scale and shift,
the final conv stage, the classifier) plus the running statistics of the norms that train in
full (each trained block's last norm, the final conv stage's norm), which train-mode batch norm
updates. The internal norms' statistics and scales are frozen (:class:`~edgetl.nn.layers.ShiftOnlyNorm`),
like everything below the top K: never sent, never changed. ``num_batches_tracked`` is not sent
(batch norm with a momentum does not read it).

Arrays cross the wire as ``.npy`` bytes (Flower's ``Array``, read with ``allow_pickle=False``):
nothing a client sends is unpickled.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the wire format is numpy's: a device client reads and writes it without torch
    import torch
    from torch import nn

    from edgetl.train.prepare import TransferModel

STAT_SUFFIXES: tuple[str, ...] = (".running_mean", ".running_var")


@dataclass(frozen=True)
class RoundResult:
    """What a client's round produced (eager or on the device runner): the tensors it trained and its figures."""

    arrays: dict[str, np.ndarray]
    num_examples: int
    train_loss: float
    train_acc: float
    seconds: float
    peak_rss_bytes: int


def is_stat_key(key: str) -> bool:
    """A batch norm's running statistic (FedBN keeps these on the client)."""
    return key.endswith(STAT_SUFFIXES)


def shared_keys(net: TransferModel, *, stats: bool = True) -> list[str]:
    """State-dict names of what a client under ``net``'s policy trains, in state-dict order.

    ``stats``: also the running statistics of the batch norms that train (False under FedBN).
    """
    from torch import nn

    trained = {name for name, _ in net.trainable_parameters()}
    if stats:
        for name, module in net.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and any(p.requires_grad for p in module.parameters(recurse=False)):
                trained.update(f"{name}{suffix}" for suffix in STAT_SUFFIXES)
    return [key for key in net.state_dict() if key in trained]


def to_arrays(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> dict[str, np.ndarray]:
    """``keys`` of ``state`` as numpy arrays (copies: later training does not change them)."""
    return {key: state[key].detach().cpu().numpy().copy() for key in keys}


def load_arrays(net: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy ``arrays`` into ``net``'s parameters and buffers of the same names (shapes checked)."""
    import torch

    state = net.state_dict()
    with torch.no_grad():
        for key, value in arrays.items():
            target = state[key]
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit {tuple(target.shape)}")
            target.copy_(torch.from_numpy(np.asarray(value)).to(target.dtype))
    # ShiftOnlyNorm derives its constants from its buffers when a state dict loads: reload to refresh
    net.load_state_dict(net.state_dict())


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Payload bytes of ``arrays`` (the tensors' data; Flower adds a small header per array)."""
    return int(sum(a.nbytes for a in arrays.values()))
