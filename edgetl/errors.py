"""Errors edgetl reports to users as one clear line (``edgetl: error: ...``, exit 2).

Only :class:`EdgetlError` and its subclasses become one-line CLI errors; anything else is a bug
and keeps its traceback.
"""


class EdgetlError(Exception):
    """Base of errors caused by the user's input (data, weights, arguments); the CLI prints them."""


class ConfigError(EdgetlError, ValueError):
    """A setting is missing, of the wrong type or out of range."""


class DataError(EdgetlError, ValueError):
    """A dataset is missing, empty, malformed or unreadable."""


class WeightsError(EdgetlError, RuntimeError):
    """Weights could not be obtained, read, or do not fit the architecture."""


class RunError(EdgetlError):
    """A run directory or checkpoint is missing, damaged, or does not fit the request."""


class DivergedError(EdgetlError):
    """Training produced a non-finite loss or weights; the last good checkpoint is kept."""


class FileWriteError(EdgetlError, OSError):
    """A file could not be written (full disk, read-only directory, file-size limit); whatever was
    there before is left as it was."""


class DirectoryLockedError(EdgetlError):
    """Another process holds the directory's lock (``.edgetl.lock``): one writer per directory."""
