"""Argument types and helpers shared by the sub-commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgetl.errors import EdgetlError


def blocks_arg(value: str) -> int | str:
    """K as an integer >= 0, or ``all``."""
    if value == "all":
        return value
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'all', got {value!r}") from None
    if k < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 or 'all', got {k}")
    return k


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def non_negative_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def write_text(path: str, text: str) -> None:
    """Write a user-named output file; an unwritable path is one clear line."""
    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise EdgetlError(f"cannot write {path}: {exc.strerror}") from None
