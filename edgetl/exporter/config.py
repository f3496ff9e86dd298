"""The export stage's settings: :class:`ExportConfig`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from edgetl.exporter.errors import ExportError
from edgetl.train.optim import ADAMW_BETAS, ADAMW_EPS, DEVICE_OPTIMIZERS

if TYPE_CHECKING:
    from edgetl.train.config import FinetuneConfig

#: ``ExportConfig.quantize`` values: ``"none"`` exports float32 programs (the default), ``"int8"``
#: PT2E-quantized XNNPACK programs (``model.pte`` and, with ``training``, ``bottom.pte``)
QUANTIZE = ("none", "int8")
#: the most spare classes an export adds (each costs a classifier row on the device)
MAX_SPARE_CLASSES = 10000
#: ``ExportConfig.observer`` values: how an int8 activation range is read off the calibration images
OBSERVERS = ("minmax", "moving_average", "histogram")


@dataclass(frozen=True)
class ExportConfig:
    """How :func:`edgetl.export` builds and checks a bundle.

    Attributes:
        image_size: input side in pixels.
        batch_size: batch of the training program and of ``bottom.pte`` (``model.pte`` takes 1).
        training: also export ``bottom.pte`` + ``train.pte``/``train.ptd`` for on-device training.
        optimizer: the on-device optimizer, ``"sgd"`` or ``"adamw"`` (recorded in the manifest
            with its settings, run by the verification).
        lr, weight_decay: its learning rate and weight decay (conv and linear weights only).
        momentum: SGD's.
        betas, eps: AdamW's.
        label_smoothing: of the exported cross-entropy loss.
        verify_steps: SGD steps compared against eager PyTorch before the bundle is accepted.
        overwrite: replace an existing bundle at the output directory.
        seed: of the verification data, the calibration subset and the replay set's draw.
        quantize: ``"int8"`` lowers ``model.pte`` (and ``bottom.pte``) as PT2E-quantized XNNPACK
            programs, calibrated on ``calibration_images`` images; the trainable top stays float32.
        calibration_images: how many images calibrate the int8 programs (a seeded subset).
        max_accuracy_drop: the int8 export is refused when its accuracy on the validation images
            is lower than float32's by more than this many percentage points.
        observer: how each int8 activation range is read off the calibration images:
            ``"minmax"`` (the extremes), ``"moving_average"`` (extremes averaged over batches),
            ``"histogram"`` (the range of least L2 quantization error; clips outliers).
        mixed_precision: when pure int8 loses more than ``max_accuracy_drop``, keep the fewest
            layers that cost most in int8 in float32 that bring the drop within it
            (:mod:`edgetl.exporter.sensitivity`) instead of refusing at once.
        sensitivity_images: validation images the per-layer sensitivity is measured on (the
            first ones; the accuracy check uses them all).
        spare_classes: with ``training``, classifier outputs beyond the known classes, inert
            until the device assigns them classes it learns (:mod:`edgetl.nn.spare`).
        replay_per_class: with ``training``, store the bottom features of this many training
            images per known class in the bundle (``replay.bin``, int8, drawn by ``seed``), which
            device fine-tuning mixes into its batches; 0: no replay set.
        qat_epochs: with int8, quantization-aware fine-tuning of ``model.pte``'s int8 graph for
            this many passes over the calibration images (distilled from the float32 network,
            :mod:`edgetl.exporter.qat`) instead of post-training quantization; 0: post-training.
        qat_lr: Adam's learning rate of the quantization-aware fine-tuning.
    """

    image_size: int = 224
    batch_size: int = 8
    training: bool = False
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: tuple[float, float] = ADAMW_BETAS
    eps: float = ADAMW_EPS
    label_smoothing: float = 0.0
    verify_steps: int = 3
    overwrite: bool = False
    seed: int = 0
    quantize: str = "none"
    calibration_images: int = 100
    max_accuracy_drop: float = 1.0
    observer: str = "minmax"
    mixed_precision: bool = True
    sensitivity_images: int = 200
    spare_classes: int = 0
    replay_per_class: int = 0
    qat_epochs: int = 0
    qat_lr: float = 1e-5

    def __post_init__(self) -> None:
        checks = [
            (self.image_size >= 32, f"image size must be >= 32, got {self.image_size}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (
                not self.training or self.batch_size >= 2,
                f"a training program needs batch size >= 2 (train-mode batch norm), got {self.batch_size}",
            ),
            (math.isfinite(self.lr) and self.lr > 0, f"learning rate must be a finite number > 0, got {self.lr}"),
            (math.isfinite(self.momentum) and 0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (
                self.optimizer in DEVICE_OPTIMIZERS,
                f"the device's optimizer must be one of {', '.join(DEVICE_OPTIMIZERS)}, got {self.optimizer!r}",
            ),
            (
                len(self.betas) == 2 and all(math.isfinite(b) and 0 <= b < 1 for b in self.betas),
                f"betas must be two numbers in [0, 1), got {self.betas}",
            ),
            (math.isfinite(self.eps) and self.eps > 0, f"eps must be a finite number > 0, got {self.eps}"),
            (0 <= self.label_smoothing < 1, f"label smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.verify_steps >= 1, f"verify steps must be >= 1, got {self.verify_steps}"),
            (self.quantize in QUANTIZE, f"quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}"),
            (self.calibration_images >= 1, f"calibration images must be >= 1, got {self.calibration_images}"),
            (self.observer in OBSERVERS, f"observer must be one of {', '.join(OBSERVERS)}, got {self.observer!r}"),
            (self.sensitivity_images >= 1, f"sensitivity images must be >= 1, got {self.sensitivity_images}"),
            (0 <= self.spare_classes <= MAX_SPARE_CLASSES, f"spare classes must be in [0, {MAX_SPARE_CLASSES}], got {self.spare_classes}"),
            (self.training or not self.spare_classes, "spare classes are outputs of the training program: they need training"),
            (self.replay_per_class >= 0, f"replay images per class must be >= 0, got {self.replay_per_class}"),
            (
                self.training or self.replay_per_class == 0,
                "a replay set is for on-device fine-tuning: replay images per class need a training export",
            ),
            (self.qat_epochs >= 0, f"QAT epochs must be >= 0, got {self.qat_epochs}"),
            (math.isfinite(self.qat_lr) and self.qat_lr > 0, f"QAT learning rate must be a finite number > 0, got {self.qat_lr}"),
            (self.qat_epochs == 0 or self.quantize == "int8", "quantization-aware fine-tuning (QAT epochs) needs quantize='int8'"),
            (
                math.isfinite(self.max_accuracy_drop) and 0 <= self.max_accuracy_drop <= 100,
                f"max accuracy drop must be in [0, 100] percentage points, got {self.max_accuracy_drop}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ExportError(message)

    @classmethod
    def for_run(cls, run: FinetuneConfig | None, **overrides: Any) -> ExportConfig:
        """The export settings of a run: its image and batch size (this type's defaults for a bare
        weights file), with ``overrides`` that are not None replacing fields."""
        base = cls(image_size=run.image_size, batch_size=run.batch_size) if run is not None else cls()
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
