"""Splitting one labelled dataset over simulated clients: IID or Dirichlet non-IID.

Dirichlet (the usual federated benchmark split): for each class, its examples are shared among the
clients in proportions drawn from ``Dirichlet(alpha, ..., alpha)``; small ``alpha`` gives each client
a few dominant classes, large ``alpha`` approaches IID. Every client gets at least ``min_size``
examples (the draw is repeated, seeded, until it does), so each can fill a training batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgetl.errors import ConfigError

_MAX_DRAWS = 1000


def iid_partition(n: int, clients: int, *, seed: int) -> list[list[int]]:
    """``range(n)`` shuffled (seeded) and cut into ``clients`` shares whose sizes differ by at most one."""
    if clients < 1 or n < clients:
        raise ConfigError(f"cannot split {n} examples over {clients} clients")
    order = np.random.default_rng(seed).permutation(n)
    return [sorted(int(i) for i in share) for share in np.array_split(order, clients)]


def dirichlet_partition(labels: Sequence[int], clients: int, *, alpha: float, seed: int, min_size: int = 2) -> list[list[int]]:
    """Indices of ``labels`` per client, label proportions per class drawn from Dirichlet(``alpha``)."""
    labels = np.asarray(labels)
    if clients < 1 or len(labels) < clients * min_size:
        raise ConfigError(f"cannot split {len(labels)} examples over {clients} clients with at least {min_size} each")
    if alpha <= 0:
        raise ConfigError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    for _ in range(_MAX_DRAWS):
        shares: list[list[int]] = [[] for _ in range(clients)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(idx)).astype(int)[:-1]
            for share, part in zip(shares, np.split(idx, cuts), strict=True):
                share.extend(int(i) for i in part)
        if min(len(s) for s in shares) >= min_size:
            return [sorted(s) for s in shares]
    raise ConfigError(
        f"no Dirichlet(alpha={alpha}) split gives each of {clients} clients {min_size} examples: raise alpha or use fewer clients"
    )
