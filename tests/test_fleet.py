"""Fleet fine-tuning (edgetl.fleet): aggregation, reply validation, partitions, payload, sizing,
checkpoint and resume, and the server's round loop with in-process clients (Flower's ClientApp
called directly: no Ray, no gRPC; those engines are tested in test_fleet_engines.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Message, RecordDict  # noqa: E402

from edgetl.errors import ConfigError, EdgetlError, FileWriteError, RunError  # noqa: E402
from edgetl.fleet.aggregate import Reply, fedavg_per_key  # noqa: E402
from edgetl.fleet.checkpoint import RoundState, load_round, save_round  # noqa: E402
from edgetl.fleet.client import LOCAL_STATS, array_record  # noqa: E402
from edgetl.fleet.client import app as client_app  # noqa: E402
from edgetl.fleet.config import FleetConfig  # noqa: E402
from edgetl.fleet.local import build_network  # noqa: E402
from edgetl.fleet.partition import dirichlet_partition, iid_partition  # noqa: E402
from edgetl.fleet.payload import is_stat_key, shared_keys, to_arrays  # noqa: E402
from edgetl.fleet.server import run_fleet  # noqa: E402
from edgetl.fleet.sizing import blocks_for_device  # noqa: E402
from edgetl.fleet.validate import reply_problem  # noqa: E402
from edgetl.nn.layers import ShiftOnlyNorm  # noqa: E402
from edgetl.profiler.planner import plan  # noqa: E402
from tests.conftest import LoopbackGrid, set_task_identity  # noqa: E402

MODEL = "mobilenet_v3_small"


def small_config(tmp_path: Path, data: Path, **overrides) -> FleetConfig:
    values = dict(
        model=MODEL, data=str(data), test_data=str(data), clients=3, alpha=None, rounds=1, blocks=2, image_size=32,
        batch_size=8, min_clients=2, out=str(tmp_path / "server"), round_timeout=60.0, lr=1e-2,
    )  # fmt: skip
    return FleetConfig(**(values | overrides))


# --- aggregation ------------------------------------------------------------------------------


def test_fedavg_is_weighted_per_key_and_renormalised_over_the_clients_that_sent_it():
    rng = np.random.default_rng(0)
    g = {"top": rng.normal(size=(3, 2)).astype(np.float32), "low": rng.normal(size=4).astype(np.float32), "frozen": np.ones(5, np.float32)}
    a = {"top": rng.normal(size=(3, 2)).astype(np.float32), "low": rng.normal(size=4).astype(np.float32)}  # K large
    b = {"top": rng.normal(size=(3, 2)).astype(np.float32)}  # K small: never trained "low"
    c = {"top": rng.normal(size=(3, 2)).astype(np.float32), "low": rng.normal(size=4).astype(np.float32)}
    new, senders = fedavg_per_key(g, [Reply(1, 10, a), Reply(2, 30, b), Reply(3, 60, c)])
    np.testing.assert_allclose(new["top"], (10 * a["top"] + 30 * b["top"] + 60 * c["top"]) / 100, rtol=1e-6)
    # renormalised over its two senders: b's weight does not dilute it towards zero
    np.testing.assert_allclose(new["low"], (10 * a["low"] + 60 * c["low"]) / 70, rtol=1e-6)
    assert np.array_equal(new["frozen"], g["frozen"]) and senders == {"top": 3, "low": 2}
    assert all(new[k].dtype == g[k].dtype for k in g)
    assert not np.array_equal(g["top"], new["top"])  # the input is not modified in place
    assert np.array_equal(fedavg_per_key(g, [Reply(1, 5, {"low": a["low"]})])[0]["low"], a["low"])  # a lone sender's value, exactly


# --- reply validation -------------------------------------------------------------------------

ALLOWED = {"w": (2, 3), "b": (3,)}
GOOD = {"w": np.zeros((2, 3), np.float32), "b": np.ones(3, np.float32)}


@pytest.mark.parametrize(
    "arrays, count, reason",
    [
        ({**GOOD, "features.0.0.weight": np.zeros(1, np.float32)}, 10, "unknown or frozen key 'features.0.0.weight'"),
        ({**GOOD, "w": np.zeros((3, 2), np.float32)}, 10, "w: shape (3, 2), expected (2, 3)"),
        ({**GOOD, "b": np.array([0, np.nan, 0], np.float32)}, 10, "b: NaN or infinite values"),
        ({**GOOD, "b": np.array([0, np.inf, 0], np.float32)}, 10, "b: NaN or infinite values"),
        ({**GOOD, "b": np.array([0, 1, 2], np.int64)}, 10, "b: not a floating-point array (int64)"),
        (GOOD, 10**12, "absurd sample count 1000000000000 (expected a whole number in 1..1000000)"),
        (GOOD, 0, "absurd sample count 0 (expected a whole number in 1..1000000)"),
        (GOOD, -5, "absurd sample count -5 (expected a whole number in 1..1000000)"),
        (GOOD, 2.5, "absurd sample count 2.5 (expected a whole number in 1..1000000)"),
        (GOOD, float("nan"), "sample count nan is not a number"),
        (GOOD, "12", "sample count '12' is not a number"),
        ({}, 10, "no tensors"),
    ],
)
def test_a_bad_reply_is_rejected_with_its_reason(arrays, count, reason):
    assert reply_problem(arrays, count, allowed=ALLOWED, max_examples=1_000_000) == reason


def test_a_good_reply_and_a_subset_of_keys_pass():
    assert reply_problem(GOOD, 10, allowed=ALLOWED, max_examples=100) is None
    assert reply_problem({"w": GOOD["w"]}, 100, allowed=ALLOWED, max_examples=100) is None  # a smaller K sends fewer keys


# --- partitions and settings ------------------------------------------------------------------


def test_partitions_cover_every_example_once_and_dirichlet_skews_labels():
    labels = np.repeat(np.arange(10), 100)
    for shares in (iid_partition(len(labels), 7, seed=3), dirichlet_partition(labels, 7, alpha=0.5, seed=3)):
        flat = sorted(i for s in shares for i in s)
        assert flat == list(range(len(labels)))
    iid = iid_partition(len(labels), 7, seed=3)
    assert max(map(len, iid)) - min(map(len, iid)) <= 1
    skew = dirichlet_partition(labels, 10, alpha=0.1, seed=0)
    # non-IID: a client's most common class holds far more than the IID tenth of its examples
    top_share = np.mean([np.bincount(labels[s], minlength=10).max() / len(s) for s in skew])
    assert top_share > 0.5
    assert dirichlet_partition(labels, 7, alpha=0.5, seed=3) == dirichlet_partition(labels, 7, alpha=0.5, seed=3)
    with pytest.raises(ConfigError, match="cannot split"):
        dirichlet_partition(labels[:5], 7, alpha=0.5, seed=0)


def test_settings_survive_the_wire_including_absent_optional_ones():
    config = FleetConfig(alpha=None, weights=None, test_data=None, devices=("a.toml", "b.toml"), lr=1.0)
    record = config.to_record()
    assert "alpha" not in record and record["devices"] == ["a.toml", "b.toml"]
    # absent means None, not the default (alpha=0.5): an IID fleet stays IID on the clients
    assert FleetConfig.from_record(record) == config
    assert FleetConfig.from_record({"devices": "a.toml,b.toml"}).devices == ("a.toml", "b.toml")
    with pytest.raises(ConfigError, match="unknown fleet settings: colour"):
        FleetConfig.from_record({"colour": "red"})
    with pytest.raises(ConfigError, match="fraction must be in"):
        FleetConfig(fraction=0.0)


# --- what a client sends ----------------------------------------------------------------------


@pytest.mark.parametrize("blocks", [0, 2])
def test_a_client_sends_its_trainable_tensors_and_its_full_norms_statistics_only(blocks):
    config = FleetConfig(model=MODEL, blocks=blocks, image_size=32)
    net = build_network(config, num_classes=3, blocks=blocks)
    keys = shared_keys(net)
    params = {n for n, _ in net.trainable_parameters()}
    stats = {k for k in keys if is_stat_key(k)}
    full_norms = {
        name for name, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and any(p.requires_grad for p in m.parameters())
    }
    assert set(keys) == params | stats
    assert stats == {f"{n}.{s}" for n in full_norms for s in ("running_mean", "running_var")}
    shift_only = [n for n, m in net.named_modules() if isinstance(m, ShiftOnlyNorm)]
    assert len(shift_only) == 2 * blocks  # expansion and depthwise norm of each trained block
    assert not any(k.startswith(tuple(f"{n}." for n in shift_only)) and not k.endswith(".bias") for k in keys)
    assert not any(k.startswith(tuple(f"{u}." for u in net.bottom_names)) for k in keys)
    assert set(shared_keys(net, stats=False)) == params
    # the paper's top-K payload against full fine-tuning, in bytes
    full = build_network(config, num_classes=3, blocks=net.num_blocks)
    sent = sum(a.nbytes for a in to_arrays(net.state_dict(), keys).values())
    everything = sum(a.nbytes for a in to_arrays(full.state_dict(), shared_keys(full)).values())
    assert sent < everything


def test_a_client_with_its_own_folder_trains_on_all_of_it_but_its_held_out_tenth(tmp_path, image_folder):
    from edgetl.fleet.local import client_data

    train, val, classes = client_data(small_config(tmp_path, image_folder), data=str(image_folder))
    images = sorted(p for p in image_folder.rglob("*.png"))
    # (a second, unused tenth used to be held out by the data loader's own validation split)
    assert len(train) + len(val) == len(images) and len(val) == len(images) // 10
    assert classes == sorted(p.name for p in image_folder.iterdir())


def test_a_clients_k_comes_from_its_device_profile(tmp_path):
    config = FleetConfig(model=MODEL, blocks=3, image_size=32, batch_size=8)
    assert blocks_for_device(_device_for_k1(tmp_path), config, num_classes=3) == 1
    assert blocks_for_device("device_profiles/raspberry_pi_5_8gb.toml", config, num_classes=3) == 3  # capped at the fleet's K
    with pytest.raises(EdgetlError, match="nothing fits on Raspberry Pi Zero 2 W"):  # eager PyTorch alone outgrows it
        blocks_for_device("device_profiles/raspberry_pi_zero_2w.toml", config, num_classes=3)


# --- the server's round loop, with in-process clients -----------------------------------------


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    set_task_identity(monkeypatch)


def tampered(change):
    """A client that trains honestly, then alters its reply with ``change(arrays, metrics)``."""

    def app(msg, context):
        reply = client_app(msg, context)
        arrays = {k: a.numpy() for k, a in reply.content["arrays"].items()}
        metrics = dict(reply.content["metrics"])
        change(arrays, metrics)
        from flwr.app import MetricRecord

        return Message(RecordDict({"arrays": array_record(arrays), "metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def _nan(arrays, metrics):
    arrays["classifier.3.bias"][0] = np.nan


def _frozen_key(arrays, metrics):
    arrays["features.0.0.weight"] = np.zeros((16, 3, 3, 3), np.float32)


def _wrong_shape(arrays, metrics):
    arrays["classifier.3.bias"] = np.zeros(7, np.float32)


def _absurd_count(arrays, metrics):
    metrics["num-examples"] = 10**9


@pytest.mark.parametrize(
    "change, reason",
    [
        (_nan, "classifier.3.bias: NaN or infinite values"),
        (_frozen_key, "unknown or frozen key 'features.0.0.weight'"),
        (_wrong_shape, "classifier.3.bias: shape (7,), expected (3,)"),
        (_absurd_count, "absurd sample count 1000000000"),
    ],
)
def test_a_tampered_reply_is_logged_and_left_out_of_the_average(tmp_path, image_folder, caplog, clean_round, change, reason):
    config = small_config(tmp_path, image_folder)
    with caplog.at_level(logging.WARNING, logger="edgetl.fleet"):
        history = run_fleet(LoopbackGrid([client_app, client_app, tampered(change)]), config)
    assert f"round 1: rejected reply from node 102: {reason}" in caplog.text
    assert history[0]["accepted"] == 2 and history[0]["applied"]
    # the same round without the bad client (it never replied): the same global model, bit for bit
    got = load_round(config.out).arrays
    assert all(np.array_equal(got[k], clean_round[k]) for k in clean_round)


@pytest.fixture(scope="module")
def clean_round(tmp_path_factory, image_folder):
    """The global model after one round of clients 0 and 1 of 3 (client 2 never answers)."""
    tmp = tmp_path_factory.mktemp("clean")
    config = small_config(tmp, image_folder)
    with pytest.MonkeyPatch.context() as mp:
        set_task_identity(mp)
        run_fleet(LoopbackGrid([client_app, client_app, client_app], drop={2}), config)
    return load_round(config.out).arrays


def test_node_ids_beyond_int64_reach_their_clients(tmp_path, image_folder):
    # Flower's node ids are uint64: sampling them through numpy once turned them into floats
    grid = LoopbackGrid([client_app, client_app], first_id=2**63 - 1)  # one id in int64, one beyond
    history = run_fleet(grid, small_config(tmp_path, image_folder))
    assert history[0]["accepted"] == 2 and sorted(i for _, i, _ in grid.sent) == [0, 1]


def test_a_client_that_errs_or_never_answers_does_not_stall_the_round(tmp_path, image_folder, caplog):
    def broken(msg, context):
        raise RuntimeError("out of memory")

    config = small_config(tmp_path, image_folder, min_clients=3, min_replies=2, rounds=2)
    with caplog.at_level(logging.WARNING, logger="edgetl.fleet"):
        history = run_fleet(LoopbackGrid([client_app, broken, client_app], drop={2}), config)
    assert "rejected reply from node 101: client error: out of memory" in caplog.text
    assert "1 of 3 sampled clients did not reply" in caplog.text
    assert "round 2: 1 valid replies < min_replies=2: the global model is unchanged" in caplog.text
    # one valid reply < min_replies: logged, the model unchanged, the next round still runs
    assert [row["applied"] for row in history] == [False, False] and len(history) == 2
    saved = load_round(config.out).arrays
    initial = to_arrays(build_network(config, num_classes=3, blocks=2).state_dict(), saved)
    assert [k for k, v in initial.items() if not np.array_equal(saved[k], v)] == []


@pytest.mark.parametrize("via", ["node config", "recipe"])
def test_clients_with_different_k_train_one_model_and_frozen_parts_never_change(tmp_path, image_folder, via):
    small, big = str(_device_for_k1(tmp_path)), "device_profiles/raspberry_pi_5_8gb.toml"
    # a deployed client names its device in its node config; simulated client i gets devices[i % n]
    config = small_config(tmp_path, image_folder, blocks=2, min_clients=2, devices=(big, small) if via == "recipe" else ())
    grid = LoopbackGrid([client_app, client_app])
    if via == "node config":
        grid.contexts[1].node_config["device"] = small
    history = run_fleet(grid, config)
    assert history[0]["blocks"] == [2, 1]  # node 101 (the small device) trains one block
    net2 = build_network(config, num_classes=3, blocks=2)
    initial = to_arrays(net2.state_dict(), net2.state_dict().keys())
    final = load_round(config.out).arrays
    only_k2 = set(shared_keys(net2)) - set(shared_keys(build_network(config, num_classes=3, blocks=1)))
    assert only_k2 and all(not np.array_equal(final[k], initial[k]) for k in only_k2 if not k.endswith("running_var"))
    changed = {k for k in initial if not np.array_equal(final[k], initial[k])}
    assert changed <= set(shared_keys(net2))  # nothing outside the top K=2 moved
    # the server sent both clients what a K=2 client trains; the K=1 client sent back less
    assert {tuple(keys) for _, _, keys in grid.sent} == {tuple(sorted(shared_keys(net2)))}
    assert history[0]["upload_bytes"][1] < history[0]["upload_bytes"][0]


def _device_for_k1(tmp_path: Path) -> Path:
    """A device whose budget lies between the planner's predicted peaks for K=1 and K=2."""
    big = plan("device_profiles/raspberry_pi_5_8gb.toml", MODEL, image_size=32, num_classes=3, batch_sizes=(8,),
               min_blocks=0, memory_options=False, runner_ups=11)  # fmt: skip
    peak = {c.blocks: c.peak for c in (big.chosen, *big.runner_ups)}
    path = tmp_path / "small.toml"
    budget = (peak[1] + peak[2]) // 2
    path.write_text(
        f'name = "small"\nmemory_total = {2 * budget}\nmemory_budget = {budget}\nsafety_margin = 0.0\n'
        'cores = 4\narch = "aarch64"\nnotes = "test"\n'
    )
    return path


