"""The device runs what was verified: a deep-K bundle per family, one epoch on the device against eager.

    .venv/bin/python benchmarks/device_epoch.py [--work DIR] [--images 80] [--families v2,v3,lite0] [--blocks v2=14]

For each family (MobileNetV2 at K = all, random initialisation; MobileNetV3-Large at K=14, random
initialisation; EfficientNet-Lite0 at K=12 with its ImageNet weights; 96 px, batch 8, SGD lr 0.01
momentum 0.9) it exports the training bundle with ``edgetl.export`` (which verifies 3 steps),
fine-tunes it for one epoch of ``--images`` Fashion-MNIST photos with ``edgetl-device finetune
--threads 1``, and checks:

* the device's trained weights and running statistics equal, bit for bit, the same epoch run
  through ExecuTorch's Python bindings on the same programs (features from ``bottom.pte``, the
  runner's documented shuffle);
* that epoch, step by step, against eager PyTorch with the exporter's verification
  (``training.verify_training`` over the epoch's real batches: its tolerances, the program's masks
  replayed where they differ by rounding).

One row per family: steps, bit-identical or not, the largest loss, weight and statistic
differences, replayed mask elements, seconds. The native runner is built with
``deploy/native/build.sh`` if needed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAMILIES = {
    "v2": ("mobilenet_v2", 17, None),
    "v3": ("mobilenet_v3_large", 14, None),
    "lite0": ("efficientnet_lite0", 12, "DEFAULT"),
}
IMAGE_SIZE, BATCH = 96, 8


def runner() -> Path:
    exe = ROOT / "deploy/native/build/edgetl-device"
    if not exe.is_file():
        subprocess.run(["bash", str(ROOT / "deploy/native/build.sh"), str(ROOT / "deploy/native/build")], check=True)
    return exe


def one(work: Path, family: str, data: Path, exe: Path, blocks: int | None = None) -> dict:
    import edgetl
    from edgetl.data.fashion_mnist import FashionMNIST
    from edgetl.exporter import _executorch as et
    from edgetl.exporter import training
    from tests.test_native import epoch_order, images_of

    name, k, weights = FAMILIES[family]
    k = blocks or k
    torch.manual_seed(0)
    model = edgetl.load_model(name, weights=weights, num_classes=10)
    policy = edgetl.TrainPolicy(blocks=k)
    bundle = work / f"{family}-k{k}-bundle"
    t0 = time.perf_counter()
    if not (bundle / "manifest.json").is_file():
        config = edgetl.ExportConfig(image_size=IMAGE_SIZE, batch_size=BATCH, training=True)
        edgetl.export(model, policy, bundle, config, model_name=name, classes=FashionMNIST(split="test").classes, log=lambda _: None)
    state = work / f"{family}-k{k}-state"
    r = subprocess.run(
        [str(exe), "--threads", "1", "finetune", str(bundle), str(data), "--state", str(state), "--epochs", "1"],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    device = et.read_ptd((state / "trained.ptd").read_bytes())

    manifest = json.loads((bundle / "manifest.json").read_text())
    train = manifest["programs"]["training"]
    classes = manifest["model"]["classes"]
    paths = images_of(data)
    labels = np.array([classes.index(p.parent.name) for p in paths])
    from PIL import Image

    tf = edgetl.transforms_for(name, image_size=IMAGE_SIZE, train=False)
    x = np.stack([tf(Image.open(p).convert("RGB")).numpy() for p in paths])
    bottom = et.Program(bundle / "bottom.pte")
    feats = np.concatenate([bottom.run("forward", x[i : i + BATCH])[0] for i in range(0, len(x), BATCH)])
    order = epoch_order(len(paths), seed=0, epoch=0)
    batches = [np.array(order[s * BATCH : (s + 1) * BATCH]) for s in range(len(paths) // BATCH)]

    opt = train["optimizer"]
    et.load_native_kernels()  # the bundle's depthwise operators, as the device links them
    session = et.TrainingSession(bundle / "train.pte", bundle / "train.ptd", buffer_names=train["buffers"])
    sgd = None
    for idx in batches:
        session.forward_backward(feats[idx], labels[idx])
        sgd = sgd or session.sgd(opt["lr"], momentum=opt["momentum"], weight_decay=opt["weight_decay"])
        sgd.step()
    python = session.state()
    identical = all(np.array_equal(device[n].reshape(-1), np.asarray(v).reshape(-1)) for n, v in python.items())

    net = edgetl.prepare(model, policy)
    ptd = (bundle / "train.ptd").read_bytes()
    program = et.TrainingProgram(pte=(bundle / "train.pte").read_bytes(), ptd=ptd, layout=et.ptd_slots(ptd), planned_bytes={}, operators={})
    ex = training.TrainingExport(
        program,
        train["trainable_parameters"],
        train["buffers"],
        tuple(train["methods"]["forward"]["inputs"][0]["shape"]),
        len(classes),
        [],
        0.0,
        train["loss"]["label_smoothing"],
        bool(train["custom_operators"]),
    )
    row = {"family": family, "model": name, "K": k, "steps": len(batches), "bit_identical": identical}
    try:
        check = training.verify_training(
            net,
            ex,
            bundle / "train.pte",
            bundle / "train.ptd",
            lr=opt["lr"],
            momentum=opt["momentum"],
            weight_decay=opt["weight_decay"],
            batches=[(torch.from_numpy(feats[idx]), torch.from_numpy(labels[idx])) for idx in batches],
        )
        row.update(
            verified=True,
            loss=check.loss_max_abs_diff,
            weights=check.weight_max_abs_diff,
            running_stats=check.running_stats_max_abs_diff,
            mask_flips=check.mask_flips,
        )
    except training.VerificationError as exc:
        row.update(verified=False, reason=str(exc))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-device-epoch"))
    ap.add_argument("--images", type=int, default=80)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--blocks", default="", help="K per family instead of the default, e.g. v2=14,lite0=16")
    args = ap.parse_args(argv)
    from edgetl.data.fashion_mnist import FashionMNIST, write_image_folder

    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / f"photos-{args.images}"
    if not data.is_dir():
        write_image_folder(FashionMNIST(split="test"), data, indices=range(9000, 9000 + args.images))
    exe = runner()
    print("| family | model | K | steps | device = bindings | eager, step by step | loss | weights | running stats | masks | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    blocks = {f: int(k) for f, k in (item.split("=") for item in args.blocks.split(",") if item)}
    for family in args.families.split(","):
        r = one(args.work, family, data, exe, blocks.get(family))
        if r["verified"]:
            masks = "plain" if r["mask_flips"] is None else f"{r['mask_flips']} replayed"
            tail = f"verified | {r['loss']:.2g} | {r['weights']:.2g} | {r['running_stats']:.2g} | {masks}"
        else:
            tail = "refused (below) | | | |"
        same = "yes" if r["bit_identical"] else "NO"
        print(f"| {family} | {r['model']} | {r['K']} | {r['steps']} | {same} | {tail} | {r['seconds']:.0f} |", flush=True)
        if not r["verified"]:
            print(f"  {family}: {r['reason']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
