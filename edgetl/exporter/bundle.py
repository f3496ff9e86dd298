"""The export bundle: a directory of programs plus ``manifest.json``, written all-or-nothing.

Layout (``--training`` adds the last three)::

    manifest.json   what each file is, inputs, normalisation, classes, hashes, versions
    model.pte       the whole classifier, XNNPACK (batch 1)
    bottom.pte      the frozen bottom, XNNPACK (training batch): images -> features
    train.pte       training program over features: methods ``forward`` (train step), ``predict``
    train.ptd       its external weights: trainable parameters and running statistics

The bundle is built in a hidden directory beside the target (``.NAME.PID.*.partial``) and put in
place at the end, every file written atomically, so an interrupted export leaves no half-written
bundle behind. The directory gets the permissions the umask gives a new directory, as its files
do. Replacing an earlier bundle (``overwrite``, ``--force``) exchanges the two directories in one
``renameat2(RENAME_EXCHANGE)``: the target holds the old bundle or the new one at every instant
(where the file system cannot exchange, two renames leave it briefly absent). Only a directory
holding nothing but a bundle's own files is replaced: the user's other files are never deleted,
hidden ones included. The hidden directories an interrupted export to the same target
left beside it are removed by the next one (:func:`remove_stale_bundle_temporaries`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgetl._files import atomic_write, sha256_bytes, sha256_file, umask
from edgetl.exporter.errors import ExportError
from edgetl.exporter.manifest import FORMAT, FileEntry, Manifest

MANIFEST = "manifest.json"
MODEL_PTE = "model.pte"
BOTTOM_PTE = "bottom.pte"
TRAIN_PTE = "train.pte"
TRAIN_PTD = "train.ptd"


SEAL = "manifest_sha256"
#: the seal of bundles that hashed the file's bytes without the seal's line (still accepted)
_LINE_SEAL = re.compile(rb'^  "manifest_sha256": "([0-9a-f]{64})",\n', re.MULTILINE)


def canonical_bytes(data: dict) -> bytes:
    """What the seal hashes: ``data`` without ``manifest_sha256``, keys sorted, no whitespace
    (``deploy/native/src/bundle.cpp`` builds the same bytes from the file's tokens), so
    reindenting the file keeps the seal and editing a value breaks it."""
    unsealed = {k: v for k, v in data.items() if k != SEAL}
    return json.dumps(unsealed, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def manifest_bytes(data: dict) -> bytes:
    """``manifest.json``'s bytes for ``data`` (indented for people), sealed: ``manifest_sha256``
    is the sha256 of :func:`canonical_bytes`, which :meth:`ExportBundle.load` and the device runner
    check."""
    sealed = {**data, SEAL: sha256_bytes(canonical_bytes(data))}
    return (json.dumps(sealed, indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode()


def unseal(text: bytes) -> tuple[str | None, str | None]:
    """``(recorded, actual)`` seal of ``manifest.json``'s bytes; ``(None, None)`` without one. The
    actual seal is the canonical form's, or the older line seal's when that one matches."""
    try:
        data = json.loads(text)
    except ValueError:
        return None, None
    recorded = data.get(SEAL) if isinstance(data, dict) else None
    if not isinstance(recorded, str):
        return None, None
    actual = sha256_bytes(canonical_bytes(data))
    lines = list(_LINE_SEAL.finditer(text))
    if actual != recorded and len(lines) == 1:
        m = lines[0]
        if sha256_bytes(text[: m.start()] + text[m.end() :]) == recorded:
            return recorded, recorded
    return recorded, actual


@dataclass
class ExportBundle:
    """An export on disk: its directory and manifest."""

    path: Path
    manifest: Manifest

    @classmethod
    def load(cls, path: str | os.PathLike, *, check: bool = True) -> ExportBundle:
        """Read the bundle at ``path``; with ``check``, verify every file against its sha256."""
        path = Path(path)
        try:
            text = (path / MANIFEST).read_bytes()
            data = json.loads(text)
        except FileNotFoundError:
            raise ExportError(f"{path} is not an edgetl export bundle (no {MANIFEST})") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ExportError(f"cannot read {path / MANIFEST}: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise ExportError(f"{path / MANIFEST} has format {found!r}, expected {FORMAT!r}")
        bundle = cls(path, Manifest.from_json(data, source=str(path / MANIFEST)))
        if check:
            recorded, actual = unseal(text)
            if recorded is None:
                raise ExportError(f"{path / MANIFEST} has no manifest_sha256 (exported by an older edgetl, or edited): export it again")
            if recorded != actual:
                raise ExportError(f"{path / MANIFEST} was modified after export (it does not match its manifest_sha256): export it again")
            bundle.check_files()
        return bundle

    def file(self, name: str) -> Path:
        """The path of bundle file ``name``; :class:`ExportError` when the bundle has no such file."""
        if name not in self.manifest.files:
            hint = " (export with --training)" if name in (TRAIN_PTE, TRAIN_PTD, BOTTOM_PTE) else ""
            raise ExportError(f"the bundle in {self.path} has no {name}{hint}")
        return self.path / name

    def check_files(self) -> None:
        """Raise :class:`ExportError` if a listed file is missing or its bytes changed."""
        for name, entry in self.manifest.files.items():
            p = self.path / name
            if not p.is_file():
                raise ExportError(f"bundle file {p} is missing")
            if sha256_file(p) != entry.sha256:
                raise ExportError(f"bundle file {p} does not match the sha256 in {MANIFEST}")


def check_output_dir(out: Path, *, overwrite: bool) -> None:
    """Refuse a target that cannot be written or exists with other content than an earlier bundle
    (which is replaced only with ``overwrite``); cheap, so callers run it before any export work."""
    out = Path(out).absolute()
    ancestor = out
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor != out and not ancestor.is_dir():
        raise ExportError(f"cannot create output {out}: {ancestor} is a file, not a directory")
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a directory")
    writable = ancestor if ancestor != out else out.parent
    if not os.access(writable, os.W_OK | os.X_OK):
        raise ExportError(f"cannot create output {out}: {writable} is not writable")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / MANIFEST).is_file():
        raise ExportError(f"output directory {out} already exists with other content; choose an empty or new directory")
    if not overwrite:
        raise ExportError(f"output directory {out} already exists with other content; pass --force to replace it")
    others = sorted(p.name for p in out.iterdir() if p.name not in _bundle_names(out))
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise ExportError(
            f"output directory {out} holds files that are not part of its bundle ({shown}); "
            "--force replaces a bundle only, so move them elsewhere or choose another --out"
        )


def _bundle_names(out: Path) -> set[str]:
    """The names an earlier bundle in ``out`` owns: its manifest, the files it lists, their temporaries."""
    try:
        files = json.loads((out / MANIFEST).read_text()).get("files", {})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        files = {}
    # its temporaries never live here (they are written in the .partial directory): a hidden file
    # that looks like one is the user's
    return {MANIFEST, *(files if isinstance(files, dict) else {})}


def remove_stale_bundle_temporaries(out: Path) -> None:
    """Remove what an interrupted export to ``out`` left beside it: the directories a
    :class:`BundleWriter` names ``.NAME.PID.XXXXXXXX.partial`` (``mkdtemp``) and ``.NAME.PID.old``
    (:func:`replace_dir`), of a process that is gone, holding nothing but files (a bundle is flat).
    Nothing else is touched, whatever its name."""
    leftover = re.compile(rf"\.{re.escape(out.name)}\.(\d+)\.(?:[a-z0-9_]+\.partial|old)")
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return
    for p in entries:
        m = leftover.fullmatch(p.name)
        if m is None or p.is_symlink() or not p.is_dir():
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _alive(pid):
            continue  # this process's own, or another export to the same target is running
        try:
            if not all(entry.is_file(follow_symlinks=False) for entry in os.scandir(p)):
                continue
        except OSError:
            continue
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class BundleWriter:
    """Builds a bundle in a hidden sibling directory; :meth:`commit` puts it in place."""

    def __init__(self, out: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.out = Path(out).absolute()
        check_output_dir(self.out, overwrite=overwrite)
        with _disk_errors(f"cannot create the bundle directory beside {self.out}"):
            self.out.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_bundle_temporaries(self.out)
            self.dir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.{os.getpid()}.", suffix=".partial", dir=self.out.parent))
            os.chmod(self.dir, 0o777 & ~umask())  # mkdtemp's 0700; the bundle directory follows the umask as its files do
        self.overwrite = overwrite
        self.files: dict[str, FileEntry] = {}

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)

    def write(self, name: str, data: bytes) -> Path:
        with _disk_errors(f"cannot write {name} of the bundle {self.out}"):
            path = atomic_write(self.dir / name, lambda f: f.write(data))
        self.files[name] = FileEntry(sha256_bytes(data), len(data))
        return path

    def commit(self, manifest: Manifest) -> ExportBundle:
        """Write the manifest (with the written files' hashes) and put the bundle at its target."""
        manifest = dataclasses.replace(manifest, files=dict(sorted(self.files.items())), manifest_sha256=None)
        text = manifest_bytes(manifest.to_json())
        manifest = dataclasses.replace(manifest, manifest_sha256=json.loads(text)["manifest_sha256"])
        with _disk_errors(f"cannot put the bundle in place at {self.out}"):
            atomic_write(self.dir / MANIFEST, lambda f: f.write(text))
            _fsync_dir(self.dir)
            # the target may have changed since the check (another process): check again, then swap
            check_output_dir(self.out, overwrite=self.overwrite)
            replace_dir(self.dir, self.out)
        _fsync_dir(self.out.parent)
        if self.dir.exists():  # now the old bundle
            shutil.rmtree(self.dir, ignore_errors=True)
        return ExportBundle(self.out, manifest)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def replace_dir(new: Path, target: Path) -> None:
    """Put directory ``new`` at ``target``. A missing or empty ``target`` is replaced by one rename;
    a non-empty one is exchanged with ``new`` atomically (``new`` then holds the old content, for
    the caller to remove), so ``target`` is never absent."""
    try:
        os.rename(new, target)
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if _exchange(new, target):
        return
    # no atomic exchange on this system or file system: two renames (target briefly absent)
    old = target.with_name(f".{target.name}.{os.getpid()}.old")
    os.rename(target, old)
    os.rename(new, target)
    os.rename(old, new)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange ``a`` and ``b`` (Linux ``renameat2``); False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def _disk_errors(what: str) -> Iterator[None]:
    """A full disk or a directory without write permission as one :class:`ExportError` line."""
    try:
        yield
    except OSError as exc:
        raise ExportError(f"{what}: {exc.strerror or exc}") from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
