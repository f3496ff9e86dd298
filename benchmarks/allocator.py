"""Which malloc: glibc's, glibc's with tunables, jemalloc, jemalloc returning pages at once — side by side.

    .venv/bin/python benchmarks/allocator.py [--model mobilenet_v3_large] [--blocks 5] [--batch-size 8] [--image-size 224]
        [--num-classes 10] [--repeats 3] [--allocators glibc,glibc-tuned,jemalloc,jemalloc-eager]

For vanilla, MobileTL, MobileTL + ``bottom_chunk`` and MobileTL + ``bottom_chunk`` + int8, each
configuration runs in a fresh child process (:func:`edgetl.profiler.process_peak.measure_process_peak`)
on each allocator; allocators and configurations alternate within each repeat, so drift on the
machine hits all of them. Printed per allocator and configuration, medians: the warm delta (peak RSS
over the warmed runtime), the step delta (over the loaded model), the process peak with its min-max
over the repeats, and the step time; ratios to vanilla on the same allocator, next to the predicted
delta's ratio (``predict_step_peak``, which does not depend on the allocator), and the step time
against glibc's vanilla. ``glibc-tuned`` is glibc with ``GLIBC_TUNABLES`` (:data:`GLIBC_TUNED`:
tensors of 1 MiB and more mapped and unmapped on their own, in transparent huge pages).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from edgetl._allocator import find_jemalloc  # noqa: E402
from edgetl.models.zoo import load_model  # noqa: E402
from edgetl.profiler.estimate import predict_step_peak  # noqa: E402
from edgetl.profiler.process_peak import ProcessPeak, measure_process_peak  # noqa: E402
from edgetl.train.policy import TrainPolicy  # noqa: E402

MIB = 2**20
GLIBC_TUNED = "glibc.malloc.mmap_threshold=1048576:glibc.malloc.trim_threshold=1048576:glibc.malloc.hugetlb=1"


def configurations(k: int, chunk: int) -> dict[str, TrainPolicy]:
    return {
        "vanilla": TrainPolicy(k, "vanilla"),
        "mobiletl": TrainPolicy(k),
        f"+bottom_chunk={chunk}": TrainPolicy(k, bottom_chunk=chunk),
        "+chunk+int8": TrainPolicy(k, bottom_chunk=chunk, saved_precision="int8"),
    }


def measure(allocator: str, policy: TrainPolicy, args: argparse.Namespace) -> ProcessPeak:
    """One child process on ``allocator`` (``glibc-tuned``: glibc with :data:`GLIBC_TUNED` in its environment)."""
    tuned = allocator == "glibc-tuned"
    saved = os.environ.get("GLIBC_TUNABLES")
    if tuned:
        os.environ["GLIBC_TUNABLES"] = GLIBC_TUNED  # the child inherits this process's environment
    try:
        return measure_process_peak(
            args.model, policy, batch_size=args.batch_size, image_size=args.image_size, num_classes=args.num_classes,
            steps=args.steps, allocator="glibc" if tuned else allocator,
        )  # fmt: skip
    finally:
        if tuned:
            os.environ.pop("GLIBC_TUNABLES") if saved is None else os.environ.__setitem__("GLIBC_TUNABLES", saved)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenet_v3_large")
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--bottom-chunk", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="training steps per process (timing: the median after the first)")
    p.add_argument("--allocators", default="glibc,glibc-tuned,jemalloc,jemalloc-eager")
    args = p.parse_args()
    allocators = args.allocators.split(",")
    if find_jemalloc() is None:
        allocators = [a for a in allocators if not a.startswith("jemalloc")]
        print("jemalloc is not installed (apt-get install libjemalloc2): glibc only", file=sys.stderr)
    configs = configurations(args.blocks, args.bottom_chunk)

    runs: dict[tuple[str, str], list[ProcessPeak]] = {}
    for i in range(args.repeats):
        for allocator in allocators:
            for name, policy in configs.items():
                r = measure(allocator, policy, args)
                runs.setdefault((allocator, name), []).append(r)
                print(
                    f"  run {i + 1}/{args.repeats} {allocator:15s} {name:18s} ({r.allocator}) warm delta {r.warm_delta / MIB:6.1f} MiB, "
                    f"peak {r.peak_rss / MIB:6.1f} MiB, step {r.step_seconds:.3f}s",
                    file=sys.stderr,
                    flush=True,
                )

    model = load_model(args.model, num_classes=args.num_classes)
    shape = {"batch_size": args.batch_size, "image_size": args.image_size}
    predicted = {name: predict_step_peak(model, pol, **shape).step_delta for name, pol in configs.items()}

    def med(key: tuple[str, str], attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in runs[key])

    first = runs[(allocators[0], "vanilla")][0]
    print(
        f"{args.model}, K={args.blocks}, batch {args.batch_size}, {args.image_size} px, {args.num_classes} classes, Adam, "
        f"{args.steps} steps per process, medians of {args.repeats} alternating child processes per row"
    )
    print(
        f"{first.platform}, Python {platform.python_version()}, torch {first.torch_version}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; glibc-tuned: GLIBC_TUNABLES={GLIBC_TUNED}\n"
    )
    head = f"{'allocator':15s}{'configuration':18s}{'pred ratio':>11s}{'warm dlt':>9s}{'ratio':>7s}{'delta':>8s}{'ratio':>7s}"
    head += f"{'peak MiB':>10s}{'min-max':>10s}{'ratio':>7s}{'step s':>8s}{'ratio':>7s}{'vs glibc':>9s}"
    print(head)
    g_step = med((allocators[0], "vanilla"), "step_seconds")
    for allocator in allocators:
        v = {a: med((allocator, "vanilla"), a) for a in ("warm_delta", "step_delta", "peak_rss", "step_seconds")}
        for name in configs:
            key = (allocator, name)
            m = {a: med(key, a) for a in v}
            lo, hi = min(r.peak_rss for r in runs[key]) / MIB, max(r.peak_rss for r in runs[key]) / MIB
            print(
                f"{allocator:15s}{name:18s}{predicted[name] / predicted['vanilla']:11.3f}"
                f"{m['warm_delta'] / MIB:9.1f}{m['warm_delta'] / v['warm_delta']:7.3f}"
                f"{m['step_delta'] / MIB:8.1f}{m['step_delta'] / v['step_delta']:7.3f}"
                f"{m['peak_rss'] / MIB:10.1f}{f'{lo:.0f}-{hi:.0f}':>10s}{m['peak_rss'] / v['peak_rss']:7.3f}"
                f"{m['step_seconds']:8.3f}{m['step_seconds'] / v['step_seconds']:7.3f}{m['step_seconds'] / g_step:9.3f}"
            )
    print(
        "\npred ratio = predicted step delta (live peak less weights and input batch) over vanilla's; warm dlt = peak RSS over the RSS "
        "after loading and a warm-up step of two images; delta = peak RSS over the RSS after loading; ratios to vanilla on the same "
        f"allocator; vs glibc = step time over {allocators[0]}'s vanilla. Predicted deltas (MiB): "
        + ", ".join(f"{n} {b / MIB:.1f}" for n, b in predicted.items())
    )


if __name__ == "__main__":
    main()
