"""The device's AdamW step in numpy, element for element ``deploy/native/src/optimizer.cpp``'s, so
the export verifies the rule ``edgetl-device`` runs (ExecuTorch's runtime ships SGD alone).

torch.optim.AdamW's single-tensor step with its scalars computed in double and applied in
float32: ``p *= 1 - lr*wd``; ``m += (1-b1)(g - m)``; ``v = v*b2 + (1-b2) g g``;
``p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)`` (no amsgrad). Weight decay applies to the
parameters named in ``decay`` alone. Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import numpy as np


class AdamW:
    """AdamW over ``params`` (float32 arrays, updated in place), its moments kept here."""

    def __init__(
        self,
        params: Mapping[str, np.ndarray],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        decay: Collection[str],
    ) -> None:
        self.params = dict(params)
        self.lr, self.betas, self.eps, self.weight_decay, self.decay = lr, betas, eps, weight_decay, set(decay)
        self.exp_avg = {k: np.zeros_like(p, dtype=np.float32) for k, p in self.params.items()}
        self.exp_avg_sq = {k: np.zeros_like(p, dtype=np.float32) for k, p in self.params.items()}
        self.steps = 0

    def step(self, grads: Mapping[str, np.ndarray]) -> None:
        b1, b2 = self.betas
        t = self.steps + 1
        f = np.float32
        neg_step = f(-(self.lr / (1.0 - b1**t)))
        bc2_sqrt = f(math.sqrt(1.0 - b2**t))
        one_b1, beta2, one_b2, eps = f(1.0 - b1), f(b2), f(1.0 - b2), f(self.eps)
        for name, p in self.params.items():
            g = np.asarray(grads[name], dtype=np.float32).reshape(p.shape)
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            decay = f(1.0 - self.lr * (self.weight_decay if name in self.decay else 0.0))
            decayed = p * decay
            m[...] = m + one_b1 * (g - m)
            v[...] = v * beta2 + one_b2 * g * g
            p[...] = decayed + neg_step * (m / (np.sqrt(v) / bc2_sqrt + eps))
        self.steps = t
