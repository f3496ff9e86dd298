"""Architectures: finding inverted-residual blocks, the model zoo and its weights."""

import edgetl._torchvision_compat  # noqa: F401  (before any torchvision import in this package)