def test_fedbn_keeps_norm_statistics_on_each_client(tmp_path, image_folder):
    config = small_config(tmp_path, image_folder, fedbn=True, rounds=2)
    grid = LoopbackGrid([client_app, client_app, client_app])
    history = run_fleet(grid, config)
    net = build_network(config, num_classes=3, blocks=2)
    stats = [k for k in shared_keys(net) if is_stat_key(k)]
    assert all(not any(is_stat_key(k) for k in keys) for _, _, keys in grid.sent)  # never sent down
    initial = to_arrays(net.state_dict(), stats)
    final = load_round(config.out).arrays
    assert all(np.array_equal(final[k], initial[k]) for k in stats)  # never averaged up
    own = [{k: a.numpy() for k, a in ctx.state[LOCAL_STATS].items()} for ctx in grid.contexts]
    assert set(own[0]) == set(stats) and not np.array_equal(own[0][stats[0]], own[1][stats[0]])
    assert all(row["federated_acc"] is not None and "test_acc" not in row for row in history)


def test_the_server_writes_each_round_and_a_restarted_server_resumes_where_it_stopped(tmp_path, image_folder):
    config = small_config(tmp_path, image_folder, rounds=2)
    with pytest.raises(KeyboardInterrupt):
        run_fleet(LoopbackGrid([client_app] * 3, fail_at_round=2), config)
    assert load_round(config.out).round == 1
    grid = LoopbackGrid([client_app] * 3)
    resumed = run_fleet(grid, config)
    assert {rnd for rnd, _, _ in grid.sent} == {2}  # round 1 was not redone
    straight = small_config(tmp_path, image_folder, rounds=2, out=str(tmp_path / "straight"))
    reference = run_fleet(LoopbackGrid([client_app] * 3), straight)
    assert [r["round"] for r in resumed] == [1, 2]
    got, want = load_round(config.out).arrays, load_round(straight.out).arrays
    assert all(np.array_equal(got[k], want[k]) for k in want)  # bit for bit as an uninterrupted run
    assert [r["test_acc"] for r in resumed] == [r["test_acc"] for r in reference]
    with pytest.raises(RunError, match="other settings \\(blocks\\)"):
        run_fleet(LoopbackGrid([client_app] * 3), small_config(tmp_path, image_folder, rounds=3, blocks=1))


