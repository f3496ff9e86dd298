"""Sizes for people: bytes are integers everywhere inside edgetl and become KiB/MiB only here, when printed."""

from __future__ import annotations


def format_size(nbytes: int) -> str:
    """Human-readable binary size, for printing only."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}" if unit == "GiB" else f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"
