"""ExecuTorch export: an XNNPACK classifier and a trainable program for on-device fine-tuning.

* :func:`export` - a model and policy to a verified bundle (``edgetl export`` on the command line);
* :class:`ExportBundle` - a bundle on disk (``manifest.json`` and the programs it lists).

Modules: ``pipeline`` (:func:`export`), ``weights`` (checkpoints and device-trained weights into
an architecture), ``inference`` (XNNPACK programs), ``quantize`` (int8 programs and their check against float32),
``calibration`` (the images int8 is calibrated and checked on), ``nhwc`` (the trained top in the form the
training program runs), ``training`` (training program and its verification), ``memory`` (what
the exported backward keeps), ``manifest`` (:class:`~edgetl.exporter.manifest.Manifest`, the
typed ``manifest.json``), ``bundle`` (atomic bundle on disk), ``config`` (:class:`ExportConfig`),
``errors``, and ``_executorch``, the only package touching ExecuTorch's experimental and private
APIs (bundles ship no Python: the device runs them with ``deploy/native``).
"""

import edgetl._torchvision_compat  # noqa: F401  (before any torchvision import in this package)
from edgetl.exporter.bundle import ExportBundle
from edgetl.exporter.config import ExportConfig
from edgetl.exporter.errors import ExecutorchMissingError, ExportError, UnsupportedModelError, VerificationError
from edgetl.exporter.pipeline import export

__all__ = ["ExecutorchMissingError", "ExportBundle", "ExportConfig", "ExportError", "UnsupportedModelError", "VerificationError", "export"]
