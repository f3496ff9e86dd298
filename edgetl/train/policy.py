"""What trains: the training policy as data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

from edgetl.errors import ConfigError
from edgetl.nn.choices import ACTIVATION_GRADS, ACTIVATION_MASKS, SAVED_PRECISIONS

if TYPE_CHECKING:  # the policy is data: reading one (a fleet's torch-free device client) loads no torch
    from torch import nn

Method = Literal["mobiletl", "vanilla"]
ActivationGrad = Literal["sign", "exact"]
ActivationMask = Literal["reuse", "packed"]
SavedPrecision = Literal["fp32", "bf16", "int8"]

METHODS: tuple[str, ...] = ("mobiletl", "vanilla")


@dataclass(frozen=True)
class TrainPolicy:
    """Which part of a network trains, and how. Applied by :func:`edgetl.prepare`.

    Attributes:
        blocks: K, the number of inverted-residual blocks trained, counted from the top. Everything
            above them (final 1x1 conv stage, classifier) trains in full. ``0`` trains the
            classifier only (the linear-probe baseline: the final conv stage stays frozen too); K =
            the model's number of blocks trains everything, stem included (full fine-tuning).
        method: ``"mobiletl"`` (shift-only internal norms, 1-bit activation masks) or
            ``"vanilla"`` (the paper's FT-BLKs baseline: the same blocks trained with ordinary
            autograd, train-mode batch norm, full-precision activations).
        activation_grad: MobileTL's activation backward. ``"sign"`` (the paper's default): the
            gradient passes where the activation input is > 0. ``"exact"``: use the true derivative
            where it is itself binary (ReLU6: 1[0 < x < 6]); Hard-Swish and SiLU have no binary
            derivative and keep the sign rule.
        activation_mask: where MobileTL's 1-bit mask lives. ``"reuse"`` (default) reads it off the
            activation output, which the next trainable conv stores anyway (zero extra bytes);
            ``"packed"`` stores a bit-packed uint8 mask per activation (numel / 8 bytes).
        bottom_chunk: run the frozen bottom in micro-batches of this many images (None: the whole
            batch at once). Beyond MobileTL: the bottom keeps nothing for backward, so only its
            working set (one layer's input and output) scales with the batch, and at large batches
            that working set, not what the trained blocks store, sets the step's peak. Outputs are
            the same up to float rounding (oneDNN picks convolution kernels by batch size:
            relative differences ~1e-7 at most, usually none); only time is spent.
        saved_precision: how the conv inputs a MobileTL block stores for backward are kept:
            ``"fp32"`` (as computed), ``"bf16"`` (rounded to nearest bfloat16, half the bytes) or
            ``"int8"`` (symmetric, one fp32 scale per channel over the batch, a quarter),
            decompressed in backward to compute the weight gradient (activation-compressed training,
            as ActNN/GACT; :mod:`edgetl.nn.compress`). Applies to the depthwise, expansion and
            projection convs and the squeeze-excitation's gating multiply of MobileTL blocks (not
            the SE's 1x1 convs on N x C x 1 x 1, nor vanilla blocks, the final conv stage or the
            head). The forward is unchanged; those convs' weight gradients and the SE gate's
            gradient (and, through it, the gradients below an SE) are approximate. An activation
            whose output only such a layer would keep stores its 1-bit mask packed
            (:func:`mask_storage`). The exporter's training program refuses it.
        recompute: keep only each trained block's input and recompute the block during backward
            (exact gradients and statistics; costs one more forward of the trained blocks). The
            final conv stage (and the stem under full fine-tuning) is recomputed the same way.
    """

    blocks: int
    method: Method = "mobiletl"
    activation_grad: ActivationGrad = "sign"
    activation_mask: ActivationMask = "reuse"
    bottom_chunk: int | None = None
    saved_precision: SavedPrecision = "fp32"
    recompute: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.blocks, bool) or not isinstance(self.blocks, int):
            raise ConfigError(f"TrainPolicy.blocks must be an integer, got {self.blocks!r}")
        if self.blocks < 0:
            raise ConfigError(f"TrainPolicy.blocks must be >= 0 (0 = classifier only), got {self.blocks}")
        if self.bottom_chunk is not None and (
            isinstance(self.bottom_chunk, bool) or not isinstance(self.bottom_chunk, int) or self.bottom_chunk < 1
        ):
            raise ConfigError(f"TrainPolicy.bottom_chunk must be an integer >= 1 or None, got {self.bottom_chunk!r}")
        if not isinstance(self.recompute, bool):
            raise ConfigError(f"TrainPolicy.recompute must be true or false, got {self.recompute!r}")
        for field, value, allowed in (
            ("method", self.method, METHODS),
            ("activation_grad", self.activation_grad, ACTIVATION_GRADS),
            ("activation_mask", self.activation_mask, ACTIVATION_MASKS),
            ("saved_precision", self.saved_precision, SAVED_PRECISIONS),
        ):
            if value not in allowed:
                raise ConfigError(f"unknown TrainPolicy.{field} {value!r}; expected one of {', '.join(allowed)}")

    def check_blocks(self, num_blocks: int) -> None:
        """Raise if K exceeds the number of blocks of a model."""
        if self.blocks > num_blocks:
            raise ConfigError(f"TrainPolicy.blocks={self.blocks} but the model has only {num_blocks} inverted-residual blocks")

    def to_dict(self) -> dict:
        return asdict(self)


# --- MobileTL's rules, stated once (prepare() applies them; the profiler predicts from them) ------

T = TypeVar("T")


def uses_mobiletl(policy: TrainPolicy, unit: nn.Module) -> bool:
    """Whether ``unit`` (a trained unit of ``features``) is rewritten by MobileTL: inverted-residual
    blocks only; the stem, the final conv stage and the head train with ordinary autograd."""
    from edgetl.models.blocks import is_irb

    return policy.method == "mobiletl" and is_irb(unit)


def shift_only_norms(norms: Sequence[T]) -> list[T]:
    """The norms of a MobileTL block that train their shift only: every norm but the last. The
    last (after the projection conv) trains fully, in train mode."""
    return list(norms[:-1])


def mask_storage(activation_mask: str, saved_precision: str, feeds_compressed: bool) -> str:
    """Where a MobileTL activation keeps its 1-bit mask (``TrainPolicy`` fields): ``activation_mask``,
    except that with a compressed ``saved_precision`` an activation whose output goes into a layer
    that stores it compressed (a conv, directly or through zero padding, or a squeeze-excitation's
    gating multiply) keeps it ``"packed"``. That layer stores only a lossy copy, which the mask
    cannot be read off (int8 rounds small positives to 0), and ``"reuse"`` would keep the fp32
    output for the mask alone."""
    return "packed" if saved_precision != "fp32" and feeds_compressed else activation_mask
