"""Flower's simulation engine: N virtual clients on this machine (Ray), one process per worker.

``simulate`` runs the fleet's ServerApp and ClientApp with ``config.clients`` SuperNodes; each
gets ``partition-id`` / ``num-partitions`` from the engine, hence its share of ``config.data``
(:func:`~edgetl.fleet.local.client_data`). ``workers`` ClientApps run at once (Ray actors, each with
one CPU and one math thread: oversubscribing a small machine's cores is slower, not faster).
"""

from __future__ import annotations

import os
from typing import Any

from edgetl.fleet.config import FleetConfig


def simulate(config: FleetConfig, *, workers: int = 1) -> list[dict[str, Any]]:
    """Run ``config`` on Flower's simulation engine; returns the server's per-round history."""
    from flwr.simulation import run_simulation

    from edgetl.fleet.checkpoint import load_round
    from edgetl.fleet.client import app as client_app
    from edgetl.fleet.server import server_app

    # Ray's workers inherit this process's environment, the only channel Flower's Ray backend leaves
    # open (it sets Ray's runtime_env itself): one math thread per worker unless the caller chose
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    backend = {
        "init_args": {"num_cpus": workers, "include_dashboard": False, "logging_level": "warning"},
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    }
    run_simulation(server_app(config), client_app, num_supernodes=config.clients, backend_config=backend)
    state = load_round(config.out)
    return state.history if state is not None else []
