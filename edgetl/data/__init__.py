"""Datasets: ImageFolder trees and the embedded Fashion-MNIST."""

import edgetl._torchvision_compat  # noqa: F401  (before any torchvision import in this package)
