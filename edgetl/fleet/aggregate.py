"""Federated averaging that fits MobileTL: weighted by examples, per key, over the senders of that key.

Clients may train different K, so a tensor of a low block arrives only from the clients that
trained it. Each key's average is renormalised over its own senders: ``new[k] = sum_i n_i x_i[k] /
sum_{i sends k} n_i``; a key nobody sent keeps its global value (a frozen part never changes).
Stock FedAvg would either refuse such replies or dilute a key by clients that never trained it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Reply:
    """One accepted client reply: who sent it, its example count and its tensors by name."""

    node: int
    num_examples: int
    arrays: Mapping[str, np.ndarray]


def fedavg_per_key(global_arrays: Mapping[str, np.ndarray], replies: Sequence[Reply]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The new global tensors and, per key, how many clients contributed.

    Returns a full copy of ``global_arrays`` with each key some reply carries replaced by the
    example-weighted mean over the replies carrying it (accumulated in float64, stored in the
    global tensor's dtype); replies must already be validated (:func:`~edgetl.fleet.validate.reply_problem`).
    """
    sums: dict[str, np.ndarray] = {}
    weights: dict[str, int] = {}
    senders: dict[str, int] = {}
    for reply in replies:
        for key, value in reply.arrays.items():
            contribution = reply.num_examples * np.asarray(value, dtype=np.float64)
            sums[key] = sums[key] + contribution if key in sums else contribution
            weights[key] = weights.get(key, 0) + reply.num_examples
            senders[key] = senders.get(key, 0) + 1
    out = {key: value.copy() for key, value in global_arrays.items()}
    for key, total in sums.items():
        out[key] = (total / weights[key]).astype(global_arrays[key].dtype)
    return out, senders
