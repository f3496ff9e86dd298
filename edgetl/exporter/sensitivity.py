"""Which layers int8 costs accuracy in, and which to keep float32 (mixed precision).

:func:`measure` quantizes one convolution or linear layer at a time (every other layer float32)
and records what that alone does to the network's output on labelled images: the accuracy, the
top-1 agreement with float32 and the logits' signal-to-quantization-noise ratio (SQNR, dB), plus
every activation range the calibration observed. :func:`choose_float_layers` keeps the layers
that cost most in float32 (lowest SQNR first), as few as bring the int8 graph's accuracy drop on
the validation images within the limit; XNNPACK runs the rest in int8.

Decided: layers are ranked by SQNR rather than by accuracy: on a few hundred images one layer
alone rarely changes a top-1 class, while the logits' error orders them all.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from torch import Tensor, nn

from edgetl._files import atomic_write_text
from edgetl.exporter import _executorch as et
from edgetl.exporter.quantize import calibration_batches, graph_outputs

#: images per eager batch of a quantized graph while measuring (its fixed batch)
BATCH = 25


@dataclass(frozen=True)
class LayerError:
    """What quantizing ``layer`` alone does to the network's output."""

    layer: str
    accuracy: float
    top1_agreement: float
    sqnr_db: float


@dataclass(frozen=True)
class SensitivityReport:
    """Per-layer int8 sensitivity of a network on ``images`` labelled images."""

    observer: str
    calibration_images: int
    images: int
    fp32_accuracy: float
    int8_accuracy: float
    int8_sqnr_db: float
    layers: list[LayerError]
    #: every observed activation's (min, max), keyed "producing module: graph node"
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)

    def ranking(self) -> list[str]:
        """Layer names, the costliest in int8 (lowest SQNR) first."""
        return [e.layer for e in sorted(self.layers, key=lambda e: e.sqnr_db)]

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, path: str | Path, mixed_precision: MixedPrecision | None = None) -> None:
        """As JSON (with the mixed-precision choice, when one was made)."""
        data = self.to_dict() | {"mixed_precision": None if mixed_precision is None else asdict(mixed_precision)}
        atomic_write_text(Path(path), json.dumps(data, indent=1) + "\n")

    def table(self, rows: int | None = None) -> str:
        """The layers, costliest first, as aligned text (``rows`` of them, all when None)."""
        lines = [f"{'layer':<34} {'SQNR dB':>8} {'accuracy':>9} {'agreement':>9}"]
        for e in sorted(self.layers, key=lambda e: e.sqnr_db)[:rows]:
            lines.append(f"{e.layer:<34} {e.sqnr_db:8.1f} {e.accuracy:8.2f}% {e.top1_agreement:8.2f}%")
        return "\n".join(lines)


def sqnr_db(quantized: np.ndarray, reference: np.ndarray) -> float:
    """10 log10(|reference|^2 / |quantized - reference|^2); +inf when they are equal."""
    noise = float(np.square(quantized.astype(np.float64) - reference).sum())
    signal = float(np.square(reference.astype(np.float64)).sum())
    return math.inf if noise == 0 else 10.0 * math.log10(signal / noise)


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float((logits.argmax(1) == labels).mean())


def _example(images: Tensor) -> Tensor:
    return images[[i % len(images) for i in range(BATCH)]]


def int8_outputs(module: nn.Module, calibration: Tensor, images: Tensor, **options) -> np.ndarray:
    """The int8 graph's logits on ``images`` (calibrated on ``calibration``; ``options`` of
    :func:`edgetl.exporter._executorch.prepare_int8`), run in eager PyTorch at batch :data:`BATCH`."""
    graph = et.quantize_int8(module, _example(images), calibration_batches(calibration, BATCH), **options)
    return graph_outputs(graph, images, BATCH)


def measure(
    module: nn.Module,
    calibration: Tensor,
    images: Tensor,
    labels: Tensor,
    fp32_logits: np.ndarray,
    *,
    observer: str = "minmax",
    log: Callable[[str], None] = print,
) -> SensitivityReport:
    """Quantize each convolution / linear layer of ``module`` alone and measure it on ``images``
    (``fp32_logits`` the float32 network's logits on them)."""
    y = labels.numpy()
    layers = et.quantizable_layers(module, images[:1])
    captured = et.capture(module, _example(images))
    ranges: dict[str, tuple[float, float]] = {}
    full = int8_outputs(module, calibration, images, observer=observer, ranges=ranges, captured=captured)
    errors = []
    for i, layer in enumerate(layers):
        out = int8_outputs(module, calibration, images, observer=observer, only_layers=[layer], captured=captured)
        errors.append(
            LayerError(layer, _accuracy(out, y), 100.0 * float((out.argmax(1) == fp32_logits.argmax(1)).mean()), sqnr_db(out, fp32_logits))
        )
        if (i + 1) % 10 == 0:
            log(f"    sensitivity: {i + 1}/{len(layers)} layers")
    return SensitivityReport(
        observer=observer,
        calibration_images=len(calibration),
        images=len(images),
        fp32_accuracy=_accuracy(fp32_logits, y),
        int8_accuracy=_accuracy(full, y),
        int8_sqnr_db=sqnr_db(full, fp32_logits),
        layers=errors,
        ranges=ranges,
    )


@dataclass(frozen=True)
class MixedPrecision:
    """The float32 layers chosen and what the int8 graph reaches with them."""

    float_layers: list[str]
    accuracy_drop: float
    #: (number of float32 layers, accuracy drop) for every set tried
    tried: list[tuple[int, float]]


def int8_drop(module: nn.Module, calibration: Tensor, images: Tensor, labels: Tensor, fp32_logits: np.ndarray, *, observer: str = "minmax"):
    """``float_layers -> accuracy drop`` (points, on ``images``) of ``module``'s int8 graph with
    those layers float32; captures ``module`` once."""
    y = labels.numpy()
    fp32 = _accuracy(fp32_logits, y)
    captured = et.capture(module, _example(images))

    def drop(float_layers: Sequence[str]) -> float:
        out = int8_outputs(module, calibration, images, observer=observer, float_layers=float_layers, captured=captured)
        return fp32 - _accuracy(out, y)

    return drop


def choose_float_layers(
    drop_with: Callable[[Sequence[str]], float], ranking: Sequence[str], max_drop: float, *, log: Callable[[str], None] = print
) -> MixedPrecision | None:
    """The fewest of ``ranking``'s first layers that, kept float32, bring the accuracy drop
    (``drop_with(float_layers)``, e.g. :func:`int8_drop`) within ``max_drop`` points: doubling the
    count until it does, then bisecting (the drop need not fall monotonically; the set returned is
    one that was measured). None when even all of them do not."""
    tried: dict[int, float] = {}

    def drop(n: int) -> float:
        if n not in tried:
            tried[n] = drop_with(list(ranking[:n]))
            log(f"    {n} layer(s) float32: accuracy drop {tried[n]:+.2f} points")
        return tried[n]

    hi = 1
    while drop(hi) > max_drop:
        if hi >= len(ranking):
            return None
        hi = min(2 * hi, len(ranking))
    lo = hi // 2  # lo == 0 or drop(lo) > max_drop
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if drop(mid) <= max_drop:
            hi = mid
        else:
            lo = mid
    return MixedPrecision(list(ranking[:hi]), tried[hi], sorted(tried.items()))
