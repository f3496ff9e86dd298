"""Crash-safe files: everything is written to a temporary file in the same directory, flushed to
disk, then renamed over the target, so a reader (or a resume after ``kill -9``) sees either the old
file or the new one, never half of one. Also the two things every writer of a directory shares:
file digests (sha256) and the directory lock (one writer per directory)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from edgetl.errors import DirectoryLockedError, EdgetlError, FileWriteError

#: the lock file inside a locked directory (the device runner uses the same name and content)
LOCK_FILE = ".edgetl.lock"

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


def umask() -> int:
    """The process's umask, read without changing it (Linux); else the usual 0o022."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, before_replace: Callable[[Path], None] | None = None
) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, and rename it to ``path``.
    ``before_replace(tmp)`` runs on the complete temporary just before the rename (to record its
    digest, say).

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
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(Path(tmp))
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


def save_torch(path: str | os.PathLike, obj: Any, *, before_replace: Callable[[Path], None] | None = None) -> Path:
    """``torch.save`` atomically (``before_replace`` as in :func:`atomic_write`). Keep ``obj`` to
    tensors, numbers, strings, lists and dicts so it loads back with ``weights_only=True``."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f), before_replace=before_replace)


def load_torch(path: str | os.PathLike) -> Any:
    """Load a file written by :func:`save_torch`, never unpickling arbitrary objects."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def lock_directory(directory: str | os.PathLike) -> int:
    """Lock ``directory`` (created if missing) for this process; returns the lock's descriptor,
    for :func:`unlock_directory`.

    The lock is ``flock(LOCK_EX | LOCK_NB)`` on :data:`LOCK_FILE` inside it, which then holds the
    holder's pid as decimal text and a newline. It is advisory (it binds edgetl's writers, Python
    and the device runner alike) and the kernel drops it when the process ends, however it ends:
    ``kill -9`` leaves no stale lock. The file itself stays. A directory another process holds is
    :class:`~edgetl.errors.DirectoryLockedError` naming that process's pid.
    """
    directory = Path(directory)
    path = directory / LOCK_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies
    except OSError as exc:
        raise FileWriteError(f"cannot write {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        if holder == str(os.getpid()):  # a Python caller that left a Run open
            raise DirectoryLockedError(f"{directory} is already locked by this process (pid {holder}): release it first") from None
        raise DirectoryLockedError(
            f"{directory} is in use by another process (pid {holder}, which holds {path}); wait for it to end or stop it"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def unlock_directory(fd: int) -> None:
    """Release a lock taken by :func:`lock_directory` (closing its descriptor drops it)."""
    os.close(fd)


def _lock_holder(fd: int) -> str:
    """The pid written in a lock file; the holder writes it right after locking, so wait a moment."""
    for _ in range(10):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.05)
    return "unknown"
