"""Rejecting a client's reply before it can touch the global model.

A reply is a mapping of state-dict names to arrays plus a claimed number of training examples.
It is rejected, with one reason, when it carries a name the client may not send (not a shared
tensor: a frozen part, an unknown name, a statistic under FedBN), an array whose shape or kind
differs from the global model's, a NaN or infinity, or a sample count that is not a whole number
in ``1..max_examples`` (a huge count would let one client outweigh the fleet). An empty reply is
rejected too: it would add a weight and nothing to average.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def reply_problem(
    arrays: Mapping[str, np.ndarray], num_examples: object, *, allowed: Mapping[str, tuple[int, ...]], max_examples: int
) -> str | None:
    """Why this reply must not enter the average, or None when it may.

    Args:
        arrays: the reply's tensors by state-dict name.
        num_examples: the reply's claimed training-example count (any type: it came off the wire).
        allowed: the names a client may send and their shapes (the global model's).
        max_examples: the largest plausible count.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, float)) or not math.isfinite(num_examples):
        return f"sample count {num_examples!r} is not a number"
    if num_examples != int(num_examples) or not 1 <= num_examples <= max_examples:
        return f"absurd sample count {num_examples!r} (expected a whole number in 1..{max_examples})"
    if not arrays:
        return "no tensors"
    unknown = sorted(set(arrays) - set(allowed))
    if unknown:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        return f"unknown or frozen key {unknown[0]!r}{more}"
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            return f"{key}: not a floating-point array ({getattr(value, 'dtype', type(value).__name__)})"
        if tuple(value.shape) != tuple(allowed[key]):
            return f"{key}: shape {tuple(value.shape)}, expected {tuple(allowed[key])}"
        if not np.isfinite(value).all():
            return f"{key}: NaN or infinite values"
    return None
