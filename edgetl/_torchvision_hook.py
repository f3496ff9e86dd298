"""Run the torchvision shim (:mod:`edgetl._torchvision_compat`) before *anyone's* ``import torchvision``.

``scripts/setup.sh`` installs a one-line ``.pth`` file calling :func:`install` into an environment
where plain ``import torchvision`` fails (PyPI's CUDA torchvision beside a CPU-only torch), so a
user's program that imports torchvision before edgetl works too. Installing costs one finder on
``sys.meta_path``; torch is imported only when torchvision is.
"""

from __future__ import annotations

import importlib.abc
import sys


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # noqa: ANN001 - the MetaPathFinder protocol
        if name == "torchvision":
            sys.meta_path.remove(self)  # once; the shim itself imports torch, not torchvision
            import edgetl._torchvision_compat  # noqa: F401
        return None  # the regular finders import the module


def install() -> None:
    if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
