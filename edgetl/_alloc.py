"""The C allocator's policy for training processes (glibc only; elsewhere nothing changes).

glibc serves a large ``malloc`` with ``mmap`` only above a threshold that it raises on its own each
time such a block is freed (up to 32 MiB). After the first training step most activation-sized
tensors therefore come from the heap, whose freed memory stays resident and fragments, and how
much depends on the order of frees: that made the same ``edgetl finetune`` peak 80 MiB apart from
run to run, and hid MobileTL's saving in the process's peak. A fixed threshold keeps every tensor
of :data:`MMAP_THRESHOLD` bytes or more in its own mapping, returned to the system when freed, so
the resident size follows the live bytes. It costs page faults on those allocations (measured in
``benchmarks/peak_rss.py``).

It is a process-wide setting, so it is the application's decision: the ``edgetl`` command and the
profiler's child process call :func:`configure_allocator`; a program of your own may too, or set
``MALLOC_MMAP_THRESHOLD_`` in its environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: tensors at least this large get their own mapping (a 64 x 64 x 64 float map is 1 MiB)
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD = -1


def configure_allocator(mmap_threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (and trim freed heap tops of that size); False where not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, mmap_threshold))
