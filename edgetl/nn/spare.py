"""Spare classes: a classifier with outputs a device assigns to classes it learns on its own.

A :class:`SpareClassLinear` holds the classifier's rows for the known classes and ``spare`` more,
and a 0/1 vector ``active`` (a buffer, so it travels in the weights file): an inactive output's
logit is pushed to :data:`INACTIVE_LOGIT` below any real logit, so its softmax probability is
exactly 0 in float32, it never wins a prediction and its row gets an exactly zero gradient. A
device that meets a new class sets its row (weight imprinting) and its ``active`` entry to 1.

:func:`cross_entropy` is the loss over the active classes: plain cross-entropy (the masked logits
make it so), with label smoothing spread over the active classes only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

#: what an inactive output adds to its logit: exp(-1e9 - max) is 0 in float32 for any real logit
INACTIVE_LOGIT = -1e9


def mask_logits(logits: Tensor, active: Tensor) -> Tensor:
    """``logits`` with the inactive outputs' moved to -1e9 (active ones unchanged: ``x + 0``)."""
    return logits + (active - 1.0) * -INACTIVE_LOGIT


class SpareClassLinear(nn.Linear):
    """``nn.Linear`` with ``spare`` extra outputs, inert until their ``active`` entry is 1.

    Built from the trained classifier ``linear``: its rows first (unchanged), the spare rows zero.
    The state-dict names stay the linear layer's (``weight``, ``bias``) plus ``active``."""

    def __init__(self, linear: nn.Linear, spare: int) -> None:
        if spare < 1:
            raise ValueError(f"spare classes must be >= 1, got {spare}")
        known = linear.out_features
        super().__init__(linear.in_features, known + spare, bias=linear.bias is not None)
        with torch.no_grad():
            self.weight.zero_()[:known] = linear.weight
            if self.bias is not None:
                self.bias.zero_()[:known] = linear.bias
        self.register_buffer("active", torch.cat([torch.ones(known), torch.zeros(spare)]))
        self.known = known

    def forward(self, x: Tensor) -> Tensor:
        return mask_logits(super().forward(x), self.active)


def cross_entropy(logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0, active: Tensor | None = None) -> Tensor:
    """Mean cross-entropy of ``logits`` (masked by ``active`` when given) against ``labels``;
    label smoothing spreads over the active classes (over all without ``active``: ``F.cross_entropy``)."""
    if active is None or label_smoothing == 0.0:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    logp = F.log_softmax(logits, dim=1)
    nll = -logp.gather(1, labels[:, None]).squeeze(1)
    smooth = -(logp * active).sum(1) / active.sum()
    return ((1.0 - label_smoothing) * nll + label_smoothing * smooth).mean()


def spare_head(module: nn.Module) -> tuple[str, SpareClassLinear] | None:
    """The qualified name and the :class:`SpareClassLinear` inside ``module``, or None."""
    return next(((name, m) for name, m in module.named_modules() if isinstance(m, SpareClassLinear)), None)
