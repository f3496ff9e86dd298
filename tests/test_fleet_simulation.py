"""The fleet on Flower's simulation engine (Ray, one machine). Its own file: the suite's workers
take files whole, so the two engine tests run side by side."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


# --- bad input, failed runs and Ctrl-C (one line, non-zero exit, no round saved that did not train) ---

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "import sys; from edgetl.cli import main; sys.exit(main())"]


def _simulate_args(data: Path, out: Path, *more: str) -> list[str]:
    return [
        "fleet", "simulate", "--model", "mobilenet_v3_small", "--data", str(data), "--test-data", "none", "--clients", "2",
        "--blocks", "2", "--image-size", "32", "--batch-size", "8", "--out", str(out), "--round-timeout", "30", *more,
    ]  # fmt: skip


def test_fleet_simulate_checks_its_inputs_before_starting_ray(tmp_path, image_folder, capsys):
    from edgetl.cli import main

    for args, needle in (
        # with a readable test set the server starts: only the clients would fail, inside Ray
        (["--data", str(tmp_path / "no" / "such" / "dir"), "--test-data", str(image_folder)], "data "),
        (["--test-data", str(tmp_path / "no" / "such" / "dir")], "test_data "),
        (["--alpha", "inf"], "alpha must be a finite number > 0"),
        (["--alpha", "nan"], "alpha must be a finite number > 0"),
        (["--workers", "0"], "workers must be in 1.."),
        (["--workers", "-1"], "workers must be in 1.."),
        (["--workers", str(10**6)], "workers must be in 1.."),
    ):
        out = tmp_path / "out"
        assert main([*_simulate_args(image_folder, out, "--rounds", "1"), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("edgetl: error: ") and needle in err[0], err
        assert "is not a directory" in err[0] or "workers" in needle or "alpha" in needle, err
        assert not out.exists()  # nothing ran, nothing saved


def test_a_simulation_in_which_no_round_used_a_reply_fails_with_the_reason(tmp_path, image_folder, capsys):
    from edgetl.cli import main

    # two training images cannot be split over two clients: every client fails
    out = tmp_path / "out"
    assert main([*_simulate_args(image_folder, out, "--rounds", "1", "--train-limit", "2")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("edgetl: error: ")]  # Ray logs too
    assert len(errors) == 1 and errors[0].startswith("edgetl: error: no round used any client reply"), errors
    assert "client error: cannot split 2 examples over 2 clients" in errors[0], errors


#: Ray's core worker, shut down under an interrupted simulation, sometimes ends the process itself
#: (status 1) before edgetl's handler runs; an open defect, retried once so the rest is still held
RAY_SHUTDOWN_RACE = "The core worker has already been shutdown"


def test_ctrl_c_stops_fleet_simulate_and_saves_no_round_that_did_not_train(tmp_path, image_folder):
    proc, stderr, out, rounds = _interrupted_simulation(tmp_path / "first", image_folder)
    if proc.returncode == 1 and RAY_SHUTDOWN_RACE in stderr:
        proc, stderr, out, rounds = _interrupted_simulation(tmp_path / "again", image_folder)
    assert proc.returncode == 130, stderr[-2000:]
    assert "edgetl: interrupted (the completed rounds are saved in --out" in stderr and "--resume" not in stderr, stderr[-2000:]
    state = load_round(str(out))
    assert 1 <= state.round < rounds
    assert all(row["accepted"] == 2 for row in state.history), state.history  # every saved round trained


def _interrupted_simulation(tmp_path, image_folder):
    tmp_path.mkdir(parents=True, exist_ok=True)
    out, rounds = tmp_path / "out", 8
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [*CLI, *_simulate_args(image_folder, out, "--rounds", str(rounds))]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while (out / "history.json").is_file() is False and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert (out / "history.json").is_file(), "no round finished"
        proc.send_signal(signal.SIGINT)  # mid round 2 (or later)
        _, stderr = proc.communicate(timeout=60)  # well within one round's timeout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc, stderr, out, rounds
