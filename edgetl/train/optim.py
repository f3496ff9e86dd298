"""Optimizers: the one place that names them, builds them and says how much state they keep."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from edgetl.errors import ConfigError

if TYPE_CHECKING:  # the names are data (a fleet's torch-free device client checks a recipe with them)
    import torch
    from torch import nn

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
#: what ``edgetl-device`` trains with (deploy/native/src/optimizer.cpp)
DEVICE_OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")
#: AdamW's moment decays and denominator term (torch.optim.AdamW's defaults), on both sides
ADAMW_BETAS: tuple[float, float] = (0.9, 0.999)
ADAMW_EPS: float = 1e-8


def check_optimizer(name: str) -> None:
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


def state_floats(name: str, *, momentum: float = 0.9) -> int:
    """fp32 state tensors the optimizer keeps per trained parameter (Adam's step counters aside)."""
    check_optimizer(name)
    if name == "sgd":
        return 1 if momentum else 0  # the momentum buffer
    return 2  # exp_avg, exp_avg_sq


def decays(p: torch.Tensor) -> bool:
    """The weight-decay rule, on the workstation and the device alike: conv and linear weights
    (2 or more dimensions) decay, norms and biases (1-D tensors) do not."""
    return p.dim() >= 2


def decayed_names(named: Iterable[tuple[str, nn.Parameter]]) -> list[str]:
    """The names of the parameters :func:`decays` applies to (the bundle's manifest lists them)."""
    return [name for name, p in named if decays(p)]


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two groups: the parameters that :func:`decays` with ``weight_decay``, the rest without."""
    decay, no_decay = [], []
    for _, p in named:
        (decay if decays(p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    name: str,
    named: Iterable[tuple[str, nn.Parameter]],
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = ADAMW_BETAS,
    eps: float = ADAMW_EPS,
) -> torch.optim.Optimizer:
    """``name`` over the trained parameters ``named`` (``TransferModel.trainable_parameters()``)."""
    import torch

    check_optimizer(name)
    groups = param_groups(named, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    return (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)(groups, lr=lr, betas=betas, eps=eps)
