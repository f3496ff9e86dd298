"""Errors the exporter reports to users (all :class:`edgetl.EdgetlError`, so the CLI prints one line)."""

from __future__ import annotations

from edgetl.errors import EdgetlError


class ExportError(EdgetlError):
    """An export could not be made (bad input, unsupported model, failed self-check)."""


class ExecutorchMissingError(ExportError):
    """ExecuTorch is not installed (or not importable) here."""


class UnsupportedModelError(ExportError):
    """The model holds a layer or operator the exporter (or ExecuTorch) cannot express."""


class VerificationError(ExportError):
    """An exported program does not reproduce eager PyTorch within the stated tolerance."""
