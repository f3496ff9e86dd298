"""``manifest.json`` as types: what a bundle's files are, how to feed them, how they were checked.

The exporter builds a :class:`Manifest` and writes it as JSON (:meth:`Manifest.to_json`);
:class:`~edgetl.exporter.bundle.ExportBundle` reads it back into the type
(:meth:`Manifest.from_json`). The device runner reads the same JSON in C++
(``deploy/native/src/bundle.cpp``): ``format``, ``manifest_sha256``, ``files``, ``model.name``,
``model.classes``, ``input``,
``programs.inference.file``, ``programs.bottom.file`` and ``programs.training`` (``file``,
``data``, ``batch_size``, ``methods.forward.inputs[0].shape``, ``trainable_parameters``,
``buffers``, ``weights_layout``, ``optimizer``, ``spare_classes``), ``replay`` (``file``, ``count``, ``feature_shape``, ``dtype``;
the file's layout in :mod:`edgetl.exporter.replay`), ``runtime.executorch_series`` (a newer series than
the runner's is refused), ``memory`` (its fine-tuning need, against its memory limit), and shows ``quantization`` (int8 exports); renaming
one of those is a format change. An int8 export changes no field the runner relies on: its
programs take and return float32 like the others.

Sizes are in bytes. Optional sections (``programs.bottom``, ``programs.training``, the training
figures, ``memory``) exist only in bundles exported with ``training``, ``quantization`` only in
int8 exports; absent sections are left out of the JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgetl._files import plain_name
from edgetl._typed_json import Misfit, dump, load, optional, schema
from edgetl.exporter._executorch import TensorSlot
from edgetl.exporter.errors import ExportError

#: the bundle format this exporter writes and the runner reads
FORMAT = "edgetl-bundle/1"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a program method."""

    name: str
    shape: list[int]
    dtype: str
    layout: str | None = optional()


@dataclass(frozen=True)
class Created:
    """Versions and time of the export."""

    edgetl: str
    executorch: str
    torch: str
    utc: str


@dataclass(frozen=True)
class ModelInfo:
    """The network: zoo architecture, classes and the policy its training program trains by."""

    name: str
    num_classes: int
    classes: list[str]
    policy: dict[str, Any]


@dataclass(frozen=True)
class InputInfo:
    """How an image becomes the programs' input tensor (the device's preprocessing)."""

    image_size: int
    layout: str
    dtype: str
    channels: str
    pixel_scale: str
    mean: list[float]
    std: list[float]
    resize_short_side: int
    crop: str
    interpolation: str


@dataclass(frozen=True)
class RuntimeInfo:
    """The ExecuTorch release series the programs are made for."""

    executorch_series: str


