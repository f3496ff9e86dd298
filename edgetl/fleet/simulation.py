"""Flower's simulation engine: N virtual clients on this machine (Ray), one process per worker.

``simulate`` runs the fleet's ServerApp and ClientApp with ``config.clients`` SuperNodes; each
gets ``partition-id`` / ``num-partitions`` from the engine, hence its share of ``config.data``
(:func:`~edgetl.fleet.local.client_data`). ``workers`` ClientApps run at once (Ray actors, each with
one CPU and one math thread: oversubscribing a small machine's cores is slower, not faster).
Its inputs are checked before Ray starts. Ctrl-C stops the server's round loop: the round in
progress is not saved, and the same command continues after the last saved round.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

from edgetl.errors import ConfigError, DataError
from edgetl.fleet.config import FleetConfig


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity, where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def check_simulation(config: FleetConfig, workers: int) -> None:
    """Refuse what would fail only inside Ray's workers: a missing data folder, a worker count
    outside 1..the machine's CPUs."""
    from edgetl.data.folder import FASHION_MNIST

    cpus = usable_cpus()
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= cpus:
        raise ConfigError(f"workers must be in 1..{cpus} (this machine's CPUs), got {workers}")
    for name, folder in (("data", config.data), ("test_data", config.test_data)):
        if folder is not None and folder != FASHION_MNIST and not Path(folder).is_dir():
            raise DataError(f"{name} {folder} is not a directory (an ImageFolder, or '{FASHION_MNIST}')")


def simulate(config: FleetConfig, *, workers: int = 1) -> list[dict[str, Any]]:
    """Run ``config`` on Flower's simulation engine; returns the server's per-round history.

    Ctrl-C raises :class:`KeyboardInterrupt` once the server's loop has stopped: rounds saved
    are complete ones, the interrupted round is not saved."""
    check_simulation(config, workers)
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
    # the ServerApp runs in a thread of Flower's that outlives an interrupted engine: it is told to stop
    # first, so no round is finished and saved without the clients that were just stopped
    stop = threading.Event()

    def interrupted(signum, frame):
        stop.set()
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, interrupted) if main_thread else None
    try:
        run_simulation(server_app(config, stop=stop), client_app, num_supernodes=config.clients, backend_config=backend)
    except KeyboardInterrupt:
        stop.set()
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    state = load_round(config.out)
    return state.history if state is not None else []
