"""Process memory as the operating system sees it (resident set size, memory still available
to the process), in bytes."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import psutil

#: a cgroup v1 limit at or above this is "no limit" (the kernel writes 2**63 rounded to a page)
_NO_CGROUP_LIMIT = 2**60


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


def available_memory_bytes(
    *, cgroup_root: str | os.PathLike = "/sys/fs/cgroup", proc_cgroup: str | os.PathLike = "/proc/self/cgroup"
) -> int:
    """Memory this process can still obtain: the least of the machine's available memory
    (``MemAvailable``), the headroom under the process's address-space limit (``RLIMIT_AS``,
    ``ulimit -v``: the limit less the address space already mapped) and the headroom under its
    cgroup's memory limit, at every level up to the root (v2: ``memory.max`` less
    ``memory.current``; v1: ``memory.limit_in_bytes`` less ``memory.usage_in_bytes``; the page
    cache's inactive files count as free in both)."""
    limits = [int(psutil.virtual_memory().available)]
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY:
        limits.append(max(0, soft - int(psutil.Process().memory_info().vms)))
    headroom = cgroup_headroom_bytes(Path(cgroup_root), Path(proc_cgroup))
    if headroom is not None:
        limits.append(headroom)
    return min(limits)


def cgroup_headroom_bytes(root: Path, proc_cgroup: Path) -> int | None:
    """The least headroom under a memory limit of this process's cgroups (see
    :func:`available_memory_bytes`); None where no limit is set or cgroups cannot be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    candidates: list[tuple[Path, str]] = []  # (the process's cgroup directory, version)
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        relative = path.strip().lstrip("/")
        if hierarchy == "0" and controllers == "":
            candidates += [(root / relative, "v2"), (root / "unified" / relative, "v2")]
        elif "memory" in controllers.split(","):
            candidates += [(root / "memory" / relative, "v1")]
            candidates += [(root / "memory", "v1")]  # in a cgroup namespace the mount is the process's own cgroup
    best: int | None = None
    for leaf, version in candidates:
        top = root / "memory" if version == "v1" else (root / "unified" if leaf.is_relative_to(root / "unified") else root)
        directory = leaf
        while directory.is_dir():
            room = _cgroup_room(directory, version)
            if room is not None:
                best = room if best is None else min(best, room)
            if directory == top or directory == directory.parent:
                break
            directory = directory.parent
    return best


def _cgroup_room(directory: Path, version: str) -> int | None:
    limit_file, usage_file, inactive = (
        ("memory.max", "memory.current", "inactive_file")
        if version == "v2"
        else ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    )
    try:
        limit_text = (directory / limit_file).read_text().strip()
        usage = int((directory / usage_file).read_text().strip())
    except (OSError, ValueError):
        return None
    if limit_text == "max" or not limit_text.isdigit() or int(limit_text) >= _NO_CGROUP_LIMIT:
        return None
    reclaimable = 0
    try:
        for line in (directory / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive and value.strip().isdigit():
                reclaimable = int(value)
    except OSError:
        pass
    return max(0, int(limit_text) - max(0, usage - reclaimable))
