"""Argument types and helpers shared by the sub-commands."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from edgetl.errors import EdgetlError


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, refused with a one-line usage error otherwise."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {n}")
        return n

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def blocks_arg(value: str) -> int | str:
    """K as an integer >= 0, or ``all``."""
    return value if value == "all" else non_negative_int(value)


def given(**values: object) -> dict[str, object]:
    """The flags the user gave (argparse leaves the others None): overrides for ``dataclasses.replace``
    or keyword arguments, so every default stays on the config type or function that owns it."""
    return {k: v for k, v in values.items() if v is not None}


def write_text(path: str, text: str) -> None:
    """Write a user-named output file; an unwritable path is one clear line."""
    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise EdgetlError(f"cannot write {path}: {exc.strerror}") from None
