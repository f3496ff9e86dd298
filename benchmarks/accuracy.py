"""Accuracy of MobileTL against vanilla fine-tuning, side by side on the embedded default.

Every row: same model (ImageNet EfficientNet-Lite0), same Fashion-MNIST subset, seed, epochs and
optimizer; only the policy changes. Prints a Markdown table: test accuracy, training time, and the
bytes stored for backward per training step (analytic, equal to autograd's to the byte).

    .venv/bin/python benchmarks/accuracy.py [--blocks 0 1 2 4 16] [--epochs 3] [--train-limit 3000]

``--timm`` runs timm's rows instead (needs ``edgetl[timm]``), same subset and settings: timm's
``tf_efficientnet_lite0`` with the packaged Lite0 ImageNet weights (mapped onto timm's keys:
head only, MobileTL, vanilla; K = 0, 4), and ``mobilenetv4_conv_small`` from random
initialisation (MobileTL against vanilla only, K = 4 and all 12: there are no ImageNet weights
offline, and a head on random features says nothing).

    .venv/bin/python benchmarks/accuracy.py --timm
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import edgetl
from edgetl import FinetuneConfig, TrainPolicy, finetune, load_model
from edgetl.models import lite0
from edgetl.profiler.predict import predict_units


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--blocks", type=int, nargs="+", help="K values (default 0 1 2 4 16; with --timm 0 4 for Lite0, 4 12 for MobileNetV4)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-limit", type=int, default=3000)
    p.add_argument("--val-limit", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timm", action="store_true", help="timm's rows: tf_efficientnet_lite0 (packaged weights), mobilenetv4_conv_small")
    args = p.parse_args()

    if args.timm:
        # (model, weights, K values, head-only row): Lite0's packaged weights; MobileNetV4 random, no head-only row
        plans = [
            ("timm:tf_efficientnet_lite0", lite0.weights_path(), args.blocks or [0, 4], True),
            ("timm:mobilenetv4_conv_small", None, args.blocks or [4, 12], False),
        ]
    else:
        plans = [(args.model, "DEFAULT", args.blocks or [0, 1, 2, 4, 16], True)]
    rows = []
    for model, weights, ks, head_only in plans:
        rows += _rows(args, model, weights, ks, head_only)

    print(
        f"\nFashion-MNIST {args.train_limit} train / {args.val_limit} test images, {args.image_size} px, "
        f"{args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr}, seed {args.seed}\n"
    )
    print("| model | weights | K | method | test accuracy | train time | stored for backward / step |")
    print("|---|---|---|---|---|---|---|")
    for model, weights, k, label, acc, seconds, saved in rows:
        print(f"| {model} | {weights} | {k} | {label} | {100 * acc:.2f}% | {seconds:.0f} s | {saved / 2**20:.1f} MiB |")


def _rows(args: argparse.Namespace, model: str, weights: str | None, ks: list[int], head_only: bool) -> list[tuple]:
    arch = load_model(model, num_classes=10)
    n_blocks = len(edgetl.find_blocks(arch))
    runs = [(k, m) for k in ks for m in (["mobiletl", "vanilla"] if k else ["vanilla"]) if k <= n_blocks and (k or head_only)]
    shown = "random init" if weights is None else ("packaged Lite0 ImageNet" if weights == lite0.weights_path() else weights)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, method in runs:
            config = FinetuneConfig(
                model=model,
                weights=weights,
                data="fashion-mnist",
                train_limit=args.train_limit,
                val_limit=args.val_limit,
                policy=TrainPolicy(k, method),
                epochs=args.epochs,
                batch_size=args.batch_size,
                image_size=args.image_size,
                lr=args.lr,
                seed=args.seed,
                out=str(Path(tmp) / f"{model.replace(':', '_')}-{k}-{method}"),
            )
            t0 = time.perf_counter()
            result = finetune(config, log=lambda _: None)
            seconds = time.perf_counter() - t0
            saved = sum(
                u.nbytes for u in predict_units(arch, TrainPolicy(k, method), batch_size=args.batch_size, image_size=args.image_size)
            )
            label = "head only" if k == 0 else ("full fine-tuning" if k == n_blocks and method == "vanilla" else method)
            rows.append((model, shown, k, label, result.final["val_acc"], seconds, saved))
            print(
                f"{model} K={k:<2} {label:<16} val_acc {100 * result.final['val_acc']:.2f}%  {seconds:.0f}s  "
                f"saved for backward {saved / 2**20:.1f} MiB",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
