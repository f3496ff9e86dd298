"""Export timm's MobileNetV4-Conv-Small and MobileNetV3-Large under MobileTL, verified against eager.

Each model (random initialisation, running statistics calibrated on random batches) is exported as
the XNNPACK classifier, the frozen bottom and the trainable program; the exporter checks each
against eager PyTorch and refuses a bundle that disagrees. Prints the verification figures as a
Markdown table. Too slow for the test suite (2-3 minutes a model on 2 cores).

    .venv/bin/python benchmarks/timm_export.py [--blocks 5] [--image-size 96] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import edgetl
from edgetl.models.zoo import load_model

MODELS = ("timm:mobilenetv4_conv_small", "timm:mobilenetv3_large_100")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=5, help="K, trained blocks (default: 5)")
    p.add_argument("--image-size", type=int, default=96, help="default: 96")
    p.add_argument("--batch-size", type=int, default=4, help="default: 4")
    p.add_argument("--steps", type=int, default=2, help="SGD steps verified (default: 2)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            torch.manual_seed(0)
            model = load_model(name, num_classes=10).train()
            with torch.no_grad():  # non-trivial running statistics
                for _ in range(3):
                    model(torch.randn(8, 3, args.image_size, args.image_size))
            model.eval()
            policy = edgetl.TrainPolicy(args.blocks)
            config = edgetl.ExportConfig(image_size=args.image_size, batch_size=args.batch_size, training=True, verify_steps=args.steps)
            t0 = time.perf_counter()
            out = Path(tmp) / name.replace(":", "_")
            manifest = edgetl.export(model, policy, out, config, model_name=name, log=lambda _: None).manifest
            v, t = manifest.verification, manifest.verification.training
            rows.append((name, v.inference_max_abs_diff, v.bottom_max_abs_diff, t, time.perf_counter() - t0))
            print(f"{name}: exported and verified in {rows[-1][-1]:.0f} s", flush=True)
    print(f"\nK={args.blocks}, {args.image_size} px, batch {args.batch_size}, {args.steps} SGD steps, max |ExecuTorch - eager|:\n")
    print("| model | model.pte (XNNPACK) | bottom.pte (XNNPACK) | training loss | weights after steps | running stats | time |")
    print("|---|---|---|---|---|---|---|")
    for name, inf, bottom, t, seconds in rows:
        print(
            f"| {name} | {inf:.2g} | {bottom:.2g} | {t.loss_max_abs_diff:.2g} | {t.weight_max_abs_diff:.2g} | "
            f"{t.running_stats_max_abs_diff:.2g} | {seconds:.0f} s |"
        )


if __name__ == "__main__":
    main()
