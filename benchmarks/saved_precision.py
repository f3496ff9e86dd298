"""Accuracy and memory of ``TrainPolicy.saved_precision``: fp32 against bf16 and int8 conv inputs.

Every run: the same model (ImageNet EfficientNet-Lite0), Fashion-MNIST subset, epochs, optimizer
and MobileTL policy (top K blocks); only ``saved_precision`` and the seed change. The bottom's
features are cached (``cache_features``), so each epoch trains the top alone. Prints one line per
run, then a Markdown table: validation accuracy (mean +- sample sd over the seeds) and the bytes
stored for backward per step from :func:`edgetl.profiler.predict.predict_units` (equal to autograd's
to the byte, tests/test_memory_options.py), for the trained blocks and for the whole top.

    .venv/bin/python benchmarks/saved_precision.py [--precisions fp32 bf16 int8] [--seeds 0 1 2] [--blocks 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from edgetl import FinetuneConfig, TrainPolicy, finetune, load_model
from edgetl.models.blocks import find_blocks
from edgetl.profiler.predict import predict_units


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument(
        "--weights",
        default="DEFAULT",
        help="DEFAULT (the architecture's ImageNet weights; offline only Lite0's are packaged), a state-dict file, or none",
    )
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8"], choices=["fp32", "bf16", "int8"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--blocks", default="4", help="K, or 'all'")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-limit", type=int, default=3000)
    p.add_argument("--val-limit", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()

    arch = load_model(args.model, num_classes=10)
    blocks = len(find_blocks(arch)) if args.blocks == "all" else int(args.blocks)
    weights = None if args.weights.lower() == "none" else args.weights
    acc: dict[str, list[float]] = {prec: [] for prec in args.precisions}
    saved: dict[str, tuple[int, int]] = {}
    for prec in args.precisions:
        rows = predict_units(arch, TrainPolicy(blocks, saved_precision=prec), batch_size=args.batch_size, image_size=args.image_size)
        saved[prec] = (sum(r.nbytes for r in rows if r.role == "block"), sum(r.nbytes for r in rows))
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for prec in args.precisions:
                config = FinetuneConfig(
                    model=args.model,
                    weights=weights,
                    data="fashion-mnist",
                    train_limit=args.train_limit,
                    val_limit=args.val_limit,
                    policy=TrainPolicy(blocks=blocks, saved_precision=prec),
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    image_size=args.image_size,
                    lr=args.lr,
                    optimizer="adam",
                    cache_features=True,
                    augment=False,
                    seed=seed,
                    out=str(Path(tmp) / f"{prec}-{seed}"),
                )
                t0 = time.perf_counter()
                result = finetune(config, log=lambda _: None)
                acc[prec].append(result.final["val_acc"])
                print(
                    f"seed {seed} {prec:<4} val_acc {100 * result.final['val_acc']:.2f}%  {time.perf_counter() - t0:.0f}s",
                    flush=True,
                )

    print(
        f"\n{args.model} ({args.weights} weights), MobileTL K={blocks}, Fashion-MNIST {args.train_limit} train / "
        f"{args.val_limit} val images, "
        f"{args.image_size} px, {args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr}, cached features, "
        f"seeds {' '.join(map(str, args.seeds))}\n"
    )
    base = statistics.mean(acc["fp32"]) if acc.get("fp32") else None
    print("| saved precision | val accuracy (mean +- sd) | vs fp32 | per seed | saved for backward: trained blocks | whole top + head |")
    print("|---|---|---|---|---|---|")
    for prec in args.precisions:
        values = [100 * a for a in acc[prec]]
        mean = statistics.mean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        delta = f"{mean - 100 * base:+.2f} pt" if base is not None else "-"
        blocks, total = saved[prec]
        print(
            f"| {prec} | {mean:.2f}% +- {sd:.2f} | {delta} | {', '.join(f'{v:.1f}' for v in values)} | "
            f"{blocks:,} B ({blocks / 2**20:.2f} MiB) | {total:,} B ({total / 2**20:.2f} MiB) |"
        )


if __name__ == "__main__":
    main()
