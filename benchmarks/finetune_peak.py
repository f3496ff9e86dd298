"""The user's figure: peak RSS and wall time of a whole `edgetl finetune` process, repeated.

    .venv/bin/python benchmarks/finetune_peak.py [--model efficientnet_lite0] [--blocks 8] [--batch-size 32]
        [--image-size 96] [--epochs 1] [--train-limit 640] [--repeats 5] [--allocators glibc]

Runs the same fine-tuning (Fashion-MNIST subset, fixed seed, random initial weights: memory does not
depend on them) as separate processes, vanilla / MobileTL / MobileTL with the frozen bottom in
micro-batches, alternating, and reads each process's peak RSS from the kernel (``wait4``'s
``ru_maxrss``). Prints min, median and max per configuration — the spread is the run-to-run
stability a user sees — and the medians' ratios to vanilla. ``--allocators glibc,jemalloc,jemalloc-eager``
repeats every configuration on each ``malloc`` (``edgetl finetune --allocator``), alternating; ratios
are then to vanilla on the same allocator, and wall time also to the first allocator's vanilla.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(argv: list[str]) -> tuple[int, float]:
    """Peak RSS (bytes) and wall seconds of one process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss * 1024, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-limit", type=int, default=640)
    p.add_argument("--bottom-chunk", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--allocators", default="glibc", help="comma-separated: auto, glibc, jemalloc, jemalloc-eager")
    args = p.parse_args()
    methods = {
        "vanilla": ["--method", "vanilla"],
        "mobiletl": ["--method", "mobiletl"],
        f"mobiletl+bottom_chunk={args.bottom_chunk}": ["--method", "mobiletl", "--bottom-chunk", str(args.bottom_chunk)],
    }
    allocators = args.allocators.split(",")
    configs = {
        (f"{a} " if len(allocators) > 1 else "") + name: [*extra, "--allocator", a] for a in allocators for name, extra in methods.items()
    }
    results: dict[str, list[tuple[int, float]]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, extra in configs.items():
                argv = [sys.executable, "-m", "edgetl", "finetune", "--model", args.model, "--blocks", str(args.blocks)]
                argv += ["--batch-size", str(args.batch_size), "--image-size", str(args.image_size), "--epochs", str(args.epochs)]
                argv += ["--data", "fashion-mnist", "--train-limit", str(args.train_limit), "--val-limit", "128", "--seed", "0"]
                argv += ["--out", str(Path(tmp) / f"{name.replace(' ', '-')}-{i}"), *extra]
                results[name].append(run(argv))
                print(f"  run {i + 1}/{args.repeats} {name}: {results[name][-1][0] / 2**20:.1f} MiB", file=sys.stderr)
    print(
        f"edgetl finetune {args.model} K={args.blocks}, batch {args.batch_size}, {args.image_size} px, {args.epochs} epoch(s) on "
        f"{args.train_limit} Fashion-MNIST images; {args.repeats} processes per configuration, alternating\n"
    )
    head = f"{'configuration':48s}{'peak RSS MiB min / median / max':>34s}{'spread':>8s}{'ratio':>7s}"
    print(head + f"{'wall s':>8s}{'ratio':>7s}{'vs first':>9s}")
    first_wall = statistics.median(r[1] for r in results[next(iter(results))])
    for name, rs in results.items():
        vanilla = results[name.rsplit(" ", 1)[0] + " vanilla" if " " in name else "vanilla"]
        v_peak, v_wall = statistics.median(r[0] for r in vanilla), statistics.median(r[1] for r in vanilla)
        peaks = sorted(r[0] / 2**20 for r in rs)
        peak, wall = statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)
        spread = (peaks[-1] - peaks[0]) / statistics.median(peaks)
        print(
            f"{name:48s}{f'{peaks[0]:.1f} / {statistics.median(peaks):.1f} / {peaks[-1]:.1f}':>34s}{100 * spread:7.1f}%"
            f"{peak / v_peak:7.3f}{wall:8.1f}{wall / v_wall:7.3f}{wall / first_wall:9.3f}"
        )


if __name__ == "__main__":
    main()