@dataclass(frozen=True)
class XnnpackProgram:
    """An inference program lowered to XNNPACK (``model.pte``, ``bottom.pte``)."""

    file: str
    method: str
    backend: list[str]
    undelegated_ops: list[str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


@dataclass(frozen=True)
class Method:
    """A training program method's inputs and outputs; ``then`` describes outputs not listed."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    then: str | None = optional()


@dataclass(frozen=True)
class Optimizer:
    """The on-device optimizer: ``"sgd"`` (``torch.optim.SGD``'s rule: ``momentum``,
    ``dampening``, ``nesterov``) or ``"adamw"`` (``torch.optim.AdamW``'s: ``betas``, ``eps``).
    Weight decay applies to ``weight_decay_parameters`` alone (conv and linear weights, never
    norms or biases: ``edgetl.train.optim.decays``); a manifest without the list decays every
    parameter."""

    name: str
    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    betas: list[float] | None = optional()
    eps: float | None = optional()
    weight_decay_parameters: list[str] | None = optional()


@dataclass(frozen=True)
class Loss:
    """The training program's loss."""

    name: str
    label_smoothing: float


@dataclass(frozen=True)
class SpareClasses:
    """Classifier outputs beyond the known classes, inert until the device assigns them a class it
    learns (:mod:`edgetl.nn.spare`): their rows of ``weight`` and ``bias`` (after the known
    classes' rows), and ``active``, the weights file's 0/1 vector that turns an output on."""

    count: int
    weight: str
    bias: str | None
    active: str
    #: the ``embed`` method's output per image (the classifier's last linear layer's input)
    embedding_size: int
    #: the mean embedding of the run's images (known classes), the centre imprinting measures a
    #: new class's direction from; None when the export had no images (imprinting from 0)
    embedding_mean: list[float] | None = optional()
    #: how many images ``embedding_mean`` averages
    embedding_mean_images: int | None = optional()


@dataclass(frozen=True)
class TrainingProgram:
    """``train.pte`` (methods ``forward``: a training step, ``predict``) and its weights ``train.ptd``."""

    file: str
    data: str
    batch_size: int
    methods: dict[str, Method]
    trainable_parameters: list[str]
    buffers: list[str]
    #: where each tensor of ``data`` is (what the device overwrites when it saves trained weights)
    weights_layout: dict[str, TensorSlot]
    optimizer: Optimizer
    loss: Loss
    #: operators only ``deploy/native``'s kernel library implements (edgetl-device links it)
    custom_operators: list[str]
    operators: dict[str, list[str]]
    differences_from_eager: list[str]
    #: with ``--spare-classes``: the outputs the device assigns (``methods`` then has ``embed``)
    spare_classes: SpareClasses | None = optional()


@dataclass(frozen=True)
class Programs:
    """The bundle's programs; ``bottom`` and ``training`` come with a training export."""

    inference: XnnpackProgram
    bottom: XnnpackProgram | None = optional()
    training: TrainingProgram | None = optional()


@dataclass(frozen=True)
class TrainingCheck:
    """How a few ExecuTorch training steps compared with the same steps in eager PyTorch."""

    steps: int
    losses_eager: list[float]
    losses_executorch: list[float]
    loss_max_abs_diff: float
    weight_max_abs_diff: float
    running_stats_max_abs_diff: float
    #: largest change of a running statistic over the steps, ExecuTorch side
    running_stats_moved: float
    #: predict method over a .ptd written from the session vs eager eval with those weights
    predict_max_abs_diff: float
    tolerance: dict[str, float]
    #: with the program's masks replayed in eager (when the plain comparison disagreed): mask
    #: elements that differ between the two, and the largest input difference at one of them
    mask_flips: int | None = optional()
    mask_flip_max_abs_diff: float | None = optional()
    #: AdamW bundles: the device's AdamW rule against ``torch.optim.AdamW`` over the program's own
    #: gradients, the steps' largest weight difference (relative to max(1, |weight|))
    adamw_rule_max_abs_diff: float | None = optional()


@dataclass(frozen=True)
class Verification:
    """What the export checked against eager PyTorch before accepting the programs."""

    inference_max_abs_diff: float
    bottom_max_abs_diff: float | None = optional()
    training: TrainingCheck | None = optional()


@dataclass(frozen=True)
class MemoryFigures:
    """The training program's memory: what its backward keeps, against the eager profiler's prediction."""

    saved_for_backward_bytes_exported: int
    saved_for_backward_bytes_predicted: int
    saved_for_backward_ratio: float | None
    saved_uint8_masks: int
    saved_uint8_bytes: int
    predicted_per_unit: dict[str, int]
    note: str
    #: planned (non-constant) arena per method
    planned_arena_bytes: dict[str, int]
    trainable_parameter_bytes: int
    #: the device runner's own resident set (binary + ExecuTorch's libraries): with the arena, the
    #: weights file and the momentum, the runner's fine-tuning need, checked against its memory
    #: limit before it starts (``edgetl.profiler.native``, ``deploy/native/src/memory.cpp``)
    native_runtime_bytes: int | None = optional()


@dataclass(frozen=True)
class CalibrationSet:
    """The images an int8 program was calibrated on (see :mod:`edgetl.exporter.calibration`)."""

    source: str
    images: int
    #: of the seeded subset (None: every image of the source)
    seed: int | None
    #: sha256 of the preprocessed float32 ``N x 3 x H x W`` tensor (C order)
    sha256: str
    #: each image: a path relative to the source, or ``train[i]`` for Fashion-MNIST
    items: list[str]


@dataclass(frozen=True)
class AccuracyCheck:
    """An int8 path against float32 eager PyTorch on the validation images (percentages)."""

    #: ``model.pte``, or ``bottom.pte`` followed by the float32 top in eager PyTorch
    path: str
    images: int
    fp32_accuracy: float
    int8_accuracy: float
    #: fp32 - int8, percentage points (negative: int8 did better)
    accuracy_drop: float
    #: share of images whose int8 top-1 class is the float32 model's
    top1_agreement: float
    #: largest |int8 - float32| of the path's output (logits, or features for the bottom)
    max_abs_diff: float


@dataclass(frozen=True)
class Quantization:
    """How the int8 programs were made and what they were checked against."""

    scheme: dict[str, str]
    #: the quantized files; the training program (``train.pte``) always stays float32
    programs: list[str]
    calibration: CalibrationSet
    validation: str
    #: refused above this drop, in percentage points
    max_accuracy_drop: float
    checks: list[AccuracyCheck]
    #: how activation ranges were read off the calibration images (``ExportConfig.observer``)
    observer: str = "minmax"
    #: convolutions / linear layers of ``model.pte`` kept float32 (mixed precision)
    float_layers: list[str] = field(default_factory=list)
    #: passes of quantization-aware fine-tuning over the calibration images that made ``model.pte``
    #: (``ExportConfig.qat_epochs``; 0: post-training quantization)
    qat_epochs: int = 0


@dataclass(frozen=True)
class ReplaySet:
    """Known-class training images' bottom features, int8, for device fine-tuning to mix into its
    batches (:mod:`edgetl.exporter.replay` holds the file's layout)."""

    file: str
    #: asked per known class; a class with fewer training images gives all it has
    per_class: int
    #: rows in the file
    count: int
    #: rows per class, in ``model.classes`` order (each row's label is in the file)
    class_counts: list[int]
    seed: int
    #: how the rows were drawn and computed
    drawn: str
    source: str
    #: each row's image: a path relative to the source, or ``train[i]`` for Fashion-MNIST
    items: list[str]
    #: one row, ``C x H x W`` (the training program's input per item)
    feature_shape: list[int]
    dtype: str
    scales: str
    #: the file's bytes, and per row (int8 values + an int32 label)
    bytes: int
    bytes_per_row: int
    #: against the float32 features: largest |x - dequantized|, and rms error over rms of x
    max_abs_error: float
    relative_rms_error: float


@dataclass(frozen=True)
class FileEntry:
    """A bundle file's checksum and size."""

    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """A bundle's ``manifest.json``."""

    created: Created
    model: ModelInfo
    input: InputInfo
    runtime: RuntimeInfo
    programs: Programs
    verification: Verification
    memory: MemoryFigures | None = optional()
    #: int8 exports only (absent: every program is float32)
    quantization: Quantization | None = optional()
    #: with ``--replay-per-class`` (training exports only)
    replay: ReplaySet | None = optional()
    format: str = FORMAT
    #: every file of the bundle but the manifest, by name (filled in when the bundle is committed)
    files: dict[str, FileEntry] = field(default_factory=dict)
    #: sha256 of the manifest's canonical form (filled in when the bundle is
    #: committed, see :func:`edgetl.exporter.bundle.manifest_bytes`): a hand-edited manifest is
    #: detected, and the value names the bundle (the device binds its training state to it)
    manifest_sha256: str | None = optional()

    def to_json(self) -> dict[str, Any]:
        """The JSON object ``manifest.json`` holds."""
        return dump(self)

    @classmethod
    def from_json(cls, data: Any, *, source: str = "manifest.json") -> Manifest:
        """Read the JSON object of ``manifest.json``; :class:`ExportError` when it does not fit."""
        try:
            manifest = load(cls, data)
        except Misfit as exc:
            raise ExportError(f"{source} is damaged or from another edgetl: {exc}") from None
        manifest.check_names(source)
        return manifest

    def check_names(self, source: str) -> None:
        """Raise :class:`ExportError` unless every name used as a file name is a plain name (the
        seal does not protect them: anyone can recompute it, see docs/threat-model.md). A program's
        file must also be one of ``files`` to be opened (:meth:`ExportBundle.file`)."""
        for name in self.files:
            plain_name(name, f"{source}: files", ExportError)
        p = self.programs
        programs = {"programs.inference.file": p.inference.file}
        if p.bottom is not None:
            programs["programs.bottom.file"] = p.bottom.file
        if p.training is not None:
            programs |= {"programs.training.file": p.training.file, "programs.training.data": p.training.data}
            for name in p.training.weights_layout:  # export-weights writes NAME.npy
                plain_name(name, f"{source}: programs.training.weights_layout", ExportError)
        if self.replay is not None:
            programs["replay.file"] = self.replay.file
        for key, name in programs.items():
            plain_name(name, f"{source}: {key}", ExportError)


def manifest_schema() -> dict[str, Any]:
    """The JSON Schema of ``manifest.json`` (``deploy/schema/manifest.schema.json`` holds it)."""
    return schema(Manifest, title="edgetl bundle manifest (manifest.json)", consts={"format": FORMAT})
