"""Crash-safe files: everything is written to a temporary file in the same directory, flushed to
disk, then renamed over the target, so a reader (or a resume after ``kill -9``) sees either the old
file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from edgetl.errors import EdgetlError, FileWriteError

# torch is imported by the two functions that need it: the torch-free device fleet client uses
# plain_name.


def plain_name(name: object, what: str, error: type[EdgetlError] = EdgetlError) -> str:
    """``name`` when it is a plain file name (a non-empty string, no ``/``, not ``.`` or ``..``, no
    NUL byte); else ``error`` naming ``what``. Every file name read from a manifest or a state
    passes here before it is joined to a directory, so none reaches outside it (the device runner
    checks the same in ``deploy/native/src/files.cpp`` ``plain_name``)."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        raise error(f"{what}: {name!r} is not a plain file name (no '/', not '..', not empty)")
    return name


def _umask() -> int:
    """The process's umask, read without changing it (Linux); else the usual 0o022."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, and rename it to ``path``.

    The file gets the permissions the user's umask gives a new file (``mkstemp`` alone would make
    it 0600). A failure to write (full disk, read-only directory, file-size limit) raises
    :class:`~edgetl.errors.FileWriteError` naming ``path``; the old file, if any, is untouched and
    the temporary is removed.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        # torch.save's zip writer reports a short write as "[enforce fail at inline_container.cc...]"
        if isinstance(exc, RuntimeError) and "inline_container" not in str(exc):
            raise
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "the disk is full or the file too large"
        raise FileWriteError(f"cannot write {path}: {reason}") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def temp_prefix(path: Path) -> str:
    """Prefix of :func:`atomic_write`'s temporaries for ``path`` (hidden files beside it)."""
    return f".{path.name}."


def remove_stale_temporaries(path: Path) -> None:
    """Remove temporaries a killed writer left beside ``path``."""
    for tmp in path.parent.glob(f"{temp_prefix(path)}*.tmp"):
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` atomically. Keep ``obj`` to tensors, numbers, strings, lists and dicts so it
    loads back with ``weights_only=True``."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def load_torch(path: str | os.PathLike) -> Any:
    """Load a file written by :func:`save_torch`, never unpickling arbitrary objects."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)
