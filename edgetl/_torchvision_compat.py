"""Make ``import torchvision`` work when its C++ extension cannot load beside this torch.

PyPI's torchvision wheels are CUDA builds; next to a CPU-only torch their ``_C`` library fails to
load and torchvision's import then dies registering fake kernels for ``torchvision::nms`` and
``torchvision::qnms``. edgetl needs only the model zoo, weights enums, datasets and transforms v2,
none of which use those ops, so when (and only when) loading ``_C`` fails we define the two
operator schemas. On a machine with matched wheels nothing here is activated.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import torch

_LIBRARY: torch.library.Library | None = None  # kept alive: dropping it unregisters the schemas


def _extension_loads(package_dir: str) -> bool:
    for path in glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(os.path.join(package_dir, "_C*.pyd")):
        try:
            torch.ops.load_library(path)
            return True
        except (OSError, RuntimeError):
            return False
    return False


def ensure_torchvision_importable() -> bool:
    """Define placeholder ``nms``/``qnms`` schemas if torchvision's ``_C`` cannot load.

    Returns True when the shim was activated.
    """
    global _LIBRARY
    if _LIBRARY is not None:
        return True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    if _extension_loads(os.path.dirname(spec.origin)):
        return False
    try:
        torch.ops.torchvision.nms.default  # noqa: B018 - already defined by someone else
        return False
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY = lib
    return True


ensure_torchvision_importable()
