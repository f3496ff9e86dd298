"""The replay set: frozen-bottom features of known-class training images, stored in the bundle so
device fine-tuning can mix them into its batches against forgetting.

Each row is one image's ``bottom.pte`` output (the training program's input,
``programs.training.methods.forward.inputs[0]`` per item, ``C x H x W``), quantized to int8 with
one float32 scale per channel, symmetric: ``scale[c] = max |x[:, c]| / 127`` over every row and
position, ``q = clamp(round(x / scale[c]), -127, 127)`` (a channel that is all zero has scale 0 and
q 0), and read back as ``q * scale[c]`` in float32.

``replay.bin`` (little-endian), the layout ``deploy/native/src/replay.cpp`` reads::

    offset 0             8 bytes   magic "EDGETLR1"
    offset 8             4 x uint32  rows N, channels C, height H, width W
    offset 24            C x float32 scales
    offset 24 + 4C       N x int32   labels (indices into the manifest's model.classes)
    offset 24 + 4C + 4N  N x C x H x W int8, row-major

Size: ``24 + 4C + N * (4 + C*H*W)`` bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from edgetl.exporter.errors import ExportError

REPLAY_BIN = "replay.bin"
MAGIC = b"EDGETLR1"
_HEADER = struct.Struct("<8s4I")


@dataclass(frozen=True)
class QuantizedRows:
    """Rows of int8 features with their per-channel scales and labels."""

    values: np.ndarray  # int8, N x C x H x W
    scales: np.ndarray  # float32, C
    labels: np.ndarray  # int32, N

    def dequantized(self) -> np.ndarray:
        """``values * scales`` per channel, float32 (what the device trains on)."""
        return self.values.astype(np.float32) * self.scales.reshape(1, -1, 1, 1)

    def to_bytes(self) -> bytes:
        n, c, h, w = self.values.shape
        return (
            _HEADER.pack(MAGIC, n, c, h, w)
            + self.scales.astype("<f4").tobytes()
            + self.labels.astype("<i4").tobytes()
            + self.values.astype(np.int8).tobytes()
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = REPLAY_BIN) -> QuantizedRows:
        if len(data) < _HEADER.size:
            raise ExportError(f"{source} is too short for a replay set ({len(data)} bytes)")
        magic, n, c, h, w = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ExportError(f"{source} is not a replay set (magic {magic!r})")
        if len(data) != replay_bytes(n, (c, h, w)):
            raise ExportError(f"{source} holds {len(data)} bytes, its header ({n} rows of {c}x{h}x{w}) says {replay_bytes(n, (c, h, w))}")
        at = _HEADER.size
        scales = np.frombuffer(data, "<f4", c, at).astype(np.float32)
        labels = np.frombuffer(data, "<i4", n, at + 4 * c).astype(np.int32)
        values = np.frombuffer(data, np.int8, n * c * h * w, at + 4 * c + 4 * n).reshape(n, c, h, w)
        return cls(values, scales, labels)


def replay_bytes(rows: int, feature_shape: tuple[int, ...]) -> int:
    """Bytes of a replay file of ``rows`` rows of ``feature_shape`` (C, H, W)."""
    c = feature_shape[0]
    return _HEADER.size + 4 * c + rows * (4 + int(np.prod(feature_shape)))


def quantize_rows(features: np.ndarray, labels: np.ndarray) -> QuantizedRows:
    """``features`` (N x C x H x W float32) as int8 with one symmetric float32 scale per channel."""
    if features.ndim != 4 or len(features) != len(labels) or len(features) == 0:
        raise ExportError(f"replay features must be N x C x H x W with one label each, got {features.shape} and {len(labels)} labels")
    x = np.asarray(features, dtype=np.float32)
    scales = (np.abs(x).max(axis=(0, 2, 3)) / np.float32(127)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1)).reshape(1, -1, 1, 1)
    q = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
    q[:, scales == 0] = 0
    return QuantizedRows(q, scales, np.asarray(labels, dtype=np.int32))


def quantization_error(features: np.ndarray, rows: QuantizedRows) -> tuple[float, float]:
    """``(max |x - dequantized|, rms error / rms of x)`` of ``rows`` against the float features."""
    x = np.asarray(features, dtype=np.float64)
    err = x - rows.dequantized().astype(np.float64)
    rms_x = float(np.sqrt(np.mean(x**2)))
    return float(np.abs(err).max()), float(np.sqrt(np.mean(err**2)) / rms_x) if rms_x else 0.0


def draw_per_class(labels: list[int], num_classes: int, per_class: int, seed: int) -> list[int]:
    """Indices of ``per_class`` images of each class (all of a class that has fewer): the first of
    each class in the order of ``torch.randperm(len(labels))`` seeded with ``seed``; returned by
    class, then by index."""
    import torch

    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen: list[list[int]] = [[] for _ in range(num_classes)]
    for i in order:
        if len(chosen[labels[i]]) < per_class:
            chosen[labels[i]].append(i)
    return [i for rows in chosen for i in sorted(rows)]
