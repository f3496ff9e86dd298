"""A fleet with a device client that trains through ``edgetl-device`` (no torch), on Flower's
deployment engine (a SuperLink and two SuperNodes as processes on loopback), side by side in one
run with the same fleet of two eager PyTorch clients (issue 13, point 3).

Setting: ImageNet EfficientNet-Lite0, Fashion-MNIST written as image folders (two clients' IID
shares and a test folder), 96 px, MobileTL K=4, SGD lr 0.01 (the device's optimizer), batch 16,
one local epoch per round. Figures per round and per client: the global model's test accuracy,
each client's peak RSS (eager: its ClientApp process, PyTorch included; device: its ClientApp
process plus the runner, both resident while it trains), examples and upload bytes.

    .venv/bin/python benchmarks/fleet_device.py [--rounds 3] [--per-client 600] [--out runs/bench-fleet-device]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from edgetl.data.fashion_mnist import FashionMNIST, write_image_folder
from edgetl.fleet.bundle import device_bundle
from edgetl.fleet.checkpoint import load_round
from edgetl.fleet.config import FleetConfig
from edgetl.fleet.deployment import LocalFleet

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "deploy" / "native" / "build" / "edgetl-device"


def folders(out: Path, per_client: int, test: int, seed: int) -> tuple[Path, Path, Path]:
    """Two clients' IID shares (the device's 10 images smaller, to tell the replies apart) and a test folder."""
    train = FashionMNIST(split="train")
    order = np.random.default_rng(seed).permutation(len(train))
    eager = write_image_folder(train, out / "client-eager", order[:per_client].tolist())
    device = write_image_folder(train, out / "client-device", order[per_client : 2 * per_client - 10].tolist())
    test_split = FashionMNIST(split="test")
    held = np.random.default_rng(seed + 1).permutation(len(test_split))[:test]
    return eager, device, write_image_folder(test_split, out / "test", held.tolist())


def run(config: FleetConfig, nodes: list[dict], workdir: Path) -> list[dict]:
    with LocalFleet(workdir, nodes) as fleet:
        fleet.submit(config, timeout=config.round_timeout * (config.rounds + 1) * 2)
    return load_round(config.out).history


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-client", type=int, default=600, help="training images per client")
    p.add_argument("--test", type=int, default=1000, help="test images")
    p.add_argument("--out", default="runs/bench-fleet-device")
    args = p.parse_args()
    if not RUNNER.exists():
        raise SystemExit(f"build the runner first: bash deploy/native/build.sh {RUNNER.parent}")
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    eager_data, device_data, test_data = folders(out / "data", args.per_client, args.test, seed=0)
    common = dict(
        model="efficientnet_lite0", weights="DEFAULT", data=str(eager_data), test_data=str(test_data), clients=2, alpha=None,
        min_clients=2, rounds=args.rounds, blocks=4, image_size=96, batch_size=16, optimizer="sgd", lr=0.01, round_timeout=1800.0,
    )  # fmt: skip
    results = {}
    for name in ("two eager clients", "eager + device client"):
        config = FleetConfig(**common, out=str(out / name.replace(" ", "-")))
        device = {"data": str(device_data)}
        if "device" in name:
            bundle = device_bundle(config, out / "bundle", blocks=4, batch_size=16, lr=0.01, overwrite=True)
            device = {"bundle": str(bundle.path), "data": str(device_data), "runner": str(RUNNER), "threads": 1}
        history = run(config, [{"data": str(eager_data)}, device], out / f"flower-{name.replace(' ', '-')}")
        results[name] = history
        for row in history:
            clients = sorted(zip(row["examples"], row["client_peak_rss_bytes"], row["upload_bytes"], strict=True), reverse=True)
            who = ", ".join(f"{n} imgs: peak {rss / 2**20:.0f} MiB, upload {up / 2**20:.2f} MiB" for n, rss, up in clients)
            print(f"{name}, round {row['round']}: test acc {100 * row['test_acc']:.1f}%, {row['seconds']:.0f}s; {who}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"figures: {out / 'results.json'}")


if __name__ == "__main__":
    main()
