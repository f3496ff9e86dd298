"""Process peak RSS of a real training step, vanilla against MobileTL, side by side in one run.

    .venv/bin/python benchmarks/peak_rss.py [--model mobilenet_v3_large] [--blocks 5] [--batch-size 8] [--image-size 224] [--repeats 3]

Each measurement is a fresh child process (peak RSS only grows within a process) that imports
PyTorch, loads and prepares the model, then runs training steps (forward, backward, Adam step);
see :func:`edgetl.profiler.process_peak.measure_process_peak`. The methods alternate (vanilla, mobiletl,
vanilla, ...) so that drift on the machine hits both, and the medians are reported. Figures are the
operating system's (VmHWM on Linux): they include the interpreter, PyTorch's libraries and the
allocator, unlike the exact saved-for-backward bytes printed alongside.
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
from edgetl.profiler.report import METHOD_ORDER  # noqa: E402
from edgetl.train.policy import TrainPolicy  # noqa: E402

MIB = 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenet_v3_large")
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    runs: dict[str, list] = {m: [] for m in METHOD_ORDER}
    for i in range(args.repeats):
        for m in METHOD_ORDER:
            r = measure_process_peak(
                args.model,
                TrainPolicy(args.blocks, m),
                batch_size=args.batch_size,
                image_size=args.image_size,
                num_classes=args.num_classes,
            )
            runs[m].append(r)
            print(
                f"  run {i + 1}/{args.repeats} {m:8s}: peak {format_size(r.peak_rss)}, after load {format_size(r.loaded_rss)}, "
                f"step delta {format_size(r.step_delta)}",
                file=sys.stderr,
                flush=True,
            )

    model = load_model(args.model, num_classes=args.num_classes)
    shape = {"batch_size": args.batch_size, "image_size": args.image_size}
    saved = {m: sum(u.nbytes for u in predict_units(model, TrainPolicy(args.blocks, m), **shape)) for m in METHOD_ORDER}
    est = {
        m: predict_step_peak(model, TrainPolicy(args.blocks, m), batch_size=args.batch_size, image_size=args.image_size)
        for m in METHOD_ORDER
    }

    def med(method: str, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in runs[method]) / MIB

    first = runs["vanilla"][0]
    print(
        f"{args.model}, K={args.blocks}, batch {args.batch_size}, {args.image_size} px, {args.num_classes} classes, Adam, "
        f"{first.steps} training steps per process; medians of {args.repeats} alternating child processes per method"
    )
    print(
        f"{first.platform}, Python {platform.python_version()}, torch {first.torch_version}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, peak reset after load: {first.hwm_reset}\n"
    )
    rows = [
        ("saved for backward (autograd, exact)", saved["vanilla"] / MIB, saved["mobiletl"] / MIB),
        ("RSS after imports (runtime baseline)", med("vanilla", "runtime_rss"), med("mobiletl", "runtime_rss")),
        ("RSS after model load + prepare", med("vanilla", "loaded_rss"), med("mobiletl", "loaded_rss")),
        ("process peak RSS (OS)", med("vanilla", "peak_rss"), med("mobiletl", "peak_rss")),
        ("  delta over model load", med("vanilla", "step_delta"), med("mobiletl", "step_delta")),
        ("  delta over runtime baseline", med("vanilla", "model_delta"), med("mobiletl", "model_delta")),
        ("predicted step peak, excl. runtime (est.)", est["vanilla"].model_bytes / MIB, est["mobiletl"].model_bytes / MIB),
    ]
    print(f"{'MiB':44}{'vanilla':>10}{'mobiletl':>10}{'mobiletl/vanilla':>18}")
    for label, v, m in rows:
        print(f"{label:44}{v:10.1f}{m:10.1f}{m / v:18.3f}")
    spread = {m: (min(r.peak_rss for r in runs[m]), max(r.peak_rss for r in runs[m])) for m in METHOD_ORDER}
    print("\npeak RSS range over runs: " + ", ".join(f"{m} {format_size(lo)}-{format_size(hi)}" for m, (lo, hi) in spread.items()))


if __name__ == "__main__":
    main()
