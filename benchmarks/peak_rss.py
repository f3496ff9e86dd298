"""Whole-step memory and time of MobileTL and the memory options beyond it, against vanilla, side by side.

    .venv/bin/python benchmarks/peak_rss.py [--model mobilenet_v3_large] [--blocks 5] [--batch-size 8] [--image-size 224] [--repeats 3]

Each configuration runs in a fresh child process (peak RSS only grows within a process) that
imports PyTorch, loads and prepares the model, then runs training steps in the trainer's order
(:func:`edgetl.profiler.process_peak.measure_process_peak`). Configurations alternate within each
repeat so that drift on the machine hits all of them; medians are reported with the min-max range
of the process peak. Figures are the operating system's (VmHWM on Linux: interpreter, PyTorch and
the allocator included) next to the exact bytes stored for backward and the predicted live peak.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from edgetl._format import format_size  # noqa: E402
from edgetl.models.zoo import load_model  # noqa: E402
from edgetl.profiler.estimate import predict_step_peak  # noqa: E402
from edgetl.profiler.predict import predict_units  # noqa: E402
from edgetl.profiler.process_peak import measure_process_peak  # noqa: E402
from edgetl.train.policy import TrainPolicy  # noqa: E402

MIB = 2**20


def configurations(k: int, chunk: int) -> dict[str, TrainPolicy]:
    """Vanilla, plain MobileTL, and MobileTL with each memory option, then all of them."""
    return {
        "vanilla": TrainPolicy(k, "vanilla"),
        "mobiletl": TrainPolicy(k),
        f"+bottom_chunk={chunk}": TrainPolicy(k, bottom_chunk=chunk),
        "+bf16": TrainPolicy(k, saved_precision="bf16"),
        "+int8": TrainPolicy(k, saved_precision="int8"),
        "+recompute": TrainPolicy(k, recompute=True),
        "+chunk+int8": TrainPolicy(k, bottom_chunk=chunk, saved_precision="int8"),
        "+chunk+int8+recompute": TrainPolicy(k, bottom_chunk=chunk, saved_precision="int8", recompute=True),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenet_v3_large")
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--bottom-chunk", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="training steps per process (timing: the median after the first)")
    args = p.parse_args()
    configs = configurations(args.blocks, args.bottom_chunk)
    shape = {"batch_size": args.batch_size, "image_size": args.image_size}

    runs: dict[str, list] = {name: [] for name in configs}
    for i in range(args.repeats):
        for name, policy in configs.items():
            r = measure_process_peak(args.model, policy, num_classes=args.num_classes, steps=args.steps, **shape)
            runs[name].append(r)
            print(f"  run {i + 1}/{args.repeats} {name:24s} peak {format_size(r.peak_rss)}, step {r.step_seconds:.3f}s", file=sys.stderr)

    model = load_model(args.model, num_classes=args.num_classes)
    saved = {name: sum(u.nbytes for u in predict_units(model, pol, **shape)) for name, pol in configs.items()}
    predicted = {name: predict_step_peak(model, pol, **shape).step_delta for name, pol in configs.items()}

    def med(name: str, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in runs[name])

    first = runs["vanilla"][0]
    print(
        f"{args.model}, K={args.blocks}, batch {args.batch_size}, {args.image_size} px, {args.num_classes} classes, Adam, "
        f"{args.steps} steps per process, medians of {args.repeats} alternating child processes per configuration"
    )
    print(
        f"{first.platform}, Python {platform.python_version()}, torch {first.torch_version}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; ratios are to vanilla\n"
    )
    head = f"{'configuration':24s}{'stored MiB':>11s}{'ratio':>7s}{'pred dlt':>9s}{'ratio':>7s}{'warm dlt':>9s}{'ratio':>7s}"
    head += f"{'delta':>8s}{'ratio':>7s}{'peak MiB':>10s}{'ratio':>7s}{'peak min-max':>15s}{'step s':>8s}{'ratio':>7s}"
    print(head)
    v = {attr: med("vanilla", attr) for attr in ("step_delta", "warm_delta", "peak_rss", "step_seconds")}
    for name in configs:
        lo, hi = min(r.peak_rss for r in runs[name]) / MIB, max(r.peak_rss for r in runs[name]) / MIB
        m = {attr: med(name, attr) for attr in v}
        print(
            f"{name:24s}{saved[name] / MIB:11.1f}{saved[name] / saved['vanilla']:7.3f}"
            f"{predicted[name] / MIB:9.1f}{predicted[name] / predicted['vanilla']:7.3f}"
            f"{m['warm_delta'] / MIB:9.1f}{m['warm_delta'] / v['warm_delta']:7.3f}"
            f"{m['step_delta'] / MIB:8.1f}{m['step_delta'] / v['step_delta']:7.3f}"
            f"{m['peak_rss'] / MIB:10.1f}{m['peak_rss'] / v['peak_rss']:7.3f}{f'{lo:.0f}-{hi:.0f}':>15s}"
            f"{m['step_seconds']:8.3f}{m['step_seconds'] / v['step_seconds']:7.3f}"
        )
    print(
        "\nstored = bytes autograd keeps for backward (exact, predict_units); pred dlt = predicted live peak "
        "(predict_step_peak) less the weights and input batch loaded before the steps; warm dlt = process peak RSS over the RSS "
        "after loading and a warm-up forward+backward of two images (what the steps' tensors add to a warmed runtime); "
        "delta = process peak RSS over the RSS after loading the model (adds what the first step faults in); peak = process peak RSS"
    )


if __name__ == "__main__":
    main()
