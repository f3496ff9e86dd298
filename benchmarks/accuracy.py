"""Accuracy of MobileTL against vanilla fine-tuning, side by side on the embedded default.

Every row: same model (ImageNet EfficientNet-Lite0), same Fashion-MNIST subset, seed, epochs and
optimizer; only the policy changes. Prints a Markdown table: test accuracy, training time, and the
bytes stored for backward per training step (analytic, equal to autograd's to the byte).

    .venv/bin/python benchmarks/accuracy.py [--blocks 0 1 2 4 16] [--epochs 3] [--train-limit 3000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import edgetl
from edgetl import FinetuneConfig, TrainPolicy, finetune, load_model
from edgetl.profiler.predict import predict_units


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--blocks", type=int, nargs="+", default=[0, 1, 2, 4, 16])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-limit", type=int, default=3000)
    p.add_argument("--val-limit", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    arch = load_model(args.model, num_classes=10)
    n_blocks = len(edgetl.find_blocks(arch))
    runs = [(k, m) for k in args.blocks for m in (["mobiletl", "vanilla"] if k else ["vanilla"]) if k <= n_blocks]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, method in runs:
            config = FinetuneConfig(
                model=args.model,
                weights="DEFAULT",
                data="fashion-mnist",
                train_limit=args.train_limit,
                val_limit=args.val_limit,
                policy=TrainPolicy(k, method),
                epochs=args.epochs,
                batch_size=args.batch_size,
                image_size=args.image_size,
                lr=args.lr,
                seed=args.seed,
                out=str(Path(tmp) / f"{k}-{method}"),
            )
            t0 = time.perf_counter()
            result = finetune(config, log=lambda _: None)
            seconds = time.perf_counter() - t0
            saved = sum(
                u.nbytes for u in predict_units(arch, TrainPolicy(k, method), batch_size=args.batch_size, image_size=args.image_size)
            )
            label = "head only" if k == 0 else ("full fine-tuning" if k == n_blocks and method == "vanilla" else method)
            rows.append((k, label, result.final["val_acc"], seconds, saved))
            print(
                f"K={k:<2} {label:<16} val_acc {100 * result.final['val_acc']:.2f}%  {seconds:.0f}s  "
                f"saved for backward {saved / 2**20:.1f} MiB",
                flush=True,
            )

    print(
        f"\n{args.model}, Fashion-MNIST {args.train_limit} train / {args.val_limit} test images, {args.image_size} px, "
        f"{args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr}, seed {args.seed}\n"
    )
    print("| K | method | test accuracy | train time | stored for backward / step |")
    print("|---|---|---|---|---|")
    for k, label, acc, seconds, saved in rows:
        print(f"| {k} | {label} | {100 * acc:.2f}% | {seconds:.0f} s | {saved / 2**20:.1f} MiB |")


if __name__ == "__main__":
    main()
