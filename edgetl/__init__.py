"""edgetl: on-device transfer learning with inverted residual blocks (MobileTL).

Public API:

* :func:`load_model`, :func:`transforms_for` - architectures, weights and their input pipeline;
* :class:`TrainPolicy`, :func:`prepare` - what trains, applied to a network;
* :class:`FinetuneConfig`, :func:`finetune` - the training loop behind ``edgetl finetune``;
* :func:`profile`, :func:`plan` - memory per block and the configuration that fits a device;
* :class:`ExportConfig`, :func:`export` - a verified bundle of ExecuTorch programs for the device;
* :class:`FashionMNIST` - the embedded default dataset.

Importing ``edgetl`` loads nothing heavy and changes nothing: each name is imported from its module
on first use (PEP 562), so ``edgetl.cli`` can set the OpenMP policy before torch loads.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that owns it
_EXPORTS: dict[str, str] = {
    "MODELS": "edgetl.models.zoo",
    "load_model": "edgetl.models.zoo",
    "transforms_for": "edgetl.models.zoo",
    "find_blocks": "edgetl.models.blocks",
    "FashionMNIST": "edgetl.data.fashion_mnist",
    "DataError": "edgetl.errors",
    "EdgetlError": "edgetl.errors",
    "WeightsError": "edgetl.errors",
    "TrainPolicy": "edgetl.train.policy",
    "TransferModel": "edgetl.train.prepare",
    "prepare": "edgetl.train.prepare",
    "FinetuneConfig": "edgetl.train.trainer",
    "FinetuneResult": "edgetl.train.trainer",
    "finetune": "edgetl.train.trainer",
    "Run": "edgetl.train.run",
    "DeviceProfile": "edgetl.profiler.device",
    "load_device": "edgetl.profiler.device",
    "plan": "edgetl.profiler.planner",
    "MemoryReport": "edgetl.profiler.report",
    "profile": "edgetl.profiler.report",
    "ExportBundle": "edgetl.exporter",
    "ExportConfig": "edgetl.exporter",
    "export": "edgetl.exporter",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edgetl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
