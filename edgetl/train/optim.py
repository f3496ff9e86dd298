"""Optimizers: the one place that names them, builds them and says how much state they keep."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from edgetl.errors import ConfigError

if TYPE_CHECKING:  # the names are data (a fleet's torch-free device client checks a recipe with them)
    import torch
    from torch import nn

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")


def check_optimizer(name: str) -> None:
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


def state_floats(name: str, *, momentum: float = 0.9) -> int:
    """fp32 state tensors the optimizer keeps per trained parameter (Adam's step counters aside)."""
    check_optimizer(name)
    if name == "sgd":
        return 1 if momentum else 0  # the momentum buffer
    return 2  # exp_avg, exp_avg_sq


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two groups: weights decay, norms and biases (1-D tensors) do not."""
    decay, no_decay = [], []
    for _, p in named:
        (no_decay if p.dim() <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    name: str, named: Iterable[tuple[str, nn.Parameter]], *, lr: float, momentum: float = 0.9, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """``name`` over the trained parameters ``named`` (``TransferModel.trainable_parameters()``)."""
    import torch

    check_optimizer(name)
    groups = param_groups(named, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    return (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)(groups, lr=lr)
