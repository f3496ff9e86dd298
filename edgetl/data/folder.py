"""Training and validation datasets: a user's ``ImageFolder`` tree, or the embedded Fashion-MNIST.

Corrupt images: decided to **skip with a warning**. Every file is checked once, up front, with
PIL's ``verify`` (header and structure, no decoding); unreadable ones are listed and left out, so a
bad file never kills a run mid-epoch. A class left with no readable image is an error.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from edgetl.data.fashion_mnist import FashionMNIST
from edgetl.errors import DataError

#: ``--data`` value selecting the embedded default dataset.
FASHION_MNIST = "fashion-mnist"


@dataclass
class Datasets:
    train: Dataset
    val: Dataset
    classes: list[str]
    train_eval: Dataset | None = None  # the training images with eval transforms (feature cache)


def _readable(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # noqa: BLE001 - PIL raises many types for bad files
        return False


def _image_folder(root: str | os.PathLike, transform) -> ImageFolder:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    class_dirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"data folder {root} has no class subfolders (expected {root}/<class>/<image>)")
    for name in class_dirs:
        if not any(f.suffix.lower() in IMG_EXTENSIONS for f in (root / name).rglob("*") if f.is_file()):
            raise DataError(f"class '{name}' in {root} has no images ({', '.join(IMG_EXTENSIONS)})")
    dataset = ImageFolder(str(root), transform=transform)
    bad = [path for path, _ in dataset.samples if not _readable(path)]
    if bad:
        shown = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
        warnings.warn(f"skipping {len(bad)} unreadable image(s) in {root}: {shown}", stacklevel=2)
        dataset.samples = [s for s in dataset.samples if s[0] not in set(bad)]
        dataset.imgs = dataset.samples
        dataset.targets = [t for _, t in dataset.samples]
        empty = [c for i, c in enumerate(dataset.classes) if i not in set(dataset.targets)]
        if empty:
            raise DataError(f"class(es) {', '.join(empty)} in {root} have no readable image")
    return dataset


def _split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"validation fraction must be in (0, 1), got {val_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise DataError(f"cannot split {n} images into training and validation")
    return sorted(order[n_val:]), sorted(order[:n_val])


def _limit(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise DataError(f"subset size must be >= 1, got {limit}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, sorted(order[:limit]))


def build_datasets(
    data: str,
    *,
    train_transform,
    eval_transform,
    val_data: str | None = None,
    val_fraction: float = 0.1,
    train_limit: int | None = None,
    val_limit: int | None = None,
    seed: int = 0,
) -> Datasets:
    """Training and validation sets with their transforms.

    ``data`` is an ``ImageFolder`` directory or ``"fashion-mnist"`` (its training split trains, its
    test split validates). For a folder, ``val_data`` names a separate validation folder; without
    it ``val_fraction`` of the images are held out (fixed by ``seed``). ``train_limit`` /
    ``val_limit`` keep a seeded random subset.
    """
    if data == FASHION_MNIST:
        train = FashionMNIST(split="train", transform=train_transform)
        train_eval = FashionMNIST(split="train", transform=eval_transform)
        val = FashionMNIST(split="test", transform=eval_transform)
        classes = list(train.classes)
    else:
        train = _image_folder(data, train_transform)
        train_eval = _image_folder(data, eval_transform)
        classes = list(train.classes)
        if val_data is not None:
            val = _image_folder(val_data, eval_transform)
            if val.classes != classes:
                raise DataError(f"validation classes {val.classes} differ from training classes {classes}")
        else:
            train_idx, val_idx = _split(len(train), val_fraction, seed)
            train, val = Subset(train, train_idx), Subset(train_eval, val_idx)
            train_eval = Subset(train_eval, train_idx)
    if train_limit is not None and train_limit < len(train):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        keep = sorted(order[:train_limit])
        train, train_eval = Subset(train, keep), Subset(train_eval, keep)
    val = _limit(val, val_limit, seed + 1)
    return Datasets(train=train, val=val, classes=classes, train_eval=train_eval)
