"""The fleet on Flower's simulation engine (Ray, one machine). Its own file: the suite's workers
take files whole, so the two engine tests run side by side."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

from edgetl.fleet.checkpoint import load_round  # noqa: E402
from edgetl.fleet.config import FleetConfig  # noqa: E402
from edgetl.fleet.local import build_network  # noqa: E402
from edgetl.fleet.payload import shared_keys, to_arrays  # noqa: E402
from tests.conftest import small_fleet_config  # noqa: E402

pytestmark = pytest.mark.slow


def _expected_upload(config: FleetConfig) -> int:
    net = build_network(config, num_classes=3, blocks=config.blocks)
    return sum(a.nbytes for a in to_arrays(net.state_dict(), shared_keys(net)).values())


def test_simulation_engine_runs_rounds_over_dirichlet_partitions(tmp_path, image_folder):
    from edgetl.fleet.simulation import simulate

    config = small_fleet_config(tmp_path, image_folder, clients=3, alpha=1.0, fraction=0.5, rounds=2)
    history = simulate(config, workers=2)
    assert [row["round"] for row in history] == [1, 2]
    assert all(row["sampled"] == 2 and row["accepted"] == 2 and row["applied"] for row in history), history  # ceil(0.5 * 3)
    # each client sent exactly the top-K payload, counted from the architecture
    assert {b for row in history for b in row["upload_bytes"]} == {_expected_upload(config)}
    assert load_round(config.out).round == 2
