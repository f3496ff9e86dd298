"""The device's training step against eager PyTorch's, and how close it comes to the machine's GEMM.

    .venv/bin/python benchmarks/device_step.py [--work DIR] [--threads 2,4] [--repeats 2] [--settings demo,v3l]

Settings are benchmarks/device_memory.py's (``demo``: EfficientNet-Lite0, ImageNet weights, K=4,
batch 8, 96 px; ``v3l``: MobileNetV3-Large, K=5, batch 8, 224 px), MobileTL, SGD lr 0.01 momentum
0.9, 240 Fashion-MNIST photos; bundles and photos are cached in ``--work``. For each setting and
thread count, in fresh processes, alternating ``--repeats`` times (medians):

* ``native``: ``edgetl-device finetune`` for one epoch of the bundle exported with edgetl's kernels;
* ``native, decomposed``: the same export made without the kernel library (what an edgetl whose
  ``deploy/native`` is not built writes: depthwise, 1x1 and activation operators in ATen);
* ``eager``: ``edgetl finetune --cache-features`` of the same top, batch and optimizer.

Step time is an epoch's training time over its steps. Then, from the trained top's layer shapes:
the FLOPs of a step (1x1 convolutions and the classifier as GEMMs, forward, input gradient and
weight gradient; depthwise convolutions apart: ``edgetl.profiler.step_time.step_work``, whose
forward tests hold against PyTorch's FLOP counter), the time edgetl's GEMM takes at exactly those shapes
(``edgetl-gemm-bench``), the machine's sgemm peak (the best rate of the same GEMM over 1024^3 and
the step's shapes), the step's achieved GFLOP/s, its share outside GEMMs, the native epoch's split
(decoding, the bottom, forward-backward, SGD) from the runner's ``state.json``, and the step time
``edgetl plan --runtime native`` predicts for this machine (its rates measured here:
``edgetl-gemm-bench``'s 1024^3 GEMM and 64 MiB copy). ``--board NAME=GFLOPS,GBPS`` adds the
step time the same model predicts for another machine from its published sgemm rate and memory
bandwidth (a Raspberry Pi's, say): an estimate, labelled so; aarch64 speed is not measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # device_memory's settings and runners
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from device_memory import ROOT, SETTINGS, eager_finetune, native_finetune, prepare  # noqa: E402

import edgetl  # noqa: E402
from edgetl.profiler.step_time import predict_native_step_time, step_work  # noqa: E402

BUILD = ROOT / "deploy" / "native" / "build"
PEAK_SHAPE = (1024, 1024, 1024, 0, 0)


def copy_gbps(threads: int) -> float:
    """The machine's copy bandwidth on the pool (``edgetl-gemm-bench ... copy 64``)."""
    r = subprocess.run([str(BUILD / "edgetl-gemm-bench"), str(threads), "0.5", "copy", "64"], capture_output=True, text=True, check=True)
    _, nbytes, seconds = r.stdout.split()
    return int(nbytes) / float(seconds) / 1e9


def gemm_seconds(threads: int, shapes: list[tuple[int, int, int, int, int]]) -> dict[tuple, float]:
    """Best seconds of edgetl's GEMM at each distinct shape."""
    distinct = sorted(set(shapes))
    args = [str(v) for shape in distinct for v in shape]
    r = subprocess.run([str(BUILD / "edgetl-gemm-bench"), str(threads), "0.2", *args], capture_output=True, text=True, check=True)
    out = {}
    for line in r.stdout.splitlines():
        *shape, seconds = line.split()
        out[tuple(int(v) for v in shape)] = float(seconds)
    return out


