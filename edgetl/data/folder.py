"""Training and validation datasets: a user's ``ImageFolder`` tree, or the embedded Fashion-MNIST.

Each folder is scanned once: one torchvision ``ImageFolder`` per root, shared by the training
view (augmenting transforms) and the evaluation view (deterministic transforms) through
:class:`TransformedView`, never modified after torchvision builds it.

Unreadable images: decided to **skip them, with one warning line per folder**. While the folder is
scanned, every file with an image extension is decoded in full by :func:`load_image` (the loader
training and evaluation use), through ``ImageFolder``'s ``is_valid_file``. A full decode, not PIL's
``verify()``: a truncated JPEG passes ``verify()`` and only fails once its pixels are read
(``OSError: image file is truncated``, naming no file), which would kill a run mid-epoch. Files that
fail are left out and reported as one line,
``warning: skipping N unreadable image(s) in ROOT: FILE (reason), ...``, through the ``log``
callable of :func:`build_datasets`: the trainer passes its own progress log; the default prints to
stderr. (Not ``warnings.warn``: that prints the Python source line and repeats per call site.)
A class left without any readable image is a :class:`~edgetl.errors.DataError`.

Cost: the up-front check decodes every image once more than training does; for the datasets
fine-tuned on a device (hundreds to a few thousand images) that is seconds.

What is a class, what is an image: the classes are the subfolders of the root (a link to a
directory counts, unless it leads back to the root or into another class: refused), hidden ones
(``.ipynb_checkpoints``, ``.git``) left out; a folder of one class is refused. Under a class
folder every file is listed, but links to directories are not followed, as the device runner lists
a class (``list_images`` in ``deploy/native/src/files.cpp``): a link ``loop -> ..`` neither
repeats images under another label nor walks forever, and both sides see the same dataset.
Image dimensions are read from the header and checked against :mod:`edgetl.data.limits` before
any pixel is decoded; an image beyond them is skipped like an unreadable one.

Pixel depth: :func:`load_image` scales 16-bit grayscale (PIL modes ``I;16*`` and ``I``) to 8 bits
(``value >> 8``) before the RGB conversion, which would otherwise clip nearly every pixel to white.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from edgetl.data.fashion_mnist import FashionMNIST
from edgetl.data.limits import image_size_problem
from edgetl.errors import DataError

if TYPE_CHECKING:
    from PIL import Image

#: ``--data`` value selecting the embedded default dataset.
FASHION_MNIST = "fashion-mnist"
#: at most this many skipped files are named in the warning line (then "and N more")
_NAMED_SKIPS = 10


@dataclass
class Datasets:
    train: Dataset
    val: Dataset
    classes: list[str]
    train_eval: Dataset | None = None  # the training images with eval transforms (feature cache)


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def load_image(path: str) -> Image.Image:
    """Decode ``path`` in full into an 8-bit RGB PIL image (``ImageFolder``'s ``loader``).

    16-bit grayscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, and ``I``, PIL's 32-bit integer
    mode, read as 16-bit values clipped to 0..65535) becomes 8-bit by ``value >> 8``, then RGB by
    replicating the channel. Everything else goes through PIL's ``convert("RGB")`` as in
    torchvision's default loader. Raises what PIL raises for an unreadable file (``OSError`` for a
    truncated one), and :class:`~edgetl.errors.DataError` for dimensions beyond
    :mod:`edgetl.data.limits`, read from the header before any pixel is decoded.
    """
    from PIL import Image

    with open(path, "rb") as f:
        image = Image.open(f)  # reads the header only
        problem = image_size_problem(*image.size)
        if problem:
            raise DataError(f"image too large, not decoded: {problem}")
        image.load()  # decode every pixel now: a truncated file fails here, inside the with
        if image.mode.startswith("I;16") or image.mode == "I":
            wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
            image = Image.fromarray((wide >> 8).astype(np.uint8))
        return image.convert("RGB")


class TransformedView(Dataset):
    """``base`` (an untransformed dataset of ``(image, target)`` with ``classes``) with ``transform``
    applied to each image. The training and evaluation views of one folder share its file list
    and its scan.
    """

    def __init__(self, base: Dataset, transform: Callable | None) -> None:
        self.base, self.transform = base, transform

    @property
    def classes(self) -> list[str]:
        return self.base.classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, target = self.base[index]
        return (self.transform(image) if self.transform is not None else image), target


def _one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _class_names(root: Path) -> list[str]:
    """The class folders of ``root``, sorted: its subdirectories (links to directories included),
    hidden ones (``.ipynb_checkpoints``, ``.git``) left out."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files_under(class_dir: str) -> list[str]:
    """Every file under ``class_dir``, in torchvision's order. Links to directories below it are
    not followed (as the device runner's listing): a link back up (``loop -> ..``) neither repeats
    nor relabels images, nor walks forever. Links to files are files."""
    return [os.path.join(top, name) for top, _, names in sorted(os.walk(class_dir, followlinks=False)) for name in sorted(names)]


