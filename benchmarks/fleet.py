"""Fleet fine-tuning on Flower's simulation engine, side by side in one run (issue 13, point 5).

Demo setting: ImageNet EfficientNet-Lite0, a seeded Fashion-MNIST subset split over 10 clients.
Rows, same data, seed, recipe and test set:
  * fleet, MobileTL top-K, Dirichlet alpha (non-IID), with federated evaluation too;
  * fleet, MobileTL top-K, IID;
  * fleet, MobileTL top-K, alpha, FedBN (norm statistics stay on the clients: federated evaluation);
  * fleet, head only (K=0), alpha;
  * centralised MobileTL top-K on the union of the clients' training images (one epoch = one round).
Figures: test accuracy per round (and a PNG plot), bytes uploaded per client per round (measured
for top-K and head-only, counted from the architecture for full fine-tuning), client peak RSS,
rounds to reach within 1 point of centralised, and the simulation engine's throughput with 100
clients (tiny images: the engine's overhead, not training, is what it measures).

    .venv/bin/python benchmarks/fleet.py [--rounds 5] [--train-limit 1500] [--out runs/bench-fleet]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader

from edgetl._rss import peak_rss_bytes
from edgetl.fleet.config import FleetConfig
from edgetl.fleet.local import accuracy, build_network, client_data, test_set
from edgetl.fleet.payload import shared_keys, to_arrays
from edgetl.fleet.simulation import simulate
from edgetl.train.optim import build_optimizer
from edgetl.train.step import train_step


def payload_bytes(config: FleetConfig, blocks: int) -> int:
    net = build_network(config, num_classes=10, blocks=blocks)
    return sum(a.nbytes for a in to_arrays(net.state_dict(), shared_keys(net)).values())


def centralised(config: FleetConfig, rounds: int) -> tuple[list[float], int]:
    """MobileTL top-K on the union of the clients' training images (the alpha split's shares)."""
    parts = [client_data(config, partition=i, partitions=config.clients)[0] for i in range(config.clients)]
    union = ConcatDataset(parts)
    net = build_network(config, num_classes=10, blocks=config.blocks)
    optimizer = build_optimizer(config.optimizer, net.trainable_parameters(), lr=config.lr)
    test = test_set(config)[0]
    accs = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for epoch in range(rounds):
            net.train()
            loader = DataLoader(union, batch_size=config.batch_size, shuffle=True, drop_last=True,
                                generator=torch.Generator().manual_seed(config.seed + epoch))  # fmt: skip
            for x, y in loader:
                train_step(net, x, y, nn.CrossEntropyLoss(), optimizer)
            accs.append(accuracy(net, test)[1])
            print(f"centralised epoch {epoch + 1}: {100 * accs[-1]:.2f}%", flush=True)
    return accs, len(union)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--train-limit", type=int, default=1500)
    p.add_argument("--test-limit", type=int, default=500)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--throughput-clients", type=int, default=100)
    p.add_argument("--skip", nargs="*", default=[], help="rows to leave out: iid fedbn head central throughput")
    p.add_argument("--out", default="runs/bench-fleet")
    args = p.parse_args()

    out = Path(args.out)
    base = FleetConfig(
        model=args.model, weights="DEFAULT", data="fashion-mnist", test_data="fashion-mnist", clients=args.clients,
        alpha=args.alpha, rounds=args.rounds, blocks=args.blocks, image_size=args.image_size, batch_size=args.batch_size,
        lr=args.lr, train_limit=args.train_limit, test_limit=args.test_limit, min_clients=args.clients, round_timeout=3600.0,
    )  # fmt: skip
    rows = {
        f"fleet top-{args.blocks}, alpha={args.alpha}": dataclasses.replace(base, federated_eval=True),
        f"fleet top-{args.blocks}, IID": dataclasses.replace(base, alpha=None),
        f"fleet top-{args.blocks}, alpha={args.alpha}, FedBN": dataclasses.replace(base, fedbn=True),
        f"fleet head only, alpha={args.alpha}": dataclasses.replace(base, blocks=0),
    }
    skip = {"iid": "IID", "fedbn": "FedBN", "head": "head only"}
    results: dict = {"settings": {k: v for k, v in vars(args).items()}, "runs": {}}
    for name, config in rows.items():
        if any(skip[s] in name for s in args.skip if s in skip):
            continue
        run_out = out / name.replace(" ", "_").replace(",", "").replace("=", "")
        shutil.rmtree(run_out, ignore_errors=True)
        t0 = time.perf_counter()
        history = simulate(dataclasses.replace(config, out=str(run_out)), workers=args.workers)
        seconds = time.perf_counter() - t0
        results["runs"][name] = {
            "test_acc": [r.get("test_acc") for r in history],
            "federated_acc": [r.get("federated_acc") for r in history],
            "upload_bytes_per_client": max(b for r in history for b in r["upload_bytes"]),
            "client_peak_rss_bytes": max(b for r in history for b in r["client_peak_rss_bytes"]),
            "seconds": seconds,
        }
        print(name, json.dumps(results["runs"][name]), flush=True)
    if "central" not in args.skip:
        t0 = time.perf_counter()
        accs, n = centralised(base, args.rounds)
        results["runs"][f"centralised top-{args.blocks}"] = {
            "test_acc": accs,
            "images": n,
            "seconds": time.perf_counter() - t0,
            "peak_rss_bytes_this_process": peak_rss_bytes(),
        }
    results["payload_bytes"] = {
        f"top-{args.blocks}": payload_bytes(base, args.blocks),
        "head only": payload_bytes(base, 0),
        "full fine-tuning": payload_bytes(base, build_network(base, num_classes=10, blocks=0).num_blocks),
    }
    if "throughput" not in args.skip:
        tiny = dataclasses.replace(
            base,
            clients=args.throughput_clients,
            min_clients=args.throughput_clients,
            rounds=1,
            image_size=32,
            train_limit=20 * args.throughput_clients,
            test_data=None,
            alpha=None,
            out=str(out / "throughput"),
        )
        shutil.rmtree(tiny.out, ignore_errors=True)
        t0 = time.perf_counter()
        history = simulate(tiny, workers=args.workers)
        wall = time.perf_counter() - t0
        results["throughput"] = {"clients": tiny.clients, "wall_seconds_incl_engine_start": wall, "round_seconds": history[0]["seconds"],
                                 "client_updates_per_second": history[0]["accepted"] / history[0]["seconds"]}  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2))
    report(results, out, args)


def report(results: dict, out: Path, args) -> None:
    runs = results["runs"]
    central = next((v["test_acc"] for k, v in runs.items() if k.startswith("centralised")), None)
    print("\n| run | " + " | ".join(f"round {i + 1}" for i in range(args.rounds)) + " | rounds to within 1 pt of centralised |")
    print("|---|" + "---|" * (args.rounds + 1))
    for name, run in runs.items():
        for key in ("test_acc", "federated_acc"):
            accs = run.get(key) or []
            if not accs or all(a is None for a in accs):
                continue
            reach = "-"
            if central and key == "test_acc" and not name.startswith("centralised"):
                hit = [i + 1 for i, a in enumerate(accs) if a is not None and a >= central[-1] - 0.01]
                reach = str(hit[0]) if hit else f"not in {len(accs)}"
            label = name + (" (federated eval)" if key == "federated_acc" else "")
            print(f"| {label} | " + " | ".join("-" if a is None else f"{100 * a:.1f}%" for a in accs) + f" | {reach} |")
    pb = results["payload_bytes"]
    full = pb["full fine-tuning"]
    print("\n| payload per client per round | bytes | vs full fine-tuning |\n|---|---|---|")
    for name, b in pb.items():
        print(f"| {name} | {b:,} ({b / 2**20:.2f} MiB) | {b / full:.3f}x |")
    print("\n| run | client peak RSS | wall |\n|---|---|---|")
    for name, run in runs.items():
        if "client_peak_rss_bytes" in run:
            print(f"| {name} | {run['client_peak_rss_bytes'] / 2**20:.0f} MiB | {run['seconds']:.0f} s |")
    if "throughput" in results:
        t = results["throughput"]
        print(
            f"\nsimulation engine, {t['clients']} clients, 1 round at 32 px: {t['round_seconds']:.1f} s per round, "
            f"{t['client_updates_per_second']:.2f} client updates/s ({t['wall_seconds_incl_engine_start']:.1f} s with engine start)"
        )
    plot(results, out / "accuracy_per_round.png")


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'edgetl[plot]')")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run in results["runs"].items():
        for key, style in (("test_acc", "-o"), ("federated_acc", "--x")):
            accs = run.get(key) or []
            pts = [(i + 1, 100 * a) for i, a in enumerate(accs) if a is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=name + (" (federated eval)" if key == "federated_acc" else ""))
    ax.set_xlabel("round (centralised: epoch)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Fleet MobileTL on Fashion-MNIST (EfficientNet-Lite0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
