"""``edgetl fleet``: federated MobileTL on Flower, thin over :mod:`edgetl.fleet`.

``simulate`` runs Flower's simulation engine on this machine, ``local`` its deployment engine with a
SuperLink and SuperNodes as local processes on loopback, and ``app`` writes the Flower App that a
real fleet runs with ``flwr run``. Every setting is a field of :class:`~edgetl.fleet.config.FleetConfig`
(one flag each; ``--help`` shows the defaults).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import sys
from typing import Any

from edgetl.errors import EdgetlError
from edgetl.fleet.config import FleetConfig

_HELP = {
    "model": "architecture",
    "weights": "DEFAULT (pretrained) or a local state-dict file, the same on every client",
    "data": "the simulated clients' data, split over them: 'fashion-mnist' or an ImageFolder",
    "test_data": "the server's held-out set ('fashion-mnist': its test split; 'none': no server-side evaluation)",
    "clients": "simulated clients (SuperNodes)",
    "alpha": "Dirichlet concentration of the non-IID split, or 'iid'",
    "fraction": "share of connected clients asked to train in a round",
    "min_clients": "clients that must be connected before a round starts",
    "min_replies": "valid replies a round needs to change the global model",
    "rounds": "federated rounds",
    "round_timeout": "seconds the server waits for a round's replies",
    "blocks": "K a client trains without a device profile, and the most any client trains",
    "devices": "device-profile TOMLs given to simulated clients in turn (their K comes from the planner)",
    "method": "mobiletl or vanilla",
    "fedbn": "keep the norms' running statistics on the clients (FedBN)",
    "federated_eval": "clients also evaluate the global model on their own held-out images each round",
    "epochs": "local epochs per round",
    "batch_size": "local batch size",
    "lr": "local learning rate",
    "optimizer": "local optimizer (fresh each round)",
    "image_size": "training resolution",
    "train_limit": "seeded subset of --data before the split",
    "test_limit": "seeded subset of --test-data",
    "max_examples": "a reply claiming more training examples is rejected",
    "seed": "partition, initialisation, shuffling, sampling",
    "out": "the server's directory (global.pt after each round, history.json); resumable",
}


def _alpha(text: str) -> float | None:
    return None if text.lower() == "iid" else float(text)


def _optional(kind):
    return lambda text: None if text.lower() == "none" else kind(text)


def _add_settings(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(FleetConfig):
        flag = "--" + f.name.replace("_", "-")
        text = f"{_HELP[f.name]} (default: {'iid' if f.name == 'alpha' and f.default is None else f.default})"
        if f.name in ("fedbn", "federated_eval"):
            p.add_argument(flag, action="store_true", help=text)
        elif f.name == "devices":
            p.add_argument(flag, nargs="+", help=text + "; default: none, every client trains --blocks")
        elif f.name == "alpha":
            p.add_argument(flag, type=_alpha, help=text)
        else:
            base = str(f.type).split("|")[0].strip()
            kind = {"str": str, "int": int, "float": float}[base]
            p.add_argument(flag, type=_optional(kind) if "None" in str(f.type) else kind, help=text)


def add_fleet_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("fleet", help="federated fine-tuning of one model by many devices (Flower)")
    cmds = p.add_subparsers(dest="fleet_command", required=True)
    sim = cmds.add_parser(
        "simulate", help="Flower's simulation engine: --clients virtual clients on this machine", argument_default=argparse.SUPPRESS
    )
    _add_settings(sim)
    sim.add_argument("--workers", type=int, default=1, help="ClientApps running at once, one CPU each (default: 1)")
    sim.set_defaults(handler=_simulate)
    loc = cmds.add_parser(
        "local",
        help="Flower's deployment engine on loopback: a SuperLink and --clients SuperNodes as processes",
        argument_default=argparse.SUPPRESS,
    )
    _add_settings(loc)
    loc.add_argument("--workdir", default=None, help="logs and Flower's state (default: OUT/flower)")
    loc.set_defaults(handler=_local)
    app = cmds.add_parser(
        "app", help="write the Flower App a real fleet runs with `flwr run DIR CONNECTION`", argument_default=argparse.SUPPRESS
    )
    app.add_argument("directory", help="where to write it (its pyproject.toml holds the settings)")
    _add_settings(app)
    app.set_defaults(handler=_app)
    bundle = cmds.add_parser(
        "bundle",
        help="export the fleet's global model as a training bundle for a device client (edgetl-device, no torch)",
        argument_default=argparse.SUPPRESS,
    )
    bundle.add_argument("bundle_out", metavar="OUT", help="bundle directory (node config bundle=OUT on the device)")
    bundle.add_argument("--device-blocks", type=int, default=None, help="K the device trains (default: --blocks)")
    bundle.add_argument("--device-batch", type=int, default=8, help="the device's training batch (static) (default: 8)")
    bundle.add_argument("--device-lr", type=float, default=0.01, help="the device's SGD learning rate (default: 0.01)")
    bundle.add_argument("--force", action="store_true", default=False, help="replace an existing bundle at OUT")
    _add_settings(bundle)
    bundle.set_defaults(handler=_bundle)
    return p


def _config(args: argparse.Namespace) -> FleetConfig:
    names = {f.name for f in dataclasses.fields(FleetConfig)}
    given: dict[str, Any] = {k: v for k, v in vars(args).items() if k in names}
    if "devices" in given:
        given["devices"] = tuple(given["devices"])
    return FleetConfig(**given)


def _need_flower() -> None:
    if importlib.util.find_spec("flwr") is None:
        raise EdgetlError("edgetl fleet needs Flower: pip install 'edgetl[fleet]'")
    # Flower reads this once, when it is imported: the command's choice (set FLWR_TELEMETRY_ENABLED=1 to opt in)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def _logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fleet: %(message)s"))
    logger = logging.getLogger("edgetl.fleet")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _summary(history: list[dict[str, Any]], out: str) -> int:
    from edgetl.errors import RunError
    from edgetl.fleet.server import no_reply_problem

    for row in history:
        acc = row.get("test_acc", row.get("federated_acc"))
        print(
            f"round {row['round']}: {row['accepted']}/{row['sampled']} replies used, accuracy {'-' if acc is None else f'{100 * acc:.2f}%'}"
        )
    print(f"global model: {out}/global.pt  history: {out}/history.json")
    problem = no_reply_problem(history)
    if problem:
        raise RunError(problem)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    _need_flower()
    config = _config(args)
    _logging()
    from edgetl.fleet.simulation import simulate

    return _summary(simulate(config, workers=args.workers), config.out)


def _local(args: argparse.Namespace) -> int:
    _need_flower()
    config = _config(args)
    _logging()
    from pathlib import Path

    from edgetl.fleet.checkpoint import load_round
    from edgetl.fleet.deployment import LocalFleet

    workdir = Path(args.workdir) if args.workdir else Path(config.out) / "flower"
    nodes = [{"partition-id": i, "num-partitions": config.clients} for i in range(config.clients)]
    for i, node in enumerate(nodes):
        if config.devices:
            node["device"] = config.devices[i % len(config.devices)]
    with LocalFleet(workdir, nodes) as fleet:
        fleet.submit(config, timeout=config.round_timeout * (config.rounds + 1) * 2)
    state = load_round(config.out)
    return _summary(state.history if state else [], config.out)


def _bundle(args: argparse.Namespace) -> int:
    config = _config(args)
    from edgetl.fleet.bundle import device_bundle

    blocks = config.blocks if args.device_blocks is None else args.device_blocks
    written = device_bundle(config, args.bundle_out, blocks=blocks, batch_size=args.device_batch, lr=args.device_lr, overwrite=args.force)
    print(f'wrote {written.path}: a device client\'s bundle (K={blocks}, batch {args.device_batch}); node config bundle="{written.path}"')
    return 0


def _app(args: argparse.Namespace) -> int:
    config = _config(args)
    from edgetl.fleet.deployment import write_app

    path = write_app(args.directory, config)
    print(f"wrote {path}/pyproject.toml; settings: {json.dumps(config.to_record())}")
    return 0