class ImageTree(ImageFolder):
    """torchvision's ``ImageFolder`` over :func:`_class_names` and :func:`_files_under`."""

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        classes = _class_names(Path(directory))
        return classes, {name: i for i, name in enumerate(classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False) -> list[tuple[str, int]]:
        valid = is_valid_file or (lambda path: has_file_allowed_extension(path, extensions))
        return [
            (path, class_to_idx[name])
            for name in sorted(class_to_idx)
            for path in _files_under(os.path.join(directory, name))
            if valid(path)
        ]


def _refuse_overlapping_classes(root: Path, class_dirs: list[str]) -> None:
    """A class folder that is a link must not lead back to the data folder (or above it) nor into
    another class: its images would be counted twice, under two labels."""
    real = {name: (root / name).resolve() for name in class_dirs}
    top = root.resolve()
    for name, path in real.items():
        if path == top or path in top.parents:
            raise DataError(f"class folder {root / name} links back to the data folder {root} (its images would be counted twice)")
        for other, other_path in real.items():
            if other != name and (other_path == path or path in other_path.parents):
                raise DataError(f"class folders {root / name} and {root / other} overlap (its images would be counted twice)")


def _image_folder(root: str | os.PathLike, log: Callable[[str], None]) -> ImageFolder:
    """One ``ImageFolder`` over ``root`` (no transform), unreadable images left out and logged."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    class_dirs = _class_names(root)
    if not class_dirs:
        raise DataError(f"data folder {root} has no class subfolders (expected {root}/<class>/<image>)")
    if len(class_dirs) == 1:
        raise DataError(f"data folder {root} has one class ({class_dirs[0]}); a classifier needs two or more class subfolders")
    _refuse_overlapping_classes(root, class_dirs)
    for name in class_dirs:
        if not any(has_file_allowed_extension(f, IMG_EXTENSIONS) for f in _files_under(str(root / name))):
            raise DataError(f"class '{name}' in {root} has no images ({', '.join(IMG_EXTENSIONS)})")

    skipped: dict[str, str] = {}  # path -> why it cannot be read

    def is_valid_file(path: str) -> bool:
        if not has_file_allowed_extension(path, IMG_EXTENSIONS):
            return False
        try:
            load_image(path)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            skipped[path] = _one_line(exc)
            return False
        return True

    dataset = ImageTree(str(root), loader=load_image, is_valid_file=is_valid_file, allow_empty=True)
    if skipped:
        named = [f"{path} ({why})" for path, why in list(skipped.items())[:_NAMED_SKIPS]]
        more = len(skipped) - len(named)
        log(f"warning: skipping {len(skipped)} unreadable image(s) in {root}: {', '.join(named)}{f' and {more} more' if more else ''}")
    present = set(dataset.targets)
    empty = [c for i, c in enumerate(dataset.classes) if i not in present]
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
    log: Callable[[str], None] = _stderr_line,
) -> Datasets:
    """Training and validation sets with their transforms.

    ``data`` is an ``ImageFolder`` directory or ``"fashion-mnist"`` (its training split trains, its
    test split validates). For a folder, ``val_data`` names a separate validation folder; without
    it ``val_fraction`` of the images are held out (fixed by ``seed``; 0: none, ``val`` is empty,
    for a caller that holds out its own). ``train_limit`` /
    ``val_limit`` keep a seeded random subset. Each root is read once; ``log`` receives the one
    warning line per folder that had unreadable images (default: printed to stderr).
    """
    if data == FASHION_MNIST:
        base: Dataset = FashionMNIST(split="train")
        val = FashionMNIST(split="test", transform=eval_transform)
    else:
        base = _image_folder(data, log)
        val = None
        if val_data is not None:
            val_folder = _image_folder(val_data, log)
            if val_folder.classes != base.classes:
                raise DataError(f"validation classes {val_folder.classes} differ from training classes {base.classes}")
            val = TransformedView(val_folder, eval_transform)
    classes = list(base.classes)
    train: Dataset = TransformedView(base, train_transform)
    train_eval: Dataset = TransformedView(base, eval_transform)
    if val is None:
        train_idx, val_idx = _split(len(base), val_fraction, seed) if val_fraction else (list(range(len(base))), [])
        train, val = Subset(train, train_idx), Subset(train_eval, val_idx)
        train_eval = Subset(train_eval, train_idx)
    if train_limit is not None and train_limit < len(train):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        keep = sorted(order[:train_limit])
        train, train_eval = Subset(train, keep), Subset(train_eval, keep)
    val = _limit(val, val_limit, seed + 1)
    return Datasets(train=train, val=val, classes=classes, train_eval=train_eval)
