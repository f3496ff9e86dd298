"""edgetl: on-device transfer learning with inverted residual blocks (MobileTL).

Public API:

* :func:`load_model`, :func:`transforms_for` - architectures, weights and their input pipeline;
* :class:`TrainPolicy`, :func:`prepare` - what trains, applied to a network;
* :class:`FinetuneConfig`, :func:`finetune` - the training loop behind ``edgetl finetune``;
* :class:`FashionMNIST` - the embedded default dataset.
"""

# isort: off
import os
import sys

if "torch" not in sys.modules:
    # OpenMP workers that spin while waiting make small CPU workloads 10-100x slower whenever
    # another process holds a core (a phone or a Pi is never idle); sleeping workers cost little.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# torchvision's C++ ops cannot load beside a CPU-only torch from PyPI; this must run before any
# edgetl module imports torchvision (it does nothing where the wheels match).
from edgetl import _torchvision_compat  # noqa: F401
# isort: on

from edgetl.data.fashion_mnist import FashionMNIST
from edgetl.errors import DataError, EdgetlError, WeightsError
from edgetl.exporter import ExportBundle, export
from edgetl.models.blocks import find_blocks
from edgetl.models.zoo import MODELS, load_model, transforms_for
from edgetl.profiler.device import DeviceProfile, load_device
from edgetl.profiler.planner import plan
from edgetl.profiler.report import MemoryReport, profile
from edgetl.train.policy import TrainPolicy
from edgetl.train.prepare import TransferModel, prepare
from edgetl.train.trainer import FinetuneConfig, FinetuneResult, finetune

__version__ = "0.1.0"

__all__ = [
    "MODELS",
    "DataError",
    "DeviceProfile",
    "EdgetlError",
    "ExportBundle",
    "FashionMNIST",
    "FinetuneConfig",
    "FinetuneResult",
    "MemoryReport",
    "TrainPolicy",
    "TransferModel",
    "WeightsError",
    "export",
    "finetune",
    "find_blocks",
    "load_device",
    "load_model",
    "plan",
    "prepare",
    "profile",
    "transforms_for",
]
