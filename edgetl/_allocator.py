"""Which ``malloc`` an edgetl process runs on: the C library's (glibc) or jemalloc, preloaded.

PyTorch's CPU tensors come from ``malloc``. glibc keeps freed chunks in its heaps and arenas, where
requests of other sizes cannot reuse them, so a step's peak RSS follows the order and sizes of its
allocations more than the bytes alive, and it varies from run to run. Measured side by side
(``benchmarks/allocator.py``; figures in docs/memory.md):

* ``jemalloc`` (its own settings: freed pages go back to the OS after ~10 s) lowers every
  configuration's peak by 5-10%, for about 10% more wall time in a whole ``edgetl finetune``;
* ``jemalloc-eager`` (:data:`EAGER_CONF`: freed pages go back at once) makes the process follow the
  live tensor bytes the profiler predicts, with the lowest peak, the same to the MiB in every run,
  at a cost in step time (the pages a step frees are faulted in again by the next).

The allocator is chosen before the process starts: the dynamic loader links ``malloc`` once, so
the only way is ``LD_PRELOAD`` in the environment of a new process. :func:`process_env` builds that
environment (the profiler's child processes); :func:`reexec_argv` tells the ``edgetl`` command
whether to re-execute itself under it before anything else is imported. Importing this module
changes nothing.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from edgetl.errors import ConfigError

#: the choices: ``auto`` is ``jemalloc`` where the library is installed, ``glibc`` otherwise
ALLOCATORS: tuple[str, ...] = ("auto", "glibc", "jemalloc", "jemalloc-eager")
#: the default everywhere (``edgetl finetune``, the profiler's child processes): the measurements'
#: choice. jemalloc's saving costs time (~10% plain, 1.3-1.8x eager) and plain jemalloc does not make
#: the process follow the prediction, so memory is traded for time only when the user asks
#: (docs/memory.md, "Which malloc")
DEFAULT = "glibc"
#: ``jemalloc-eager``: freed pages are returned to the OS at once (``dirty_decay_ms:0``), not after
#: 10 s, and never parked as lazily-freed pages, which still count as resident (``muzzy_decay_ms:0``)
EAGER_CONF = "dirty_decay_ms:0,muzzy_decay_ms:0"
#: where Debian/Ubuntu (libjemalloc2), Fedora and Alpine put the library
_JEMALLOC_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib/arm-linux-gnueabihf", "/usr/lib64", "/usr/lib")
_JEMALLOC_NAME = "libjemalloc.so.2"
#: set in the environment of a re-executed ``edgetl``: the allocator it asked for (no second re-exec)
MARK = "EDGETL_ALLOCATOR"


@dataclass(frozen=True)
class Allocator:
    """A resolved choice: ``name`` is ``"glibc"``, ``"jemalloc"`` or ``"jemalloc-eager"``; ``library`` jemalloc's path."""

    name: str
    library: str | None = None
    note: str = ""  # why ``auto`` fell back to glibc, for the log

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) changed so that a new process runs on this allocator."""
        env = dict(os.environ if base is None else base)
        preload = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if "jemalloc" not in Path(p).name]
        if self.name != "glibc":
            preload.insert(0, self.library or _JEMALLOC_NAME)
        if self.name == "jemalloc-eager":
            env["MALLOC_CONF"] = EAGER_CONF
        elif env.get("MALLOC_CONF") == EAGER_CONF:  # inherited from an eager parent
            del env["MALLOC_CONF"]
        if preload:
            env["LD_PRELOAD"] = " ".join(preload)
        else:
            env.pop("LD_PRELOAD", None)
        env[MARK] = self.name
        return env


def find_jemalloc() -> str | None:
    """Path (or soname) of an installed jemalloc, or None. Linux only: elsewhere None."""
    if not sys.platform.startswith("linux"):
        return None
    for d in _JEMALLOC_DIRS:
        if (Path(d) / _JEMALLOC_NAME).is_file():
            return str(Path(d) / _JEMALLOC_NAME)
    found = ctypes.util.find_library("jemalloc")  # the loader's cache: a soname the loader finds
    return found or None


def resolve(name: str = DEFAULT) -> Allocator:
    """The allocator ``name`` asks for on this machine.

    Raises:
        ConfigError: an unknown name, or ``"jemalloc"`` where it is not installed.
    """
    if name not in ALLOCATORS:
        raise ConfigError(f"unknown allocator {name!r}; expected one of {', '.join(ALLOCATORS)}")
    if name == "glibc":
        return Allocator("glibc")
    library = find_jemalloc()
    if library is None:
        if name != "auto":
            raise ConfigError(
                f"allocator {name!r} needs the jemalloc library, which is not installed (Debian/Ubuntu: apt-get install libjemalloc2); "
                "or use glibc"
            )
        return Allocator("glibc", note="jemalloc is not installed (apt-get install libjemalloc2): running on glibc's malloc")
    return Allocator("jemalloc-eager" if name == "jemalloc-eager" else "jemalloc", library)


def active() -> str:
    """The allocator this process runs on: ``"jemalloc"`` if it is mapped (``"jemalloc-eager"`` with
    :data:`EAGER_CONF`), else ``"glibc"``."""
    try:
        with open("/proc/self/maps") as maps:
            mapped = any("libjemalloc" in line for line in maps)
    except OSError:
        return "glibc"
    if not mapped:
        return "glibc"
    return "jemalloc-eager" if os.environ.get("MALLOC_CONF") == EAGER_CONF else "jemalloc"


def reexec_argv(allocator: Allocator, argv: list[str]) -> list[str] | None:
    """The command line to re-execute this ``edgetl`` process with, or None to run as it is.

    None when the process already runs on ``allocator``, or when it was re-executed for it once
    already (the loader then refused the library; no loop).
    """
    if allocator.name == active() or os.environ.get(MARK) == allocator.name:
        return None
    return [sys.executable, "-m", "edgetl", *argv]
