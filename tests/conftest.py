"""Shared fixtures: a small learnable image dataset and 'pretrained' stand-in weights.

No weights can be downloaded here, so the stand-in for a pretrained network is a random one whose
batch-norm statistics were calibrated on the data (frozen, uncalibrated random layers would make
activations vanish or blow up through many blocks). The architecture and loading path are real.
"""

from __future__ import annotations

import os

# One math thread: OpenMP's spinning threads slow small CPU workloads by 100x whenever another
# process holds a core (a child process in a test, a parallel job). Inherited by child processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgetl.models.zoo import load_model

torch.set_num_threads(1)

CLASSES = ("red", "green", "blue")


def make_image_folder(root: Path, per_class: int = 24, size: int = 24, seed: int = 0) -> Path:
    """Class k: images whose channel k is bright, with noise and a random blob (learnable, not trivial)."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 120, size=(size, size, 3)).astype(np.uint8)
            y, x = rng.integers(0, size // 2, size=2)
            img[y : y + size // 2, x : x + size // 2, k] = rng.integers(170, 255)
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "train")


def calibrate(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Set every batch norm's statistics to those of ``model``'s activations on ``x``."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    return model.eval()


def calibrated_model(name: str, folder: Path, image_size: int = 32) -> torch.nn.Module:
    """A random ``name`` whose norm statistics match ``folder``'s images."""
    from torchvision.datasets import ImageFolder

    from edgetl.models.zoo import transforms_for

    torch.manual_seed(0)
    model = load_model(name, num_classes=len(CLASSES))
    data = ImageFolder(str(folder), transform=transforms_for(name, image_size=image_size, train=False))
    return calibrate(model, torch.stack([data[i][0] for i in range(len(data))]))


@pytest.fixture(scope="session")
def pretrained_file(tmp_path_factory, image_folder):
    """``pretrained_file(name)`` -> path of a calibrated state dict for architecture ``name``."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            path = tmp_path_factory.mktemp("weights") / f"{name}.pt"
            torch.save(calibrated_model(name, image_folder).state_dict(), path)
            cache[name] = path
        return cache[name]

    return get
