"""The device process of the native runner (deploy/native): its predicted peak, pure arithmetic.

A fine-tuning run of ``edgetl-device`` holds, at its peak (a training step, after the bottom's
features are cached and the bottom program is freed):

* the runtime: the binary, ExecuTorch's libraries and their heaps (:data:`NATIVE_RUNTIME_BYTES`,
  measured: ``edgetl-device`` before it loads a program);
* the cached bottom features: one per image, in memory up to the runner's feature budget (beyond
  it they live in a memory-mapped file, file-backed pages the kernel may drop);
* the weights file (``train.ptd``, memory-mapped and read in full when the program loads);
* the training program's planned arena (activations, gradients, the mutable weights; ExecuTorch's
  memory plan of the ``forward`` method, fixed at export);
* the optimizer's state: SGD's momentum buffers (one float per trainable parameter; none without
  momentum) or AdamW's two moments (two floats per trainable parameter), as
  ``edgetl.train.optim.state_floats`` counts them;
* the bundle's replay set (``replay.bin``, int8 features held in memory) when fine-tuning mixes it
  into its batches (``--replay-ratio`` above 0, the default for a bundle with one).

The terms are summed; nothing is measured here (``benchmarks/device_memory.py`` and
``tests/test_native.py`` hold this against the process's VmHWM). The runner makes the same sum
before it starts (``deploy/native/src/memory.cpp``: the exporter writes the runtime term into the
manifest, ``memory.native_runtime_bytes``, beside the arena, weights and trainable bytes) and
refuses to fine-tune when it exceeds its memory limit (cgroup or ``--memory-limit``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from edgetl.errors import ConfigError
from edgetl.train.optim import state_floats

#: edgetl-device's resident set before it loads a program (binary + ExecuTorch's libraries),
#: measured on x86-64 Linux (10.1 MiB); aarch64 builds of the same libraries are of the same size
NATIVE_RUNTIME_BYTES = 10 * 2**20
#: the runner's default --feature-budget: feature bytes kept in memory
FEATURE_BUDGET_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ProgramMemory:
    """What an exported training program costs in memory (the exporter's figures, not shapes)."""

    arena_bytes: int  # planned arena of the training step (``forward``)
    weights_file_bytes: int  # the .ptd
    trainable_bytes: int  # trainable parameters (each optimizer state float per parameter takes as much)
    feature_bytes: int  # one image's bottom features


@dataclass(frozen=True)
class NativePeakEstimate:
    """Predicted peak bytes of ``edgetl-device finetune``, by component. An estimate."""

    runtime: int
    features: int
    weights_file: int
    arena: int
    optimizer_state: int
    replay: int = 0

    @property
    def total(self) -> int:
        return self.runtime + self.features + self.weights_file + self.arena + self.optimizer_state + self.replay

    def summary(self, size: Callable[[int], str]) -> str:
        """One line for the planner (``size`` formats bytes)."""
        return (
            f"arena {size(self.arena)}, weights {size(self.weights_file)} + optimizer state {size(self.optimizer_state)}, "
            f"features {size(self.features)}" + (f", replay set {size(self.replay)}" if self.replay else "")
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def predict_native_peak(
    *,
    arena_bytes: int,
    weights_file_bytes: int,
    trainable_bytes: int,
    feature_bytes: int,
    images: int,
    optimizer_floats: int = 1,
    feature_budget: int = FEATURE_BUDGET_BYTES,
    runtime_bytes: int = NATIVE_RUNTIME_BYTES,
    replay_bytes: int = 0,
) -> NativePeakEstimate:
    """The peak of a native fine-tuning run over ``images`` images, from the training program's
    memory plan (``arena_bytes``), its weights file, the trainable bytes, one image's feature
    bytes and the optimizer's state floats per parameter (``edgetl.train.optim.state_floats``:
    SGD with momentum 1, AdamW 2), plus the replay set's file when it is mixed in
    (``replay_bytes``). Feature rows are rounded up to whole batches by the runner; that is below
    1% here."""
    if min(arena_bytes, weights_file_bytes, trainable_bytes, feature_bytes, images, optimizer_floats, replay_bytes) < 0:
        raise ConfigError("byte counts and the image count must be >= 0")
    features = images * feature_bytes
    return NativePeakEstimate(
        runtime=runtime_bytes,
        features=features if features <= feature_budget else 0,
        weights_file=weights_file_bytes,
        arena=arena_bytes,
        optimizer_state=optimizer_floats * trainable_bytes,
        replay=replay_bytes,
    )


def native_peak_of_bundle(
    manifest: dict,
    *,
    images: int,
    optimizer: str | None = None,
    momentum: float | None = None,
    feature_budget: int = FEATURE_BUDGET_BYTES,
    runtime_bytes: int | None = None,
    replay: bool | None = None,
) -> NativePeakEstimate:
    """:func:`predict_native_peak` for an exported bundle's ``manifest.json`` (its memory plan,
    file sizes and optimizer); ``optimizer`` and ``momentum`` (``edgetl-device finetune
    --optimizer``, ``--momentum``) default to the manifest's; ``runtime_bytes`` defaults to the
    manifest's ``memory.native_runtime_bytes`` (:data:`NATIVE_RUNTIME_BYTES` in bundles without it);
    ``replay`` (default: whether the bundle has a replay set, which the runner then mixes in)
    counts the replay set's file."""
    train = manifest["programs"]["training"]
    shape = train["methods"]["forward"]["inputs"][0]["shape"]
    per_image = 4 * math.prod(int(s) for s in shape[1:])  # one fp32 feature map
    named = train["optimizer"].get("name", "sgd")
    if optimizer is None:
        optimizer = named
    if momentum is None:  # the manifest's when it names SGD; torch.optim.SGD's default (0) otherwise
        momentum = float(train["optimizer"].get("momentum", 0.0)) if named == "sgd" else 0.0
    section = manifest.get("replay")
    if replay is None:
        replay = section is not None
    replay_bytes = int(manifest["files"][section["file"]]["bytes"]) if replay and section is not None else 0
    return predict_native_peak(
        arena_bytes=int(manifest["memory"]["planned_arena_bytes"]["forward"]),
        weights_file_bytes=int(manifest["files"][train["data"]]["bytes"]),
        trainable_bytes=int(manifest["memory"]["trainable_parameter_bytes"]),
        feature_bytes=per_image,
        images=images,
        optimizer_floats=state_floats(optimizer, momentum=momentum),
        feature_budget=feature_budget,
        runtime_bytes=int(manifest["memory"].get("native_runtime_bytes", NATIVE_RUNTIME_BYTES)) if runtime_bytes is None else runtime_bytes,
        replay_bytes=replay_bytes,
    )
