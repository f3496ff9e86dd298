"""Errors edgetl reports to users as one clear line."""


class EdgetlError(Exception):
    """Base of errors caused by the user's input (data, weights, arguments); the CLI prints them."""


class DataError(EdgetlError, ValueError):
    """A dataset is missing, empty, malformed or unreadable."""


class WeightsError(EdgetlError, RuntimeError):
    """Weights could not be obtained, read, or do not fit the architecture."""
