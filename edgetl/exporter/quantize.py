"""int8 programs: PT2E-quantized XNNPACK lowering and the check that decides whether one is good enough.

An int8 program cannot match eager float32 bit for bit, so its self-check is about **agreement**:
on the validation images, the share whose int8 top-1 class is float32's, and the accuracy of each
against the labels. The export is refused (:class:`AccuracyDropError`, nothing written) when int8
is worse than float32 by more than ``ExportConfig.max_accuracy_drop`` percentage points (default
1). Two int8 paths are checked: ``model.pte`` (the whole classifier) and, with ``training``,
``bottom.pte`` feeding the float32 top in eager PyTorch — the features the device fine-tunes on,
judged by what the current top makes of them.

Decided: the threshold is on accuracy, not agreement: int8 flipping images between two wrong
classes costs nothing, and on a small validation set agreement alone would refuse usable models.
Agreement is printed and recorded so a user can judge it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from edgetl.exporter import _executorch as et
from edgetl.exporter.calibration import ImageSet
from edgetl.exporter.errors import VerificationError
from edgetl.exporter.manifest import AccuracyCheck, CalibrationSet

#: images per eager forward when computing float32 references (bounds the working set)
_EAGER_CHUNK = 64


class AccuracyDropError(VerificationError):
    """An int8 program loses more accuracy against float32 than the stated threshold allows."""


def calibration_batches(images: Tensor, batch: int) -> Iterator[Tensor]:
    """``images`` in batches of exactly ``batch`` (a program's fixed shape): the last one is filled
    up with images from the start, which repeats a few observations and skews no range."""
    n = len(images)
    for start in range(0, n, batch):
        idx = [(start + i) % n for i in range(batch)]
        yield images[idx]


def calibration_record(calibration: ImageSet) -> CalibrationSet:
    return CalibrationSet(calibration.source, len(calibration), calibration.seed, calibration.sha256(), list(calibration.items))


def int8_graph(
    module: nn.Module, example: Tensor, calibration: Tensor, *, observer: str = "minmax", float_layers: Sequence[str] = ()
) -> nn.Module:
    """``module`` PT2E-quantized for XNNPACK at the shape of ``example``, calibrated on every image
    of ``calibration`` (in batches of the program's batch), ``float_layers`` left float32. It runs
    in eager PyTorch — the reference of the int8 program, checked before the (slow) lowering — and
    lowers with :func:`edgetl.exporter.inference.export_inference`."""
    return et.quantize_int8(module, example, calibration_batches(calibration, len(example)), observer=observer, float_layers=float_layers)


def _batched(run, images: Tensor, batch: int) -> np.ndarray:
    """``run`` (a fixed-batch program) over every image in batches of ``batch`` (zero-padded at
    the end; padding rows dropped)."""
    n, out = len(images), []
    for start in range(0, n, batch):
        x = images[start : start + batch]
        if len(x) < batch:
            x = torch.cat([x, x.new_zeros((batch - len(x), *x.shape[1:]))])
        out.append(np.asarray(run(x.contiguous()))[: min(batch, n - start)])
    return np.concatenate(out)


def program_outputs(pte: str | Path, images: Tensor, batch: int) -> np.ndarray:
    """The program's first output for every image, run by ExecuTorch in batches of ``batch``."""
    program = et.Program(pte)
    return _batched(lambda x: program.run("forward", x.numpy())[0], images, batch)


def graph_outputs(graph: nn.Module, images: Tensor, batch: int) -> np.ndarray:
    """A quantized graph's output (eager, its fixed batch ``batch``) for every image."""
    with torch.no_grad():
        return _batched(lambda x: graph(x).numpy(), images, batch)


def eager_outputs(module: nn.Module, images: Tensor) -> np.ndarray:
    """``module(images)`` in eval mode without autograd, in chunks."""
    with torch.no_grad():
        return torch.cat([module(images[i : i + _EAGER_CHUNK]) for i in range(0, len(images), _EAGER_CHUNK)]).numpy()


def compare(path: str, int8_logits: np.ndarray, fp32_logits: np.ndarray, labels: Tensor, max_abs_diff: float) -> AccuracyCheck:
    """The int8 path's accuracy and top-1 agreement against float32's, in percent."""
    y = labels.numpy()
    int8_top1, fp32_top1 = int8_logits.argmax(1), fp32_logits.argmax(1)
    fp32_acc = 100.0 * float((fp32_top1 == y).mean())
    int8_acc = 100.0 * float((int8_top1 == y).mean())
    return AccuracyCheck(
        path=path,
        images=len(y),
        fp32_accuracy=fp32_acc,
        int8_accuracy=int8_acc,
        accuracy_drop=fp32_acc - int8_acc,
        top1_agreement=100.0 * float((int8_top1 == fp32_top1).mean()),
        max_abs_diff=float(max_abs_diff),
    )


def describe(check: AccuracyCheck) -> str:
    return (
        f"{check.path}: top-1 agreement with float32 eager {check.top1_agreement:.2f}% on {check.images} validation images; "
        f"accuracy float32 {check.fp32_accuracy:.2f}% vs int8 {check.int8_accuracy:.2f}% (drop {check.accuracy_drop:+.2f} points)"
    )


def refuse_if_worse(check: AccuracyCheck, max_drop: float) -> None:
    """:class:`AccuracyDropError` (one line) when int8 loses more than ``max_drop`` points."""
    if check.accuracy_drop > max_drop:
        raise AccuracyDropError(
            f"int8 refused: {check.path} reaches {check.int8_accuracy:.2f}% against float32's {check.fp32_accuracy:.2f}% on "
            f"{check.images} validation images, a drop of {check.accuracy_drop:.2f} points (allowed: {max_drop:g}; "
            "--max-accuracy-drop, calibrate on other images with --calibration-data / --calibration-images, "
            "or fine-tune quantization-aware with "
            "--qat-epochs); nothing written"
        )
