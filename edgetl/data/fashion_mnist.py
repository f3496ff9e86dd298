"""Fashion-MNIST from its idx files: 70,000 real 28x28 grayscale clothing photos, 10 classes.

Debian's ``dataset-fashion-mnist`` package installs the files under
:data:`DEBIAN_DIR`; any directory holding the four ``*-ubyte[.gz]`` files works too.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from edgetl.errors import DataError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_DTYPE = {0x08: np.uint8}


def default_root() -> Path:
    """``$EDGETL_FASHION_MNIST`` if set, else the Debian package's directory."""
    return Path(os.environ.get("EDGETL_FASHION_MNIST", DEBIAN_DIR))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (optionally gzipped) into a uint8 array, checking its header and length."""
    path = Path(path)
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read idx file {path}: {exc}") from None
    if len(raw) < 4:
        raise DataError(f"{path} is not an idx file (only {len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code not in _IDX_DTYPE or not 1 <= ndim <= 4:
        raise DataError(f"{path} is not an unsigned-byte idx file (bad magic {raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"{path} holds {len(raw) - header} data bytes but its header {dims} says {expected}: truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. "
        "Install Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist) or pass its directory."
    )


class FashionMNIST(Dataset):
    """Fashion-MNIST as a torchvision-style dataset of ``(image, label)``.

    Images are ``tv_tensors.Image`` uint8 ``1 x 28 x 28``; give ``transform`` (e.g.
    :func:`edgetl.transforms_for`, whose ``RGB`` step replicates the gray channel to three and whose
    resize sets the image size) to get model input.
    """

    classes = list(CLASSES)

    def __init__(self, root: str | os.PathLike | None = None, *, split: str = "train", transform=None) -> None:
        if split not in _FILES:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        root = Path(root) if root is not None else default_root()
        images = read_idx(_find(root, _FILES[split][0]))
        labels = read_idx(_find(root, _FILES[split][1]))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"Fashion-MNIST {split} files in {root} disagree: images {images.shape}, labels {labels.shape}")
        if labels.size and labels.max() >= len(CLASSES):
            raise DataError(f"Fashion-MNIST {split} labels in {root} go up to {labels.max()}, expected < {len(CLASSES)}")
        self.images = torch.from_numpy(images.copy())
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = tv_tensors.Image(self.images[index].unsqueeze(0))
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


def write_image_folder(dataset: FashionMNIST, out_dir: str | os.PathLike, indices=None) -> Path:
    """Write (a subset of) ``dataset`` as an ``ImageFolder`` tree of PNGs: ``out_dir/<class>/<i>.png``."""
    from PIL import Image

    out = Path(out_dir)
    for name in dataset.classes:
        (out / name).mkdir(parents=True, exist_ok=True)
    for i in range(len(dataset)) if indices is None else indices:
        label = int(dataset.targets[i])
        Image.fromarray(dataset.images[i].numpy(), mode="L").save(out / dataset.classes[label] / f"{i:05d}.png")
    return out
