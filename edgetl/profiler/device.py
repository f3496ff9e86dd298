"""Device profiles: how much memory a real device can give to training, as validated TOML.

A profile (``device_profiles/*.toml``) looks like::

    name = "Raspberry Pi 4 Model B (4 GB)"
    memory_total = "4GiB"          # physical RAM
    memory_budget = "3GiB"         # what a training process can realistically use
    safety_margin = 0.15           # fraction of the budget kept free (estimate error, page cache)
    runtime_overhead = "360MiB"    # optional: interpreter + framework, resident before the model
    cores = 4
    arch = "aarch64"
    cpu = "4x Cortex-A72 @ 1.8 GHz"  # optional
    unified_memory = false           # optional: CPU and GPU share this RAM
    gemm_gflops = 24.0               # optional: edgetl-gemm-bench's sgemm rate on all cores
    memory_gbps = 4.0                # optional: edgetl-gemm-bench's copy bandwidth on all cores
    notes = "why the budget is what it is"

Sizes are an integer number of bytes or a string ``<number><unit>`` with a unit from
:data:`UNITS` (``"1.5GiB"``, ``"350MiB"``, ``"2GB"``); anything else (``"1.5G"``, ``"1.5 gib"``,
fractions of a byte) is an error. Unknown keys are errors too, so a typo cannot silently fall back
to a default. Every error names the file and the field. With both rates, ``edgetl plan --runtime
native`` predicts the device's step time (:mod:`edgetl.profiler.step_time`); measure them on the
device with ``deploy/native``'s ``edgetl-gemm-bench CORES 1 1024 1024 1024 0 0`` and ``... copy 64``.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from edgetl._format import format_size
from edgetl.errors import EdgetlError

UNITS: dict[str, int] = {
    "B": 1,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
    "kB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
}
ARCHES: tuple[str, ...] = ("aarch64", "armv7l", "armv6l", "x86_64", "riscv64")
#: Resident memory of a Python process training with PyTorch eager before any model is loaded:
#: interpreter + torch/torchvision/edgetl imports (~304 MiB on x86-64 Linux, torch 2.13 CPU) plus
#: what the first training step faults in (kernel code, thread pools; ~40 MiB). Recalibrate on a
#: device with :func:`edgetl.profiler.process_peak.calibrate_runtime`.
PYTORCH_RUNTIME_OVERHEAD = 344 * 2**20

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s?(" + "|".join(UNITS) + r")")


class DeviceProfileError(EdgetlError, ValueError):
    """A device profile is missing, unreadable or does not follow the schema."""


def parse_size(value: Any, *, field: str = "size", where: str = "") -> int:
    """Bytes from an int or a string like ``"1.5GiB"`` (strict: see the module docstring)."""
    prefix = f"{where}: " if where else ""
    if isinstance(value, bool):
        raise DeviceProfileError(f"{prefix}field {field!r} must be a size, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise DeviceProfileError(f"{prefix}field {field!r} must not be negative, got {value}")
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match:
            try:
                nbytes = Decimal(match.group(1)) * UNITS[match.group(2)]
            except InvalidOperation:  # pragma: no cover - the regex admits only plain decimals
                nbytes = Decimal("NaN")
            if nbytes == nbytes.to_integral_value():
                return int(nbytes)
            raise DeviceProfileError(f"{prefix}field {field!r} = {value!r} is not a whole number of bytes")
    raise DeviceProfileError(
        f"{prefix}field {field!r} must be bytes (an integer) or a size like '1.5GiB' (units: {', '.join(UNITS)}), got {value!r}"
    )


@dataclass(frozen=True)
class DeviceProfile:
    """A device's memory for training. Sizes in bytes.

    ``usable_bytes`` = ``memory_budget`` x (1 - ``safety_margin``): what the planner lets a
    configuration's predicted peak (runtime included) reach.
    """

    name: str
    memory_total: int
    memory_budget: int
    safety_margin: float
    cores: int
    arch: str
    notes: str
    cpu: str = ""
    unified_memory: bool = False
    runtime_overhead: int = PYTORCH_RUNTIME_OVERHEAD
    #: sustained sgemm GFLOP/s and copy GB/s on all cores (0: not measured)
    gemm_gflops: float = 0.0
    memory_gbps: float = 0.0
    path: str = ""

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_budget * (1.0 - self.safety_margin))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "usable_bytes": self.usable_bytes}


def _require(values: dict[str, Any], field: str, kind: type | tuple[type, ...], where: str) -> Any:
    if field not in values:
        raise DeviceProfileError(f"{where}: missing required field {field!r}")
    value = values[field]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise DeviceProfileError(f"{where}: field {field!r} must be {names}, got {type(value).__name__} {value!r}")
    return value


_REQUIRED = ("name", "memory_total", "memory_budget", "safety_margin", "cores", "arch", "notes")
_OPTIONAL = ("cpu", "unified_memory", "runtime_overhead", "gemm_gflops", "memory_gbps")


def device_from_dict(values: dict[str, Any], *, where: str = "device profile") -> DeviceProfile:
    """Validate a parsed profile table and build the :class:`DeviceProfile`."""
    unknown = sorted(set(values) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise DeviceProfileError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; expected {', '.join(_REQUIRED + _OPTIONAL)}")
    name = _require(values, "name", str, where).strip()
    if not name:
        raise DeviceProfileError(f"{where}: field 'name' must not be empty")
    for field in ("memory_total", "memory_budget"):
        _require(values, field, (int, str), where)
    total = parse_size(values["memory_total"], field="memory_total", where=where)
    budget = parse_size(values["memory_budget"], field="memory_budget", where=where)
    if budget <= 0:
        raise DeviceProfileError(f"{where}: field 'memory_budget' must be > 0")
    if budget > total:
        raise DeviceProfileError(f"{where}: field 'memory_budget' ({format_size(budget)}) exceeds 'memory_total' ({format_size(total)})")
    margin = float(_require(values, "safety_margin", (float, int), where))
    if not 0.0 <= margin < 1.0:
        raise DeviceProfileError(f"{where}: field 'safety_margin' must be a fraction in [0, 1), got {margin}")
    cores = _require(values, "cores", int, where)
    if cores < 1:
        raise DeviceProfileError(f"{where}: field 'cores' must be >= 1, got {cores}")
    arch = _require(values, "arch", str, where)
    if arch not in ARCHES:
        raise DeviceProfileError(f"{where}: field 'arch' must be one of {', '.join(ARCHES)}, got {arch!r}")
    notes = _require(values, "notes", str, where).strip()
    if not notes:
        raise DeviceProfileError(f"{where}: field 'notes' must say where the budget comes from")
    cpu = _require(values, "cpu", str, where) if "cpu" in values else ""
    unified = _require(values, "unified_memory", bool, where) if "unified_memory" in values else False
    runtime = PYTORCH_RUNTIME_OVERHEAD
    if "runtime_overhead" in values:
        _require(values, "runtime_overhead", (int, str), where)
        runtime = parse_size(values["runtime_overhead"], field="runtime_overhead", where=where)
    rates = {}
    for field in ("gemm_gflops", "memory_gbps"):
        if field in values:
            rates[field] = float(_require(values, field, (float, int), where))
            if not 0 < rates[field] < float("inf"):
                raise DeviceProfileError(f"{where}: field {field!r} must be a positive number, got {values[field]!r}")
    return DeviceProfile(name, total, budget, margin, cores, arch, notes, cpu, unified, runtime, path=where, **rates)


def load_device(path: str | os.PathLike) -> DeviceProfile:
    """Read and validate the device profile TOML at ``path``.

    Raises:
        DeviceProfileError: (an :class:`~edgetl.errors.EdgetlError`) for a missing or unreadable
            file, invalid TOML, or a missing, unknown or mistyped field (the message names it).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DeviceProfileError(f"device profile not found: {p}") from None
    except OSError as exc:
        raise DeviceProfileError(f"cannot read device profile {p}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise DeviceProfileError(f"device profile {p} is not UTF-8 text (byte {exc.start})") from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DeviceProfileError(f"{p}: not valid TOML: {exc}") from None
    return device_from_dict(values, where=str(p))
