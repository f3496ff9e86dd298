"""Process memory as the operating system sees it (resident set size), in bytes."""

from __future__ import annotations

import sys

import psutil


def current_rss_bytes() -> int:
    """Resident set size of this process now."""
    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (it only grows within a process).

    Linux: ``VmHWM`` from ``/proc/self/status`` (kB). macOS: ``ru_maxrss`` is in bytes there (and
    in KiB on Linux, hence not used for Linux). Windows: psutil's ``peak_wset``. Elsewhere the
    current RSS is the best lower bound available.
    """
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    if sys.platform == "darwin":
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    info = psutil.Process().memory_info()
    return int(getattr(info, "peak_wset", info.rss))


def reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS; False where that is impossible.

    Linux >= 4.0 only (writing ``5`` to ``/proc/self/clear_refs``); after it, :func:`peak_rss_bytes`
    is the peak since the reset, not since the process started.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
