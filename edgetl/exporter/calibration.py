"""The images an int8 export is calibrated and checked on (:class:`ImageSet`).

Calibration fixes each activation's int8 range, so it must see images like those the device will
see. Decided: by default a seeded subset of the **run's own training images** (evaluation
transform, no augmentation: the device classifies un-augmented images), or the images of a
directory (``--calibration-data``, searched recursively, labels ignored). The check runs on the
run's **validation images** (its ``--val-data``, or the held-out fraction, or Fashion-MNIST's test
split; its ``val_limit`` applied), rebuilt exactly as the trainer built them
(:func:`edgetl.data.folder.build_datasets` with the run's settings and seed).

The manifest records the source, the count, the seed, every image's name (a path relative to the
source, or ``train[i]`` / ``test[i]`` for Fashion-MNIST) and the sha256 of the preprocessed tensor,
so a calibration can be reproduced and compared.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from edgetl.data.folder import FASHION_MNIST, TransformedView, build_datasets, load_image
from edgetl.exporter.errors import ExportError
from edgetl.models.zoo import transforms_for
from edgetl.train.config import FinetuneConfig


@dataclass(frozen=True)
class ImageSet:
    """Preprocessed images (``N x 3 x H x W`` float32, the model's evaluation transform), their
    labels when known, and where they came from."""

    images: Tensor
    labels: Tensor | None
    source: str
    items: list[str]
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.shape[1] != 3 or len(self.images) == 0:
            raise ExportError(f"{self.source}: expected N x 3 x H x W images with N >= 1, got shape {tuple(self.images.shape)}")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ExportError(f"{self.source}: {len(self.labels)} labels for {len(self.images)} images")
        if len(self.items) != len(self.images):
            raise ExportError(f"{self.source}: {len(self.items)} names for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    def sha256(self) -> str:
        """Of the preprocessed float32 tensor's bytes (C order): the exact calibration input."""
        return hashlib.sha256(self.images.contiguous().numpy().tobytes()).hexdigest()


def _name(dataset: Dataset, index: int, fashion_split: str) -> str:
    """``index`` of ``dataset`` (Subsets of a TransformedView of an ImageFolder or Fashion-MNIST) as
    the image's name: its path relative to the folder, or ``split[i]``."""
    while isinstance(dataset, Subset):
        index, dataset = dataset.indices[index], dataset.dataset
    if isinstance(dataset, TransformedView):
        dataset = dataset.base
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return os.path.relpath(samples[index][0], dataset.root)
    return f"{fashion_split}[{index}]"


def _target(dataset: Dataset, index: int) -> int:
    """The label of ``index`` of ``dataset`` (as :func:`_name` finds the image), without decoding it."""
    while isinstance(dataset, Subset):
        index, dataset = dataset.indices[index], dataset.dataset
    if isinstance(dataset, TransformedView):
        dataset = dataset.base
    return int(dataset.targets[index])


def _gather(dataset: Dataset, indices: list[int], source: str, fashion_split: str, seed: int | None, *, labels: bool) -> ImageSet:
    pairs = [dataset[i] for i in indices]
    return ImageSet(
        images=torch.stack([x for x, _ in pairs]).float().contiguous(),
        labels=torch.tensor([y for _, y in pairs], dtype=torch.int64) if labels else None,
        source=source,
        items=[_name(dataset, i, fashion_split) for i in indices],
        seed=seed,
    )


def seeded_subset(n: int, count: int, seed: int) -> list[int]:
    """``count`` of ``range(n)`` (all when ``count >= n``), drawn by ``seed``, in ascending order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[: min(count, n)])


def _run_datasets(config: FinetuneConfig, *, model: str, image_size: int, log: Callable[[str], None]):
    """The run's datasets as its trainer split them, through ``model``'s evaluation transform, and
    its training images (without augmentation)."""
    tf = transforms_for(model, image_size=image_size, train=False)
    data = build_datasets(
        config.data,
        train_transform=tf,
        eval_transform=tf,
        val_data=config.val_data,
        val_fraction=config.val_fraction,
        train_limit=config.train_limit,
        val_limit=config.val_limit,
        seed=config.seed,
        log=log,
    )
    return data, data.train_eval if data.train_eval is not None else data.train


def from_run(
    config: FinetuneConfig, *, model: str, image_size: int, count: int, seed: int, log: Callable[[str], None] = print
) -> tuple[ImageSet, ImageSet]:
    """``(calibration, validation)`` of a fine-tuning run: ``count`` of its training images drawn by
    ``seed``, and its whole validation set with labels, both through ``model``'s evaluation
    transform at ``image_size``."""
    data, train = _run_datasets(config, model=model, image_size=image_size, log=log)
    fashion = config.data == FASHION_MNIST
    calibration = _gather(
        train,
        seeded_subset(len(train), count, seed),
        f"training images of the run ({config.data})",
        "train",
        seed,
        labels=False,
    )
    where = config.val_data or (f"{FASHION_MNIST} test split" if fashion else f"{config.data}, held-out fraction {config.val_fraction}")
    validation = _gather(data.val, list(range(len(data.val))), f"validation images of the run ({where})", "test", None, labels=True)
    return calibration, validation


def replay_from_run(
    config: FinetuneConfig,
    *,
    model: str,
    image_size: int,
    num_classes: int,
    per_class: int,
    seed: int,
    log: Callable[[str], None] = print,
) -> ImageSet:
    """``per_class`` of the run's training images of each class (all of a class with fewer), drawn
    by ``seed`` (:func:`edgetl.exporter.replay.draw_per_class`), with labels, through ``model``'s
    evaluation transform: the replay set's images."""
    from edgetl.exporter.replay import draw_per_class

    _, train = _run_datasets(config, model=model, image_size=image_size, log=log)
    labels = [_target(train, i) for i in range(len(train))]
    if labels and max(labels) >= num_classes:
        raise ExportError(f"the run's training images ({config.data}) have {max(labels) + 1} classes, the model {num_classes}")
    indices = draw_per_class(labels, num_classes, per_class, seed)
    return _gather(train, indices, f"training images of the run ({config.data})", "train", seed, labels=True)


def from_directory(
    root: str | os.PathLike, *, model: str, image_size: int, count: int, seed: int, log: Callable[[str], None] = print
) -> ImageSet:
    """``count`` images under ``root`` (any depth; labels ignored), drawn by ``seed`` from the sorted
    list, through ``model``'s evaluation transform. Unreadable files are skipped with one line."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = Path(root)
    if not root.is_dir():
        raise ExportError(f"calibration data {root} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    tf = transforms_for(model, image_size=image_size, train=False)
    images, items, skipped = [], [], []
    for i in seeded_subset(len(files), count, seed):
        try:
            images.append(tf(load_image(str(files[i]))))
        except (OSError, ValueError) as exc:
            skipped.append(f"{files[i].name} ({type(exc).__name__})")
            continue
        items.append(str(files[i].relative_to(root)))
    if skipped:
        log(f"warning: skipping {len(skipped)} unreadable calibration image(s) in {root}: {', '.join(skipped[:10])}")
    if not images:
        raise ExportError(f"calibration data {root} holds no readable image")
    return ImageSet(torch.stack(images).float().contiguous(), None, str(root), items, seed)
