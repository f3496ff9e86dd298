"""One training step, in the order every caller shares: the trainer, the profiler's child process
and the step timeline measure the same thing.

The order matters for memory: gradients are freed right after the optimizer step (not just before
the next backward), so they are never alive during a forward pass or an evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn

from edgetl.train.prepare import TransferModel

Phase = Callable[[str], AbstractContextManager]


def _no_phase(_name: str) -> AbstractContextManager:
    return nullcontext()


def train_step(
    model: TransferModel,
    x: Tensor,
    y: Tensor,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    from_features: bool = False,
    phase: Phase = _no_phase,
) -> tuple[Tensor, Tensor]:
    """Forward, backward and update on one batch; returns the (detached) loss and logits.

    ``from_features``: ``x`` is already the frozen bottom's output (the feature cache). ``phase``
    wraps each part (``"bottom forward"``, ``"top forward"``, ``"backward"``, ``"optimizer step"``)
    for the timeline. A non-finite loss updates nothing: the caller decides what to do with it.
    """
    with phase("bottom forward"):
        features = x if from_features else model.forward_bottom(x)
    with phase("top forward"):
        logits = model.forward_top(features)
        loss = loss_fn(logits, y)
    del features
    if not torch.isfinite(loss):
        return loss.detach(), logits.detach()
    with phase("backward"):
        loss.backward()
    with phase("optimizer step"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), logits.detach()
