"""Every K a planner can choose, exported and verified: the training program of each model at each K.

    .venv/bin/python benchmarks/training_export_sweep.py [--models mobilenet_v3_large,...] [--blocks 1,5,14]
        [--image-size 224] [--batch-size 8] [--weights DEFAULT|none] [--out sweep.jsonl]

For each model (default: the five registry models) and each K (default: 1 .. all blocks), it
exports the MobileTL training program as ``edgetl export --training`` does (the native kernel
library when built) and runs the exporter's verification (3 SGD steps, lr 0.01, momentum 0.9,
against eager PyTorch); one row per export: exported or refused, the largest loss, weight and
running-statistic differences, how many 1-bit mask elements the program and eager disagreed on
(when the plain comparison needed the program's masks replayed), and seconds. ``--weights none``
(default) uses random initialisation; ``DEFAULT`` the pretrained weights where they are on disk.
Rows are appended to ``--out`` as they finish (a long sweep can be stopped and read).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import edgetl
from edgetl.exporter import training
from edgetl.exporter.errors import ExportError
from edgetl.models.zoo import MODELS, load_model, num_blocks


def sweep_one(name: str, k: int, *, image_size: int, batch_size: int, weights: str | None) -> dict:
    torch.manual_seed(0)
    net = edgetl.prepare(load_model(name, weights=weights, num_classes=10), edgetl.TrainPolicy(blocks=k))
    with torch.no_grad():
        shape = tuple(net.forward_bottom(torch.zeros(batch_size, 3, image_size, image_size)).shape)
    row = {"model": name, "K": k, "image_size": image_size, "batch_size": batch_size}
    t0 = time.perf_counter()
    try:
        ex = training.export_training(net, feature_shape=shape, num_classes=10)
        with tempfile.TemporaryDirectory() as tmp:
            pte, ptd = Path(tmp) / "train.pte", Path(tmp) / "train.ptd"
            pte.write_bytes(ex.program.pte)
            ptd.write_bytes(ex.program.ptd)
            check = training.verify_training(net, ex, pte, ptd, lr=0.01, momentum=0.9, weight_decay=0.0)
        row.update(
            outcome="verified",
            loss=check.loss_max_abs_diff,
            weights=check.weight_max_abs_diff,
            running_stats=check.running_stats_max_abs_diff,
            mask_flips=check.mask_flips,
            mask_flip_gap=check.mask_flip_max_abs_diff,
        )
    except ExportError as exc:
        row.update(outcome="refused", reason=str(exc))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def fmt(row: dict) -> str:
    head = f"| {row['model']} | {row['K']} | {row['outcome']} |"
    if row["outcome"] != "verified":
        return f"{head} {row['reason'][:160]} | | | | {row['seconds']:.0f} |"
    flips = "plain" if row["mask_flips"] is None else f"{row['mask_flips']} replayed"
    return f"{head} {row['loss']:.2g} | {row['weights']:.2g} | {row['running_stats']:.2g} | {flips} | {row['seconds']:.0f} |"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--blocks", default="", help="comma-separated K values (default: every K of each model)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--weights", default="none")
    ap.add_argument("--out", type=Path, default=Path("training_export_sweep.jsonl"))
    args = ap.parse_args(argv)
    weights = None if args.weights == "none" else args.weights
    print("| model | K | outcome | loss | weights | running stats | masks | s |\n|---|---|---|---|---|---|---|---|", flush=True)
    for name in args.models.split(","):
        ks = [int(k) for k in args.blocks.split(",")] if args.blocks else list(range(1, num_blocks(name) + 1))
        for k in ks:
            row = sweep_one(name, k, image_size=args.image_size, batch_size=args.batch_size, weights=weights)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(fmt(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
