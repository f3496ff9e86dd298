"""Forgetting on the device, with and without the bundle's replay set, side by side in one run.

The workstation fine-tunes ImageNet EfficientNet-Lite0 (MobileTL, K=4, 96 px) on Fashion-MNIST
classes 0-4; ``edgetl export --training --replay-per-class M`` writes one bundle with a replay set.
The device (``edgetl-device finetune``) then trains on its own photos of only some of those
classes (default: T-shirt_top and Trouser, training images the workstation never saw), once per
``--replay-ratio`` (0 = no replay), from the same bundle. Each result is classified by the device
(``edgetl-device classify --trained``) on held-out test photos of all five classes: accuracy on the
classes the device trained on, and on the others (retention), against the bundle before any
device training.

    .venv/bin/python benchmarks/replay.py [--work DIR] [--per-class 20] [--ratios 0 0.25 0.5] [--lrs 0.01 0.001]

Needs the native runner (``deploy/native/build.sh deploy/native/build``). About 7 minutes on 2
shared cores, most of it the workstation's fine-tune and the export; with ``--work DIR`` a second
run reuses DIR's workstation run and the bundle of the same ``--per-class`` (the device rows, a
few seconds each, are always run again).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "deploy" / "native" / "build" / "edgetl-device"
KNOWN = range(5)  # the workstation's classes


def _write(dataset, out: Path, indices: list[int]) -> Path:
    """``indices`` of ``dataset`` as an image folder with only the classes present."""
    from edgetl.data.fashion_mnist import write_image_folder

    write_image_folder(dataset, out, indices=indices)
    for d in out.iterdir():
        if not any(d.iterdir()):
            d.rmdir()
    return out


def _pick(dataset, classes, per_class: int, start: int) -> list[int]:
    """The first ``per_class`` images of each of ``classes`` from index ``start`` on."""
    taken = {c: [] for c in classes}
    for i in range(start, len(dataset)):
        c = int(dataset.targets[i])
        if c in taken and len(taken[c]) < per_class:
            taken[c].append(i)
    return sorted(i for v in taken.values() for i in v)


def _accuracy(bundle: Path, photos: Path, trained: Path | None, device_classes: set[str]) -> tuple[float, float]:
    """(accuracy on the device's classes, accuracy on the other known classes), in percent."""
    cmd = [str(RUNNER), "classify", str(bundle), str(photos), "--json", "--top-k", "1"]
    if trained is not None:
        cmd += ["--trained", str(trained)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    hits: dict[bool, list[bool]] = {True: [], False: []}
    for line in out.splitlines():
        row = json.loads(line)
        truth = Path(row["path"]).parent.name
        hits[truth in device_classes].append(row["top"][0]["label"] == truth)
    return tuple(100.0 * sum(h) / len(h) for h in (hits[True], hits[False]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, help="keep everything here (default: a temporary directory)")
    p.add_argument("--per-class", type=int, default=20, help="replay images per known class (default: %(default)s)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5], help="device --replay-ratio values (default: %(default)s)")
    p.add_argument("--device-classes", type=int, nargs="+", default=[0, 1], help="its photos' classes (default: %(default)s)")
    p.add_argument("--device-photos", type=int, default=100, help="device photos per device class (default: %(default)s)")
    p.add_argument("--device-epochs", type=int, default=3, help="(default: %(default)s)")
    p.add_argument("--lrs", nargs="+", default=["0.01", "0.001"], help="device SGD learning rates (default: %(default)s)")
    p.add_argument("--train-per-class", type=int, default=300, help="workstation training images per class (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=2, help="workstation epochs (default: %(default)s)")
    p.add_argument("--test-per-class", type=int, default=100, help="held-out test photos per class (default: %(default)s)")
    args = p.parse_args()
    if not RUNNER.exists():
        sys.exit(f"{RUNNER} is missing: build it with deploy/native/build.sh deploy/native/build")
    if args.work is None:
        with tempfile.TemporaryDirectory() as tmp:
            _run(args, Path(tmp))
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        _run(args, args.work)


def _run(args: argparse.Namespace, work: Path) -> None:
    from edgetl import FinetuneConfig, TrainPolicy, finetune
    from edgetl.data.fashion_mnist import CLASSES, FashionMNIST

    train, test = FashionMNIST(split="train"), FashionMNIST(split="test")
    # workstation: the first images of classes 0-4; the device: later training images of its classes
    data = _write(train, work / "workstation", _pick(train, KNOWN, args.train_per_class, 0))
    val = _write(test, work / "val", _pick(test, KNOWN, 50, 0))
    device = _write(train, work / "device", _pick(train, args.device_classes, args.device_photos, 30000))
    held_out = _write(test, work / "held-out", _pick(test, KNOWN, args.test_per_class, 5000))
    device_classes = {CLASSES[c] for c in args.device_classes}

    t0 = time.perf_counter()
    run = work / "run"
    config = FinetuneConfig(
        model="efficientnet_lite0",
        weights="DEFAULT",
        data=str(data),
        val_data=str(val),
        policy=TrainPolicy(blocks=4),
        epochs=args.epochs,
        batch_size=32,
        lr=1e-3,
        image_size=96,
        out=str(run),
    )
    reused = (run / "model.pt").exists()
    if not reused:
        finetune(config)
    fit = "reused" if reused else f"{time.perf_counter() - t0:.0f} s"
    bundle = work / f"bundle-m{args.per_class}"
    t0 = time.perf_counter()
    reused = (bundle / "manifest.json").exists()
    if not reused:
        export = [sys.executable, "-m", "edgetl", "export", "--checkpoint", str(run), "--out", str(bundle), "--force"]
        export += ["--training", "--batch-size", "8", "--replay-per-class", str(args.per_class)]
        subprocess.run(export, check=True, capture_output=True, text=True)
    exported = "reused" if reused else f"{time.perf_counter() - t0:.0f} s"
    replay = json.loads((bundle / "manifest.json").read_text())["replay"]

    before = _accuracy(bundle, held_out, None, device_classes)
    rows = []
    for lr in args.lrs:
        for ratio in args.ratios:
            state = work / f"state-m{args.per_class}-lr{lr}-r{ratio:g}"
            shutil.rmtree(state, ignore_errors=True)
            cmd = [str(RUNNER), "finetune", str(bundle), str(device), "--state", str(state), "--epochs", str(args.device_epochs)]
            t0 = time.perf_counter()
            subprocess.run([*cmd, "--lr", lr, "--replay-ratio", str(ratio)], check=True, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            history = json.loads((state / "state.json").read_text())["history"]
            peak = max(h["peak_rss_bytes"] for h in history)
            rows.append((lr, ratio, *_accuracy(bundle, held_out, state, device_classes), peak, seconds))

    n_dev = len(args.device_classes) * args.device_photos
    print(
        f"\nFashion-MNIST, EfficientNet-Lite0 (ImageNet) K=4 MobileTL, 96 px. Workstation: classes 0-4, "
        f"{args.train_per_class}/class, {args.epochs} epochs ({fit}), export with --replay-per-class {args.per_class} "
        f"({exported}): replay.bin {replay['count']} rows, {replay['bytes']} bytes ({replay['bytes_per_row']} per row), "
        f"int8 against float32 features: max |error| {replay['max_abs_error']:.3g}, relative rms {replay['relative_rms_error']:.3g}.\n"
        f"Device: {n_dev} photos of {', '.join(sorted(device_classes))} only, {args.device_epochs} epochs, batch 8, "
        f"SGD momentum 0.9. Accuracy on {args.test_per_class} held-out test photos per class.\n"
    )
    print("| device fine-tune | lr | device classes | other known classes (retention) | peak RSS | wall time |")
    print("|---|---|---|---|---|---|")
    print(f"| none (the bundle) | | {before[0]:.1f}% | {before[1]:.1f}% | | |")
    for lr, ratio, dev, other, peak, seconds in rows:
        label = "no replay (--replay-ratio 0)" if ratio == 0 else f"--replay-ratio {ratio:g} ({int(8 * ratio + 0.5)} of 8 rows)"
        print(f"| {label} | {lr} | {dev:.1f}% | {other:.1f}% | {peak / 2**20:.1f} MiB | {seconds:.1f} s |")


if __name__ == "__main__":
    main()