def test_a_failed_checkpoint_write_keeps_the_last_round(tmp_path, monkeypatch):
    state = RoundState(1, {"w": np.ones(3, np.float32), "n": np.array(7)}, [{"round": 1}], {"model": MODEL})
    save_round(tmp_path, state)

    def full_disk(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(FileWriteError, match="No space left on device"):
        save_round(tmp_path, RoundState(2, {"w": np.zeros(3, np.float32)}, [], {}))
    monkeypatch.undo()
    kept = load_round(tmp_path)
    assert kept.round == 1 and np.array_equal(kept.arrays["w"], np.ones(3, np.float32))
    assert kept.arrays["n"].shape == () and kept.arrays["n"] == 7  # a 0-d tensor stays 0-d
    assert {p.name for p in tmp_path.iterdir()} == {"global.pt", "history.json"}  # no temporary left


def test_the_flower_app_carries_the_settings_to_a_deployed_server(tmp_path):
    import tomllib

    from edgetl.fleet.deployment import node_config_arg, write_app

    config = FleetConfig(alpha=None, test_data=None, devices=("a.toml", "b c.toml"), fedbn=True, lr=0.5, out=str(tmp_path / 'o"ut'))
    app = tomllib.loads((write_app(tmp_path / "app", config) / "pyproject.toml").read_text())
    assert app["tool"]["flwr"]["app"]["components"] == {"serverapp": "edgetl.fleet.server:app", "clientapp": "edgetl.fleet.client:app"}
    devices = app["tool"]["flwr"]["app"]["config"].pop("devices")
    assert FleetConfig.from_record(app["tool"]["flwr"]["app"]["config"] | {"devices": devices}) == config
    assert node_config_arg({"partition-id": 0, "data": "/my photos"}) == 'partition-id=0 data="/my photos"'


def test_fleet_command_line(tmp_path, capsys):
    from edgetl.cli import main

    assert main(["fleet", "app", str(tmp_path / "app"), "--alpha", "iid", "--devices", "pi4.toml", "pi5.toml", "--rounds", "3"]) == 0
    import tomllib

    run_config = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert "alpha" not in run_config and run_config["devices"] == "pi4.toml,pi5.toml" and run_config["rounds"] == 3
    assert main(["fleet", "app", str(tmp_path / "bad"), "--fraction", "2"]) == 2
    assert "edgetl: error: fraction must be in (0, 1], got 2.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fleet", "simulate", "--help"])
    assert "(default: 0.5)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["fleet", "bundle", "--help"])
    assert "--device-batch DEVICE_BATCH" in capsys.readouterr().out
    # a device bundle may train at most what the fleet shares: refused before anything is exported
    assert main(["fleet", "bundle", str(tmp_path / "dev"), "--blocks", "2", "--device-blocks", "3"]) == 2
    assert "edgetl: error: a device bundle trains at most the fleet's blocks (2), got 3" in capsys.readouterr().err
    assert not (tmp_path / "dev").exists()
