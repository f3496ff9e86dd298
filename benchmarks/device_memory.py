"""What the device process costs: the native runner, MobileTL against vanilla, beside the eager process.

    .venv/bin/python benchmarks/device_memory.py [--work DIR] [--threads 2] [--repeats 2] [--settings demo,v3l]

Settings (10 Fashion-MNIST classes, 240 photos as the device's own data, SGD lr 0.01 momentum 0.9):

* ``demo``: EfficientNet-Lite0 with its ImageNet weights, K=4, batch 8, 96 px (the demo's bundle);
* ``v3l``: MobileNetV3-Large (random initialisation: memory and time do not depend on the values),
  K=5, batch 8, 224 px.

Each setting is exported twice (``edgetl export --training --method mobiletl|vanilla``, cached in
``--work``); the native runner is built with ``deploy/native/build.sh`` if needed. Then, in fresh
processes, alternating between the rows ``--repeats`` times, it measures each process's peak RSS
(VmHWM, as each process reports it) and wall time:

* native ``classify`` of 100 photos with ``model.pte``;
* native ``finetune`` for one epoch (bottom features once, then 30 SGD steps), both methods;
* eager ``edgetl finetune`` of the same top, same batch and optimizer, features cached
  (``--cache-features``, the eager counterpart of the device's feature cache), both methods.

Step time is the epoch's training time over its steps (the runner's ``state.json``; the trainer's
images/s). Also printed: the training programs' planned arenas (from the manifests).
Medians over the repeats; ratios are taken within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EDGETL = [str(Path(sys.executable).parent / "edgetl")]
SETTINGS = {
    "demo": {"model": "efficientnet_lite0", "weights": "DEFAULT", "blocks": 4, "image_size": 96, "batch": 8},
    "v3l": {"model": "mobilenet_v3_large", "weights": None, "blocks": 5, "image_size": 224, "batch": 8},
}
METHODS = ("mobiletl", "vanilla")
MiB = 2**20


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, str, str]:
    """Wall seconds, stdout and stderr of ``cmd`` in a fresh process.

    Peak RSS is what each process reports of its own VmHWM (``edgetl-device --verbose``, the
    trainer's ``peak_rss``): a child's ``ru_maxrss`` would include this Python process, whose memory
    a vforked child holds until it execs.
    """
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0, r.stdout, r.stderr


def reported_peak(text: str, pattern: str) -> int:
    return int(float(re.findall(pattern, text)[-1]) * MiB)


def prepare(work: Path, name: str, s: dict, threads: int) -> dict[str, Path]:
    """Export both methods' bundles for setting ``name`` (cached) and the photo folders."""
    import torch

    import edgetl
    from edgetl.data.fashion_mnist import FashionMNIST, write_image_folder

    data = work / "photos"
    if not (data / "train").is_dir():
        test = FashionMNIST(split="test")
        write_image_folder(test, data / "train", indices=range(9000, 9240))
        write_image_folder(test, data / "check", indices=range(9800, 9900))
    weights = work / f"{name}.pt"
    if not weights.is_file():
        torch.manual_seed(0)
        model = edgetl.load_model(s["model"], weights=s["weights"], num_classes=10)
        classes = FashionMNIST(split="test").classes
        torch.save({"model": model.state_dict(), "model_name": s["model"], "classes": list(classes)}, weights)
    bundles = {}
    for method in METHODS:
        out = work / f"{name}-{method}"
        if not (out / "manifest.json").is_file():
            print(f"exporting {name} {method} ...", flush=True)
            r = subprocess.run(
                [
                    *EDGETL,
                    "export",
                    "--checkpoint",
                    str(weights),
                    "--model",
                    s["model"],
                    "--out",
                    str(out),
                    "--training",
                    "--blocks",
                    str(s["blocks"]),
                    "--method",
                    method,
                    "--batch-size",
                    str(s["batch"]),
                    "--image-size",
                    str(s["image_size"]),
                    "--lr",
                    "0.01",
                    "--momentum",
                    "0.9",
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": str(threads)},
            )
            if r.returncode:
                raise SystemExit(r.stdout[-2000:] + r.stderr[-2000:])
        bundles[method] = out
    return bundles


def native_finetune(runner: Path, bundle: Path, data: Path, state: Path, threads: int) -> tuple[int, float, float]:
    shutil.rmtree(state, ignore_errors=True)
    cmd = [str(runner), "--threads", str(threads), "--verbose", "finetune", str(bundle), str(data), "--state", str(state), "--epochs", "1"]
    seconds, _, err = measure(cmd)
    row = json.loads((state / "state.json").read_text())["history"][0]
    batch = json.loads((bundle / "manifest.json").read_text())["programs"]["training"]["batch_size"]
    steps = round(row["images_per_s"] * row["seconds"]) // batch
    return reported_peak(err, r"peak ([\d.]+) MiB"), seconds, row["seconds"] / steps


def eager_finetune(s: dict, method: str, weights: Path, data: Path, out: Path, threads: int) -> tuple[int, float, float]:
    shutil.rmtree(out, ignore_errors=True)
    flags = (
        f"--model {s['model']} --blocks {s['blocks']} --method {method} --epochs 1 --batch-size {s['batch']} "
        f"--image-size {s['image_size']} --optimizer sgd --lr 0.01 --momentum 0.9 --schedule constant --no-augment --cache-features"
    )
    cmd = [*EDGETL, "finetune", *flags.split(), "--weights", str(weights), "--data", str(data / "train"), "--val-data", str(data / "check")]
    seconds, stdout, _ = measure([*cmd, "--out", str(out)], {**os.environ, "OMP_NUM_THREADS": str(threads)})
    images_per_s = float(re.search(r"images/s ([\d.]+)", stdout).group(1))
    return reported_peak(stdout, r"peak_rss ([\d.]+)MiB"), seconds, s["batch"] / images_per_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-device"), help="bundles, photos and runs (kept between runs)")
    ap.add_argument("--threads", type=int, default=2, help="threads of every process measured")
    ap.add_argument("--repeats", type=int, default=2, help="alternating repeats of each row")
    ap.add_argument("--settings", default="demo,v3l", help="comma-separated: demo, v3l")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    build = subprocess.run(
        ["bash", str(ROOT / "deploy/native/build.sh"), str(ROOT / "deploy/native/build")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    if build.returncode:
        raise SystemExit(build.stderr)
    runner = Path(build.stdout.strip().splitlines()[-1])
    data = work / "photos"

    for name in args.settings.split(","):
        s = SETTINGS[name]
        bundles = prepare(work, name, s, args.threads)
        weights = work / f"{name}.pt"
        rows: dict[str, list[tuple[int, float, float]]] = {}
        for _ in range(args.repeats):
            for method in METHODS:
                rows.setdefault(f"native {method}", []).append(
                    native_finetune(runner, bundles[method], data / "train", work / f"state-{name}-{method}", args.threads)
                )
                rows.setdefault(f"eager {method}", []).append(
                    eager_finetune(s, method, weights, data, work / f"eager-{name}-{method}", args.threads)
                )
            secs, _, err = measure(
                [str(runner), "--threads", str(args.threads), "--verbose", "classify", str(bundles["mobiletl"]), str(data / "check")]
            )
            rss = reported_peak(err, r"peak ([\d.]+) MiB")
            rows.setdefault("native classify (100 photos)", []).append((rss, secs, float("nan")))
        med = {k: tuple(statistics.median(v[i] for v in vals) for i in range(3)) for k, vals in rows.items()}
        arenas = {m: json.loads((bundles[m] / "manifest.json").read_text())["memory"]["planned_arena_bytes"]["forward"] for m in METHODS}
        print(
            f"\n## {name}: {s['model']} K={s['blocks']} batch {s['batch']} {s['image_size']} px, {args.threads} threads, "
            f"median of {args.repeats}"
        )
        print("| process | peak RSS (MiB) | wall (s) | step (ms) |\n|---|---|---|---|")
        for k, (rss, secs, step) in med.items():
            print(f"| {k} | {rss / MiB:.1f} | {secs:.1f} | {'' if step != step else f'{1000 * step:.0f}'} |")
        nm, nv, em, ev = med["native mobiletl"], med["native vanilla"], med["eager mobiletl"], med["eager vanilla"]
        print(
            f"| planned arena of the training step (MiB) | mobiletl {arenas['mobiletl'] / MiB:.1f} | vanilla "
            f"{arenas['vanilla'] / MiB:.1f} | ratio {arenas['mobiletl'] / arenas['vanilla']:.3f} |"
        )
        print(
            f"\nratios: native MobileTL/vanilla peak {nm[0] / nv[0]:.3f}; native/eager peak (MobileTL) {nm[0] / em[0]:.3f}; "
            f"eager MobileTL/vanilla peak {em[0] / ev[0]:.3f}; native/eager step time (MobileTL) {nm[2] / em[2]:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
