"""The fleet on Flower's deployment engine: a SuperLink and SuperNodes as separate processes on
loopback, one SuperNode killed mid-round."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("flwr")

from edgetl.fleet.checkpoint import load_round  # noqa: E402
from edgetl.fleet.deployment import LocalFleet  # noqa: E402
from edgetl.fleet.local import build_network  # noqa: E402
from edgetl.fleet.payload import shared_keys, to_arrays  # noqa: E402
from tests.conftest import small_fleet_config  # noqa: E402

pytestmark = pytest.mark.slow


def test_deployment_engine_survives_a_supernode_killed_mid_round(tmp_path, image_folder):
    # the timeout bounds the round: long enough for a ClientApp process to start and train, no more
    config = small_fleet_config(tmp_path, image_folder, min_clients=2, min_replies=1, round_timeout=30.0)
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    with LocalFleet(tmp_path / "fleet", nodes) as fleet:
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(done=fleet.submit(config, timeout=300)))
        runner.start()
        log = tmp_path / "fleet" / "supernode-1.log"
        deadline = time.monotonic() + 240
        while "Start `flwr-clientapp` process" not in log.read_text(errors="replace"):  # it has the round's message
            assert time.monotonic() < deadline and runner.is_alive(), log.read_text()[-2000:]
            time.sleep(0.2)
        fleet.kill_supernode(1)
        t0 = time.monotonic()
        runner.join()
        waited = time.monotonic() - t0
    assert "done" in result
    row = load_round(config.out).history[0]
    # the dead node's reply is missing, or the SuperLink answers for it ("Node Unavailable") once its heartbeats stop
    assert (row["sampled"], row["accepted"], row["applied"]) == (2, 1, True), row
    assert row["replies"] == 1 or "Node Unavailable" in row["rejected"][0], row
    assert waited < config.round_timeout + 30  # bounded by the round's timeout: no stall
    state = load_round(config.out)
    net = build_network(config, num_classes=3, blocks=2)
    initial = to_arrays(net.state_dict(), shared_keys(net))
    assert any(not np.array_equal(state.arrays[k], v) for k, v in initial.items())  # the survivor's round was applied
