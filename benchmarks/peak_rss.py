"""Whole-step memory and time of MobileTL and the memory options beyond it, against vanilla, side by side.

    .venv/bin/python benchmarks/peak_rss.py [--model mobilenet_v3_large] [--blocks 5] [--batch-size 8] [--image-size 224] [--repeats 3]
        [--allocator glibc] [--native] [--only +chunk+int8,...]

Each configuration runs in a fresh child process (peak RSS only grows within a process) that
imports PyTorch, loads and prepares the model, then runs training steps in the trainer's order
(:func:`edgetl.profiler.process_peak.measure_process_peak`). Configurations alternate within each
repeat so that drift on the machine hits all of them; medians are reported with the min-max range
of the process peak. Figures are the operating system's (VmHWM on Linux: interpreter, PyTorch and
the allocator included) next to the exact bytes stored for backward and the predicted live peak.
The children run on the ``malloc`` ``--allocator`` names (default ``glibc``, as ``edgetl finetune``).

``--native`` adds the process the device runs: the same setting exported for training
(``edgetl export --training --method vanilla|mobiletl``, cached in ``--work``) and fine-tuned for one
epoch by ``deploy/native``'s ``edgetl-device finetune`` (240 Fashion-MNIST photos, features cached,
SGD: the device runtime's optimizer), vanilla and MobileTL alternating, each process's own VmHWM
(see ``benchmarks/device_memory.py``, whose export and run it reuses).
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
ROOT = Path(__file__).resolve().parents[1]


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
    p.add_argument("--allocator", default="glibc", help="the children's malloc: auto, glibc, jemalloc, jemalloc-eager")
    p.add_argument("--only", help="comma-separated configurations to run (default: all; vanilla and mobiletl always run: the ratios' base)")
    p.add_argument("--native", action="store_true", help="also the device runner's process peak, vanilla and MobileTL")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-device"), help="--native: exported bundles and photos (kept)")
    p.add_argument("--threads", type=int, default=2, help="--native: threads of the device runner")
    args = p.parse_args()
    configs = configurations(args.blocks, args.bottom_chunk)
    if args.only:
        wanted = {"vanilla", "mobiletl", *args.only.split(",")}
        if wanted - configs.keys():
            p.error(f"unknown configuration(s) {sorted(wanted - configs.keys())}; known: {', '.join(configs)}")
        configs = {name: policy for name, policy in configs.items() if name in wanted}
    shape = {"batch_size": args.batch_size, "image_size": args.image_size}

    runs: dict[str, list] = {name: [] for name in configs}
    for i in range(args.repeats):
        for name, policy in configs.items():
            r = measure_process_peak(args.model, policy, num_classes=args.num_classes, steps=args.steps, allocator=args.allocator, **shape)
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
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, malloc {first.allocator}; ratios are to vanilla\n"
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
    if args.native:
        native_rows(args, statistics.median(r.peak_rss for r in runs["vanilla"]), statistics.median(r.peak_rss for r in runs["mobiletl"]))


def native_rows(args: argparse.Namespace, eager_vanilla: float, eager_mobiletl: float) -> None:
    """The device runner's process peak for vanilla and MobileTL at this setting, beside the eager rows."""
    import subprocess

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import device_memory

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    build = subprocess.run(
        ["bash", str(ROOT / "deploy/native/build.sh"), str(ROOT / "deploy/native/build")],
        capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    if build.returncode:
        raise SystemExit(build.stderr[-2000:])
    runner = Path(build.stdout.strip().splitlines()[-1])
    setting = {"model": args.model, "weights": None, "blocks": args.blocks, "image_size": args.image_size, "batch": args.batch_size}
    name = f"{args.model}-k{args.blocks}-b{args.batch_size}-{args.image_size}"
    bundles = device_memory.prepare(work, name, setting, args.threads)
    peaks: dict[str, list[int]] = {m: [] for m in device_memory.METHODS}
    state = work / f"state-{name}"
    for i in range(args.repeats):
        for method in device_memory.METHODS:
            peak, _, step = device_memory.native_finetune(runner, bundles[method], work / "photos" / "train", state, args.threads)
            peaks[method].append(peak)
            print(f"  native run {i + 1}/{args.repeats} {method}: peak {peak / MIB:.1f} MiB, step {1000 * step:.0f} ms", file=sys.stderr)
    nv, nm = (statistics.median(peaks[m]) for m in ("vanilla", "mobiletl"))
    spread = {m: f"{min(v) / MIB:.0f}-{max(v) / MIB:.0f}" for m, v in peaks.items()}
    print(f"\nthe device's process (edgetl-device finetune, 1 epoch, SGD, {args.threads} threads), medians of {args.repeats}:")
    print(f"{'process':30s}{'vanilla MiB':>12s}{'min-max':>10s}{'MobileTL MiB':>14s}{'min-max':>10s}{'ratio':>7s}")
    print(f"{'native (edgetl-device)':30s}{nv / MIB:12.1f}{spread['vanilla']:>10s}{nm / MIB:14.1f}{spread['mobiletl']:>10s}{nm / nv:7.3f}")
    ev, em = eager_vanilla, eager_mobiletl
    print(f"{'eager (the rows above, Adam)':30s}{ev / MIB:12.1f}{'':>10s}{em / MIB:14.1f}{'':>10s}{em / ev:7.3f}")


if __name__ == "__main__":
    main()
