"""The export bundle: a directory of programs plus ``manifest.json``, written all-or-nothing.

Layout (``--training`` adds the last three)::

    manifest.json   what each file is, inputs, normalisation, classes, hashes, versions
    model.pte       the whole classifier, XNNPACK (batch 1)
    bottom.pte      the frozen bottom, XNNPACK (training batch): images -> features
    train.pte       training program over features: methods ``forward`` (train step), ``predict``
    train.ptd       its external weights: trainable parameters and running statistics

The bundle is built in a hidden directory beside the target and renamed into place at the end,
every file written atomically, so an interrupted export leaves no half-written bundle behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgetl._files import atomic_write, atomic_write_json
from edgetl.exporter.errors import ExportError
from edgetl.exporter.manifest import FORMAT, FileEntry, Manifest

MANIFEST = "manifest.json"
MODEL_PTE = "model.pte"
BOTTOM_PTE = "bottom.pte"
TRAIN_PTE = "train.pte"
TRAIN_PTD = "train.ptd"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
            data = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise ExportError(f"{path} is not an edgetl export bundle (no {MANIFEST})") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ExportError(f"cannot read {path / MANIFEST}: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise ExportError(f"{path / MANIFEST} has format {found!r}, expected {FORMAT!r}")
        bundle = cls(path, Manifest.from_json(data, source=str(path / MANIFEST)))
        if check:
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
    """Refuse a target that exists with other content (an earlier bundle only with ``overwrite``)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if overwrite and (out / MANIFEST).is_file():
            return
        hint = "; pass --force to replace it" if (out / MANIFEST).is_file() else "; choose an empty or new directory"
        raise ExportError(f"output directory {out} already exists with other content{hint}")


class BundleWriter:
    """Builds a bundle in a hidden sibling directory; :meth:`commit` renames it into place."""

    def __init__(self, out: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.out = Path(out).absolute()
        check_output_dir(self.out, overwrite=overwrite)
        with _disk_errors(f"cannot create the bundle directory beside {self.out}"):
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".partial", dir=self.out.parent))
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
        """Write the manifest (with the written files' hashes) and move the bundle to its target."""
        manifest = dataclasses.replace(manifest, files=dict(sorted(self.files.items())))
        with _disk_errors(f"cannot put the bundle in place at {self.out}"):
            atomic_write_json(self.dir / MANIFEST, manifest.to_json())
            _fsync_dir(self.dir)
            old = None
            if self.out.is_dir():
                if any(self.out.iterdir()):
                    old = self.out.with_name(f".{self.out.name}.{os.getpid()}.old")
                    os.rename(self.out, old)
                else:
                    self.out.rmdir()
            os.rename(self.dir, self.out)
        _fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return ExportBundle(self.out, manifest)


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
