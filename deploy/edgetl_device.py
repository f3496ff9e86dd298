#!/usr/bin/env python3
"""edgetl on the device: classify images and fine-tune on them with an exported bundle.

Needs only numpy, Pillow and the ExecuTorch runtime package (``pip install executorch``, whose
Python bindings load torch's shared libraries); it does not use edgetl or torchvision. The
ExecuTorch calls go through the bundle's own ``et_adapter.py`` (written by ``edgetl export`` for
the ExecuTorch version the programs were made with).

    python3 edgetl_device.py classify  BUNDLE IMAGE... [--trained STATE_DIR]
    python3 edgetl_device.py finetune  BUNDLE DATA_DIR --state STATE_DIR [--epochs N]
    python3 edgetl_device.py info      BUNDLE

``finetune`` trains on DATA_DIR (one subfolder per class, named like the bundle's classes):
features of the frozen bottom come from ``bottom.pte`` (XNNPACK; computed once per image unless
``--augment``), each batch is one step of ``train.pte`` plus ExecuTorch's SGD. After every epoch
the weights (trainable parameters and batch-norm running statistics) are written atomically to
STATE_DIR, so a power cut loses at most the epoch in progress; running it again resumes.
``classify --trained STATE_DIR`` then classifies with those weights (``bottom.pte`` +
``train.pte``'s ``predict`` method over ``STATE_DIR/trained.ptd``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

STATE = "state.json"
TRAINED = "trained.ptd"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


class DeviceError(Exception):
    """A user error: printed as one line, exit code 2."""


# --- bundle ---------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Bundle:
    """An export bundle: manifest, programs and the ExecuTorch adapter it ships."""

    def __init__(self, path: str | os.PathLike, *, check: bool = True) -> None:
        self.path = Path(path)
        try:
            self.manifest = json.loads((self.path / "manifest.json").read_text())
        except FileNotFoundError:
            raise DeviceError(f"{self.path} is not an edgetl bundle (no manifest.json)") from None
        if check:
            for name, meta in self.manifest["files"].items():
                if not (self.path / name).is_file() or sha256(self.path / name) != meta["sha256"]:
                    raise DeviceError(f"bundle file {self.path / name} is missing or damaged (sha256 mismatch)")
        self.et = self._load_adapter()

    def _load_adapter(self):
        spec = importlib.util.spec_from_file_location("edgetl_bundle_et_adapter", self.path / self.manifest["runtime"]["adapter"])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(module)
        try:
            module.require_executorch()
        except ImportError as exc:
            raise DeviceError(str(exc)) from None
        return module

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["model"]["classes"])

    @property
    def training(self) -> dict:
        if "training" not in self.manifest["programs"]:
            raise DeviceError(f"{self.path} has no training program: export it with 'edgetl export --training'")
        return self.manifest["programs"]["training"]

    def file(self, name: str) -> Path:
        return self.path / name


def preprocess(path: Path, spec: dict) -> np.ndarray:
    """The exporter's eval transform in Pillow + numpy: resize the short side, centre-crop, scale
    to 0..1, normalise; 3 x S x S float32."""
    size, short = int(spec["image_size"]), int(spec["resize_short_side"])
    resample = Image.Resampling.BICUBIC if spec.get("interpolation") == "bicubic" else Image.Resampling.BILINEAR
    try:
        img = Image.open(path).convert("RGB")
    except OSError as exc:
        raise DeviceError(f"cannot read image {path}: {exc}") from None
    w, h = img.size
    scale = short / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def in_batches(x: np.ndarray, batch: int):
    """Fixed-size batches (programs have static shapes); the last is zero-padded. Yields (batch, valid)."""
    for start in range(0, len(x), batch):
        chunk = x[start : start + batch]
        valid = len(chunk)
        if valid < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - valid,) + chunk.shape[1:], chunk.dtype)])
        yield chunk, valid


# --- classify -------------------------------------------------------------------------------------


def classify(bundle: Bundle, images: list[Path], *, trained: Path | None, top_k: int) -> list[tuple[Path, list[tuple[str, float]]]]:
    """Top-k classes of each image: with ``model.pte``, or with on-device trained weights
    (``bottom.pte`` + ``train.pte``'s ``predict`` over ``trained``, a state directory or .ptd)."""
    x = np.stack([preprocess(p, bundle.manifest["input"]) for p in images])
    if trained is None:
        program = bundle.et.Program(bundle.file(bundle.manifest["programs"]["inference"]["file"]))
        logits = np.concatenate([program.run("forward", x[i : i + 1])[0] for i in range(len(x))])
    else:
        weights = trained
        if trained.is_dir():  # the state names the last saved epoch's weights
            state_file = trained / STATE
            weights = trained / json.loads(state_file.read_text())["weights"] if state_file.is_file() else trained / TRAINED
        if not weights.is_file():
            raise DeviceError(f"no trained weights at {weights}: run finetune first")
        train = bundle.training
        bottom = bundle.et.Program(bundle.file(bundle.manifest["programs"]["bottom"]["file"]))
        top = bundle.et.Program(bundle.file(train["file"]), weights)
        outs = []
        for chunk, valid in in_batches(x, int(train["batch_size"])):
            outs.append(top.run("predict", bottom.run("forward", chunk)[0])[0][:valid])
        logits = np.concatenate(outs)
    probs = softmax(logits)
    classes = bundle.classes
    result = []
    for path, p in zip(images, probs, strict=True):
        order = np.argsort(-p)[:top_k]
        result.append((path, [(classes[i], float(p[i])) for i in order]))
    return result


# --- fine-tune --------------------------------------------------------------------------------------


def load_folder(bundle: Bundle, data: Path) -> tuple[list[Path], np.ndarray]:
    if not data.is_dir():
        raise DeviceError(f"data folder {data} does not exist")
    classes = bundle.classes
    paths, labels = [], []
    for sub in sorted(p for p in data.iterdir() if p.is_dir()):
        if sub.name not in classes:
            raise DeviceError(f"folder {sub} is not one of the bundle's classes ({', '.join(classes)})")
        for img in list_images(sub):
            paths.append(img)
            labels.append(classes.index(sub.name))
    if not paths:
        raise DeviceError(f"no images in {data} (expected one subfolder per class)")
    return paths, np.asarray(labels, dtype=np.int64)


def finetune(bundle: Bundle, data: Path, state_dir: Path, *, epochs: int, lr: float | None, augment: bool, seed: int,
             stop_after_steps: int | None = None, log=lambda line: print(line, flush=True)) -> dict:
    """Fine-tune on ``data`` for ``epochs`` (resuming from ``state_dir``); returns the saved state."""
    et = bundle.et
    train = bundle.training
    batch = int(train["batch_size"])
    opt = dict(train["optimizer"])
    if lr is not None:
        opt["lr"] = lr
    paths, labels = load_folder(bundle, data)
    if len(paths) < batch:
        raise DeviceError(f"{len(paths)} images is fewer than one training batch of {batch}")
    state_dir.mkdir(parents=True, exist_ok=True)
    base_ptd = bundle.file(train["data"])
    layout = {k: et.TensorSlot.from_dict(v) for k, v in train["weights_layout"].items()}
    state = {"epoch": 0, "history": [], "bundle_ptd_sha256": bundle.manifest["files"][train["data"]]["sha256"], "weights": None}
    if (state_dir / STATE).is_file():
        saved = json.loads((state_dir / STATE).read_text())
        if saved.get("bundle_ptd_sha256") != state["bundle_ptd_sha256"]:
            raise DeviceError(f"{state_dir} holds training state of another bundle; use another --state directory")
        state = saved
    start = int(state["epoch"])
    weights = state_dir / state["weights"] if state["weights"] else base_ptd
    if start >= epochs:
        log(f"already trained for {start} epoch(s); nothing to do (raise --epochs to continue)")
        return state
    if start:
        log(f"resuming after epoch {start} from {weights.name}")

    bottom = et.Program(bundle.file(bundle.manifest["programs"]["bottom"]["file"]))
    spec = bundle.manifest["input"]

    def features_of(idx: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """Bottom features of images ``idx``, randomly flipped when ``rng`` is given."""
        x = np.stack([preprocess(paths[i], spec) for i in idx])
        if rng is not None:  # augmentation: random horizontal flips
            flip = rng.random(len(idx)) < 0.5
            x[flip] = x[flip][..., ::-1]
        return bottom.run("forward", x)[0]

    cache = None
    if not augment:  # the bottom is frozen: one pass over the images serves every epoch
        t0 = time.perf_counter()
        cache = np.concatenate([bottom.run("forward", chunk)[0][:valid] for chunk, valid in
                                in_batches(np.stack([preprocess(p, spec) for p in paths]), batch)])
        log(f"features of {len(paths)} images from bottom.pte in {time.perf_counter() - t0:.1f}s")

    session = et.TrainingSession(bundle.file(train["file"]), weights, buffer_names=train["buffers"])
    sgd = None
    steps_per_epoch = len(paths) // batch  # drop the last partial batch: batch norm trains on batch statistics
    done = 0
    tty, every = sys.stderr.isatty(), max(1, steps_per_epoch // 5)
    for epoch in range(start, epochs):
        rng = np.random.default_rng(seed * 1_000_003 + epoch)  # each epoch's order depends on (seed, epoch) only
        perm = rng.permutation(len(paths))
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for step in range(steps_per_epoch):
            idx = perm[step * batch : (step + 1) * batch]
            feats = cache[idx] if cache is not None else features_of(idx, rng)
            y = labels[idx]
            loss, logits = session.forward_backward(feats, y)[:2]
            if sgd is None:
                sgd = session.sgd(opt["lr"], momentum=opt["momentum"], dampening=opt.get("dampening", 0.0),
                                  weight_decay=opt["weight_decay"], nesterov=opt.get("nesterov", False))
            sgd.step()
            loss_sum += float(loss) * batch
            correct += int((np.asarray(logits).argmax(1) == y).sum())
            seen += batch
            done += 1
            progress = f"epoch {epoch + 1}/{epochs} step {step + 1}/{steps_per_epoch} loss {loss_sum / seen:.4f}"
            if tty:
                print(f"\r{progress}", end="", file=sys.stderr, flush=True)
            elif (step + 1) % every == 0:
                print(progress, file=sys.stderr, flush=True)
            if stop_after_steps is not None and done >= stop_after_steps:
                log(f"stopping after {done} steps without saving (simulated power cut)")
                os._exit(137)
        if tty:
            print(file=sys.stderr)
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "loss": loss_sum / seen, "accuracy": correct / seen, "seconds": seconds,
               "images_per_s": seen / seconds}
        # save: new weights file first (atomic), then the state naming it (atomic), then tidy up
        name = f"weights-epoch{epoch + 1:04d}.ptd"
        et.atomic_write_bytes(state_dir / name, et.write_ptd(base_ptd.read_bytes(), layout, session.state()))
        previous = state.get("weights")
        state = {**state, "epoch": epoch + 1, "weights": name, "history": state["history"] + [row]}
        et.atomic_write_bytes(state_dir / STATE, (json.dumps(state, indent=2) + "\n").encode())
        et.atomic_write_bytes(state_dir / TRAINED, (state_dir / name).read_bytes())
        if previous and previous != name:
            (state_dir / previous).unlink(missing_ok=True)
        log(f"epoch {epoch + 1}/{epochs} loss {row['loss']:.4f} train_acc {100 * row['accuracy']:.1f}% "
            f"{row['images_per_s']:.1f} images/s -> {state_dir / name}")
    return state


# --- command line ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgetl_device", description="Classify and fine-tune on the device with an edgetl bundle.")
    parser.add_argument("--threads", type=int, help="ExecuTorch thread-pool size (default: the runtime's)")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("classify", help="classify images")
    c.add_argument("bundle")
    c.add_argument("images", nargs="+", help="image files or folders")
    c.add_argument("--trained", help="state directory (or .ptd) from finetune: classify with its weights")
    c.add_argument("--top-k", type=int, default=3)
    f = sub.add_parser("finetune", help="fine-tune on a folder of images, one subfolder per class")
    f.add_argument("bundle")
    f.add_argument("data")
    f.add_argument("--state", required=True, help="directory for the trained weights and progress (resumed if present)")
    f.add_argument("--epochs", type=int, default=5)
    f.add_argument("--lr", type=float, help="SGD learning rate (default: the bundle's)")
    f.add_argument("--augment", action="store_true", help="random horizontal flips (recomputes bottom features every step)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)  # tests: simulate a power cut
    i = sub.add_parser("info", help="show what a bundle holds")
    i.add_argument("bundle")
    args = parser.parse_args(argv)
    try:
        bundle = Bundle(args.bundle)
        if args.threads:
            bundle.et.set_threads(args.threads)
        if args.command == "info":
            m = bundle.manifest
            print(json.dumps({"model": m["model"], "input": m["input"], "programs": sorted(m["programs"]),
                              "created": m["created"], "verification": m["verification"]}, indent=2))
        elif args.command == "classify":
            images = []
            for item in map(Path, args.images):
                images.extend(list_images(item) if item.is_dir() else [item])
            if not images:
                raise DeviceError("no images given")
            trained = Path(args.trained) if args.trained else None
            for path, top in classify(bundle, images, trained=trained, top_k=args.top_k):
                print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))
        else:
            finetune(bundle, Path(args.data), Path(args.state), epochs=args.epochs, lr=args.lr, augment=args.augment,
                     seed=args.seed, stop_after_steps=args.stop_after_steps)
    except DeviceError as exc:
        print(f"edgetl_device: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
