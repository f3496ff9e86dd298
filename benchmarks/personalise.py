"""Personalisation on the device: new classes from a few photos, without forgetting the old ones
(a benchmark, not a test).

    python benchmarks/personalise.py [--shots 5,10,20] [--epochs 5] [--threads 2] [--work /tmp/edgetl-personalise]

The workstation fine-tunes ImageNet EfficientNet-Lite0 (MobileTL, K=4, 96 px, Adam, 3 epochs) on
the five Fashion-MNIST classes T-shirt/top, Trouser, Pullover, Dress and Coat (300 training photos
each), and exports it for the device with 5 spare classes and a replay set of
``--replay-per-class`` photos of each known class twice: the MobileTL top (K=4) and the classifier
alone (K=0).
The device (``deploy/native/build/edgetl-device``, a fresh process per setting) then learns the
other five classes (Sandal, Shirt, Sneaker, Bag, Ankle boot) from ``shots`` photos each, for every
``--shots``:

* **imprint**: ``finetune --epochs 0`` (the new classes' outputs imprinted, no training step);
* **head only**: the K=0 bundle, imprinting then ``--epochs`` epochs on the new photos alone;
* **head only + replay**: the same with the bundle's replay set mixed into every batch (``--replay-ratio``);
* **top-K**, **top-K + replay**: the same two with the K=4 bundle (MobileTL's top trained);
* **NCM** (in Python, no training): nearest class mean (cosine) over the frozen features, the
  classifier's input of the workstation's model; old classes' means from the replay set's photos.

Accuracy is top-1 over all ten classes on held-out Fashion-MNIST test photos (100 per class):
new-class accuracy on the five new classes, old-class accuracy on the five known ones, against
the workstation model's own old-class accuracy before the device touched it, and the old classes'
accuracy among the old outputs alone (what forgetting changes, apart from old photos now taken for
a confusable new class: a Shirt for a T-shirt). Device figures: the
runner's peak RSS (its VmHWM, ``--verbose``) and wall time per setting, x86-64, ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EDGETL = [sys.executable, "-m", "edgetl"]
RUNNER = ROOT / "deploy" / "native" / "build" / "edgetl-device"
MiB = 2**20
OLD, NEW = range(5), range(5, 10)


def run(cmd: list[str]) -> tuple[float, str, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0, r.stdout, r.stderr


def write_folder(dataset, out: Path, per_class: dict[int, range | list[int]]) -> Path:
    """``per_class[label]``-th images of each label (in dataset order) as ``out/<class>/<i>.png``."""
    from PIL import Image

    targets = dataset.targets.numpy()
    for label, picks in per_class.items():
        (out / dataset.classes[label]).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(targets == label)[list(picks)]:
            Image.fromarray(dataset.images[i].numpy(), mode="L").save(out / dataset.classes[label] / f"{i:05d}.png")
    return out


def device(threads: int, *args: str | Path) -> tuple[float, str, str]:
    return run([str(RUNNER), "--threads", str(threads), *map(str, args)])


def accuracies(threads: int, bundle: Path, photos: Path, names: list[str], trained: Path | None = None) -> dict[str, float]:
    """Top-1 accuracy on the old and on the new classes' held-out photos (all outputs compete), and
    on the old ones among the old outputs alone (``old_only``: what forgetting changes, apart from
    old photos now taken for a new class)."""
    cmd = ["classify", bundle, photos, "--top-k", "10", "--json", *(["--trained", trained] if trained else [])]
    rows = [json.loads(line) for line in device(threads, *cmd)[1].splitlines()]
    old_names = {names[i] for i in OLD}
    out = {}
    for part, labels in (("old", OLD), ("new", NEW)):
        mine = [r for r in rows if Path(r["path"]).parent.name in {names[i] for i in labels}]
        out[part] = 100.0 * sum(r["top"][0]["label"] == Path(r["path"]).parent.name for r in mine) / len(mine)
        if part == "old":
            best = [next(t["label"] for t in r["top"] if t["label"] in old_names) for r in mine]
            out["old_only"] = 100.0 * sum(b == Path(r["path"]).parent.name for b, r in zip(best, mine, strict=True)) / len(mine)
    return out


def finetune(threads: int, bundle: Path, photos: Path, state: Path, *extra: str) -> dict[str, float]:
    shutil.rmtree(state, ignore_errors=True)
    wall, _, err = device(threads, "--verbose", "finetune", bundle, photos, "--state", state, *extra)
    return {"peak_bytes": float(re.findall(r"peak ([\d.]+) MiB", err)[-1]) * MiB, "wall_s": wall}


def ncm(run_dir: Path, replay: Path, shots: Path, held_out: Path, names: list[str]) -> dict[str, float]:
    """Nearest class mean over the workstation model's classifier input (cosine)."""
    import torch
    from PIL import Image

    import edgetl
    from edgetl.models.zoo import classifier_linear
    from edgetl.train.run import read_weights

    trained = read_weights(str(run_dir))
    model = edgetl.load_model(trained.model_name, num_classes=trained.num_classes)
    model.load_state_dict(trained.state_dict)
    model.eval()
    tf = edgetl.transforms_for(trained.model_name, image_size=96, train=False)
    captured: list[torch.Tensor] = []
    classifier_linear(model)[2].register_forward_pre_hook(lambda _m, args: captured.append(args[0]))

    def features(folder: Path) -> dict[str, torch.Tensor]:
        out = {}
        for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
            x = torch.stack([tf(Image.open(f).convert("RGB")) for f in sorted(cls.iterdir())])
            captured.clear()
            with torch.no_grad():
                model(x)
            out[cls.name] = torch.nn.functional.normalize(captured[0], dim=1)
        return out

    means = {**features(replay), **features(shots)}
    order = sorted(means)
    centres = torch.nn.functional.normalize(torch.stack([means[c].mean(0) for c in order]), dim=1)
    test = features(held_out)
    acc = {}
    old_names = [names[i] for i in OLD]
    old_rows = [order.index(c) for c in old_names]
    for part, labels in (("old", OLD), ("new", NEW)):
        right = total = only = 0
        for c in (names[i] for i in labels):
            scores = test[c] @ centres.T
            right += int((scores.argmax(1) == order.index(c)).sum())
            if part == "old":
                only += int((scores[:, old_rows].argmax(1) == old_names.index(c)).sum())
            total += len(test[c])
        acc[part] = 100.0 * right / total
        if part == "old":
            acc["old_only"] = 100.0 * only / total
    return acc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shots", default="5,10,20", help="photos per new class (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=5, help="device epochs after imprinting (default: %(default)s)")
    p.add_argument("--replay-per-class", type=int, default=100, help="replay photos per known class (default: %(default)s)")
    p.add_argument("--replay-ratio", type=float, default=0.5, help="replay rows per device batch (default: %(default)s)")
    p.add_argument("--optimizer", default="adamw", choices=("sgd", "adamw"), help="the device's optimizer (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-4, help="the device's learning rate (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="ExecuTorch threads of the device runner (default: %(default)s)")
    p.add_argument("--work", default="/tmp/edgetl-personalise", help="run, bundles and photos, reused (default: %(default)s)")
    args = p.parse_args()
    if not RUNNER.is_file():
        raise SystemExit(f"no device runner at {RUNNER}: bash deploy/native/build.sh deploy/native/build")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from edgetl.data.fashion_mnist import FashionMNIST

    train, test = FashionMNIST(split="train"), FashionMNIST(split="test")
    names = list(train.classes)
    data, held_out = work / "workstation", work / "held-out"
    if not held_out.is_dir():
        write_folder(train, data, {c: range(300) for c in OLD})
        write_folder(test, held_out, {c: range(100) for c in range(10)})
    run_dir = work / "run"
    if not (run_dir / "model.pt").is_file():
        print("workstation: fine-tuning Lite0 on the 5 old classes ...", flush=True)
        seconds, *_ = run(
            [*EDGETL, "finetune", "--model", "efficientnet_lite0", "--weights", "DEFAULT", "--data", str(data),
             "--val-fraction", "0.1", "--blocks", "4", "--epochs", "3", "--batch-size", "32", "--image-size", "96",
             "--optimizer", "adam", "--lr", "1e-3", "--label-smoothing", "0.1", "--out", str(run_dir)]
        )  # fmt: skip
        print(f"  {seconds:.0f}s", flush=True)
    bundles = {"topk": work / "bundle-k4", "head": work / "bundle-k0"}
    for key, bundle in bundles.items():
        if not (bundle / "manifest.json").is_file():
            print(f"exporting {bundle.name} ...", flush=True)
            extra = ["--replay-per-class", str(args.replay_per_class), *([] if key == "topk" else ["--blocks", "0"])]
            cmd = [*EDGETL, "export", "--checkpoint", str(run_dir), "--out", str(bundle), "--training", "--batch-size", "8"]
            seconds, *_ = run([*cmd, "--spare-classes", "5", "--force", *extra])
            print(f"  {seconds:.0f}s", flush=True)
    before = accuracies(args.threads, bundles["topk"], held_out, names)
    print(f"workstation model (5 classes), old-class accuracy on held-out photos: {before['old']:.1f}%", flush=True)
    replay = work / "replay-photos"  # NCM's old-class means: as many photos per class as the replay set holds
    if not replay.is_dir():
        write_folder(train, replay, {c: range(args.replay_per_class) for c in OLD})

    train_args = ["--epochs", str(args.epochs), "--seed", "0", "--optimizer", args.optimizer, "--lr", str(args.lr)]
    replay_ratio = ["--replay-ratio", str(args.replay_ratio)]
    settings = {
        "imprint": ("topk", ["--epochs", "0"]),
        "head only": ("head", [*train_args, "--replay-ratio", "0"]),
        "head only + replay": ("head", [*train_args, *replay_ratio]),
        "top-K": ("topk", [*train_args, "--replay-ratio", "0"]),
        "top-K + replay": ("topk", [*train_args, *replay_ratio]),
    }
    rows = []
    for shots in map(int, args.shots.split(",")):
        photos = work / f"shots-{shots}"
        if not photos.is_dir():  # the device's own photos: from the training split, past the workstation's
            write_folder(train, photos, {c: range(1000, 1000 + shots) for c in NEW})
        for setting, (key, extra) in settings.items():
            state = work / f"state-{shots}-{key}-{setting.replace(' ', '')}"
            r = finetune(args.threads, bundles[key], photos, state, *extra)
            r.update(accuracies(args.threads, bundles[key], held_out, names, trained=state))
            rows.append((shots, setting, r))
            print(f"{shots} shots, {setting}: " + " ".join(f"{k}={v:.4g}" for k, v in r.items()), flush=True)
        rows.append((shots, "NCM (Python)", ncm(run_dir, replay, photos, held_out, names)))

    print(
        f"\nLite0 from ImageNet, 5 old classes (workstation, K=4, 96 px), 5 new classes on the device; {args.epochs} epochs, "
        f"batch 8, {args.optimizer} lr {args.lr}; "
        f"replay {args.replay_per_class} photos per old class at ratio {args.replay_ratio}; "
        f"held-out: 100 test photos per class; old-class accuracy before: {before['old']:.1f}%; {args.threads} threads, x86-64"
    )
    print(
        "| photos per new class | setting | new-class top-1 | old-class top-1 (change) | old among old outputs | device peak RSS | wall |"
    )
    print("|---|---|---|---|---|---|---|")
    for shots, setting, r in rows:
        device_cells = f"{r['peak_bytes'] / MiB:.0f} MiB | {r['wall_s']:.1f} s" if "peak_bytes" in r else "| "
        change = f"{r['old']:.1f}% ({r['old'] - before['old']:+.1f})"
        print(f"| {shots} | {setting} | {r['new']:.1f}% | {change} | {r['old_only']:.1f}% | " + device_cells + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