def flops(shape: tuple[int, int, int, int, int]) -> float:
    m, n, k, _, _ = shape
    return 2.0 * m * n * k


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-device"), help="bundles, photos and runs (kept between runs)")
    ap.add_argument("--threads", default="2,4", help="comma-separated thread counts of every process measured")
    ap.add_argument("--repeats", type=int, default=2, help="alternating repeats of each row")
    ap.add_argument("--settings", default="demo,v3l", help="comma-separated: demo, v3l")
    ap.add_argument(
        "--board",
        action="append",
        default=[],
        metavar="NAME=GFLOPS,GBPS",
        help="also print an estimate of the step on a board with this sgemm rate and memory bandwidth "
        "(its published figures, all the threads used): the same model as edgetl plan's, not a measurement",
    )
    args = ap.parse_args()
    work = Path(args.work)
    env = {**os.environ, "PYTHON": sys.executable}
    build = subprocess.run(["bash", str(ROOT / "deploy/native/build.sh"), str(BUILD)], capture_output=True, text=True, env=env)
    if build.returncode:
        raise SystemExit(build.stderr)
    runner = BUILD / "edgetl-device"
    data = work / "photos"

    for name in args.settings.split(","):
        s = SETTINGS[name]
        bundle = prepare(work, name, s, 2)["mobiletl"]
        os.environ["EDGETL_NATIVE_KERNELS"] = str(work / "no-kernel-library")  # an export that finds none
        decomposed = prepare(work / "decomposed", name, s, 2)["mobiletl"]
        del os.environ["EDGETL_NATIVE_KERNELS"]
        analytic = step_work(edgetl.load_model(s["model"], num_classes=10), edgetl.TrainPolicy(blocks=s["blocks"]),
                             batch_size=s["batch"], image_size=s["image_size"])  # fmt: skip
        shapes = [(m, n, k, int(ta), int(tb)) for m, n, k, ta, tb in analytic.gemms]
        gemm_flops, depthwise_flops = analytic.gemm_flops, analytic.depthwise_flops
        for threads in (int(t) for t in args.threads.split(",")):
            rows: dict[str, list[float]] = {}
            epochs = []
            for _ in range(args.repeats):
                state = work / f"state-step-{name}"
                rows.setdefault("native", []).append(native_finetune(runner, bundle, data / "train", state, threads)[2])
                epochs.append(json.loads((state / "state.json").read_text())["history"][0])
                rows.setdefault("native, decomposed", []).append(
                    native_finetune(runner, decomposed, data / "train", work / f"state-step-{name}-decomposed", threads)[2]
                )
                weights = work / f"{name}.pt"
                rows.setdefault("eager", []).append(eager_finetune(s, "mobiletl", weights, data, work / f"eager-step-{name}", threads)[2])
            step = {k: statistics.median(v) for k, v in rows.items()}
            timed = gemm_seconds(threads, [*shapes, PEAK_SHAPE])
            in_gemm = sum(timed[shape] for shape in shapes)
            peak = max(flops(shape) / seconds for shape, seconds in timed.items()) / 1e9
            square = flops(PEAK_SHAPE) / timed[PEAK_SHAPE] / 1e9
            bandwidth = copy_gbps(threads)
            predicted = predict_native_step_time(analytic, gemm_gflops=square, memory_gbps=bandwidth)
            steps = round(epochs[0]["images_per_s"] * epochs[0]["seconds"]) // s["batch"]
            split = {key: statistics.median(e[key] for e in epochs) / steps for key in ("step_seconds", "optimizer_seconds")}
            feature = {key: statistics.median(e["features_seconds"][key] for e in epochs) for key in ("decode", "bottom")}
            setting = f"{s['model']} K={s['blocks']} batch {s['batch']} {s['image_size']} px, MobileTL"
            print(f"\n## {name}: {setting}, {threads} threads, median of {args.repeats}")
            print("| step | ms | / eager |\n|---|---|---|")
            for k, v in step.items():
                print(f"| {k} | {1000 * v:.1f} | {v / step['eager']:.2f} |")
            n = step["native"]
            print(
                f"\nFLOPs of a step: {gemm_flops / 1e9:.2f} G in {len(shapes)} GEMMs, {depthwise_flops / 1e9:.3f} G depthwise. "
                f"Achieved: native {(gemm_flops + depthwise_flops) / n / 1e9:.1f} GFLOP/s, eager "
                f"{(gemm_flops + depthwise_flops) / step['eager'] / 1e9:.1f}; sgemm peak (edgetl's GEMM) {peak:.1f} GFLOP/s "
                f"(1024^3: {square:.1f}); "
                f"edgetl's GEMM alone at the step's shapes: {1000 * in_gemm:.1f} ms ({gemm_flops / in_gemm / 1e9:.1f} GFLOP/s)."
            )
            print(
                f"Native step: {100 * in_gemm / n:.0f}% in GEMMs, {100 * (1 - in_gemm / n):.0f}% outside (elementwise, depthwise, "
                f"copies, the optimizer); forward-backward {1000 * split['step_seconds']:.1f} ms + SGD "
                f"{1000 * split['optimizer_seconds']:.1f} ms."
            )
            print(
                f"Predicted by edgetl plan (gemm_gflops {square:.1f}, memory_gbps {bandwidth:.1f}): "
                f"{1000 * predicted.total:.1f} ms ({1000 * predicted.gemm:.1f} GEMM + {1000 * predicted.streaming:.1f} streaming "
                f"+ {1000 * predicted.layers:.1f} per-layer), "
                f"{predicted.total / n:.2f} of measured."
            )
            for board in args.board:
                label, _, rates = board.partition("=")
                gflops, gbps = (float(r) for r in rates.split(","))
                guess = predict_native_step_time(analytic, gemm_gflops=gflops, memory_gbps=gbps)
                print(f"Estimate, not measured: {label} (sgemm {gflops:g} GFLOP/s, {gbps:g} GB/s): {1000 * guess.total:.0f} ms a step.")
            e = epochs[0]
            print(
                f"Native epoch ({e['images']} photos, {steps} steps): decoding {feature['decode']:.2f} s, "
                f"bottom {feature['bottom']:.2f} s, training {statistics.median(x['seconds'] for x in epochs):.2f} s."
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
