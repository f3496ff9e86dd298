"""Apply a :class:`TrainPolicy` to a network: the one function that decides what trains."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import SqueezeExcitation, StochasticDepth

from edgetl.errors import ConfigError
from edgetl.models.blocks import feature_units, find_blocks, first_trained_unit, is_irb
from edgetl.nn import ops
from edgetl.nn.compress import CompressedConv2d, compress_gating
from edgetl.nn.layers import MaskedActivation, SamePad2d, ShiftOnlyNorm, activation_kind
from edgetl.train.bottom import run_frozen
from edgetl.train.policy import TrainPolicy, mask_storage, shift_only_norms, uses_mobiletl


class TransferModel(nn.Module):
    """A network split for transfer learning: frozen bottom, trained top, head.

    ``forward(x) == forward_top(forward_bottom(x))``. The bottom (every unit of ``features`` below
    the top K blocks) always runs in eval mode under ``torch.no_grad()``, so autograd keeps
    nothing for it; its output can be cached (:mod:`edgetl.train.cache`). State-dict keys are the
    original model's (``features.*``, ``classifier.*``), so a trained state dict loads back into
    the plain torchvision architecture.
    """

    def __init__(self, model: nn.Module, policy: TrainPolicy) -> None:
        super().__init__()
        units = feature_units(model)
        blocks = [name for name, unit in units if is_irb(unit)]
        policy.check_blocks(len(blocks))
        self.policy = policy
        self.features = model.features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = model.classifier
        split = first_trained_unit(units, policy.blocks)
        self.bottom_names = [name for name, _ in units[:split]]
        self.top_names = [name for name, _ in units[split:]]
        self.trained_block_names = blocks[len(blocks) - policy.blocks :]
        self.num_blocks = len(blocks)

    def _unit(self, name: str) -> nn.Module:
        return self.get_submodule(name)

    def bottom_units(self) -> list[nn.Module]:
        return [self._unit(n) for n in self.bottom_names]

    def top_units(self) -> list[nn.Module]:
        return [self._unit(n) for n in self.top_names]

    def train(self, mode: bool = True) -> TransferModel:
        super().train(mode)
        for unit in self.bottom_units():
            unit.eval()  # frozen statistics below the trained blocks, always
        return self

    def forward_bottom(self, x: Tensor) -> Tensor:
        """The frozen part: no autograd, eval mode; in micro-batches of ``policy.bottom_chunk``."""
        chunk = self.policy.bottom_chunk
        with torch.no_grad():
            if chunk is None or x.shape[0] <= chunk:
                return self._run_bottom(x)
            first = self._run_bottom(x[:chunk])
            # one output tensor filled in place: the features are held once, beside one chunk's working set
            out = first.new_empty((x.shape[0], *first.shape[1:]))
            out[:chunk] = first
            del first
            for start in range(chunk, x.shape[0], chunk):
                out[start : start + chunk] = self._run_bottom(x[start : start + chunk])
            return out

    def _run_bottom(self, x: Tensor) -> Tensor:
        return run_frozen(self.bottom_units(), x)

    def forward_top(self, x: Tensor) -> Tensor:
        """The trained part, from the bottom's output to logits."""
        for unit in self.top_units():
            x = unit(x)
        return self.classifier(torch.flatten(self.pool(x), 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_top(self.forward_bottom(x))

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]


def _set_child(root: nn.Module, qualified: str, new: nn.Module) -> None:
    parent_name, _, attr = qualified.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)


def apply_mobiletl(block: nn.Module, policy: TrainPolicy) -> None:
    """Rewrite one IRB in place for MobileTL.

    Every norm but the block's last becomes a :class:`ShiftOnlyNorm`; the last (after the
    projection conv) stays a train-mode ``BatchNorm2d``. Every activation, including the
    squeeze-excitation's, becomes a :class:`MaskedActivation`.

    Squeeze-excitation decision: its two 1x1 convs train like the block's other convs; its inner
    activation (ReLU / SiLU on N x C/4 x 1 x 1) takes the masked backward, mask read off its
    output, which fc2 stores; its gate (Hard-Sigmoid / Sigmoid) keeps its exact derivative, read off
    its output, which the gating multiply stores. The multiply stores the SE input (the depthwise
    activation's output) for the gate's gradient: a full expanded map, which is the SE's price.
    """
    norms = [name for name, m in block.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for name in shift_only_norms(norms):
        _set_child(block, name, ShiftOnlyNorm(block.get_submodule(name)))
    for name, module in list(block.named_modules()):
        kind = activation_kind(module)
        if kind is not None and not isinstance(module, MaskedActivation):
            _set_child(block, name, MaskedActivation(kind, policy.activation_grad, policy.activation_mask))
    if policy.saved_precision != "fp32":
        _compress_saved_conv_inputs(block, policy)


def _compress_saved_conv_inputs(block: nn.Module, policy: TrainPolicy) -> None:
    """``policy.saved_precision`` inside a MobileTL block: its expansion, depthwise and projection
    convs keep their input compressed (:class:`~edgetl.nn.compress.CompressedConv2d`), so does a
    squeeze-excitation's gating multiply (:func:`~edgetl.nn.compress.compress_gating`: its input is
    a full expanded map), and an activation feeding one of them keeps its mask packed
    (:func:`~edgetl.train.policy.mask_storage`). The squeeze-excitation's 1x1 convs (on N x C x 1 x 1:
    a few KiB) keep fp32 inputs."""
    se = [name for name, m in block.named_modules() if isinstance(m, SqueezeExcitation)]
    # the block's layers in forward order, a squeeze-excitation as one, zero padding left out
    layers = [
        (name, m)
        for name, m in block.named_modules()
        if name
        and not any(name.startswith(f"{s}.") for s in se)
        and (isinstance(m, SqueezeExcitation) or not list(m.children()))
        and not isinstance(m, (nn.ZeroPad2d, SamePad2d, nn.Identity))
    ]
    for (name, m), (_, following) in zip(layers, layers[1:] + [("", None)], strict=True):
        if isinstance(m, nn.Conv2d):
            _set_child(block, name, CompressedConv2d(m, policy.saved_precision))
        elif isinstance(m, SqueezeExcitation):
            compress_gating(m, policy.saved_precision)
        elif isinstance(m, MaskedActivation) and m.kind not in ops.GATE_KINDS:
            feeds_compressed = isinstance(following, (nn.Conv2d, SqueezeExcitation))
            mask = mask_storage(policy.activation_mask, policy.saved_precision, feeds_compressed)
            _set_child(block, name, MaskedActivation(m.kind, m.rule, mask))


# --- policy.recompute: activation checkpointing of the trained units ---------------------------


@contextmanager
def _scratch_running_stats(unit: nn.Module) -> Iterator[None]:
    """While ``unit`` is recomputed in backward, its train-mode batch norms update scratch copies of
    their running statistics: the forward already applied the momentum update once. The outputs
    (and every tensor saved for backward) are the same, as train mode normalises with the batch's
    own statistics; only the buffers the update writes to differ, and those are thrown away."""
    swapped = []
    for bn in unit.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.training and bn.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                kept = getattr(bn, name)
                if kept is not None:
                    swapped.append((bn, name, kept))
                    setattr(bn, name, kept.clone())
    try:
        yield
    finally:
        for bn, name, kept in swapped:
            setattr(bn, name, kept)


class Recomputed(nn.Module):
    """Mixin for a unit of ``features`` trained under ``policy.recompute``: in train mode with
    autograd on, the unit runs under non-reentrant activation checkpointing. Autograd then stores
    only the unit's input; backward runs the unit's forward again (same RNG state, so the same
    dropout / stochastic-depth draws; running statistics not updated twice) to get what the unit
    would have stored. Gradients are bit for bit those of the plain unit.

    :func:`prepare` swaps a unit's class for a subclass of it with this mixin first
    (:func:`recomputed_class`): the module, its children, parameter names and state-dict keys stay
    those of the architecture; ``type(unit).__name__`` too.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x)
        return checkpoint(
            super().forward,
            x,
            use_reentrant=False,
            preserve_rng_state=_draws_random_numbers(self),
            context_fn=lambda: (nullcontext(), _scratch_running_stats(self)),
        )


def _draws_random_numbers(unit: nn.Module) -> bool:
    """Whether ``unit`` (in train mode) draws random numbers: dropout or stochastic depth with p > 0.
    Only then does the checkpoint keep the CPU generator's state (5056 bytes, beside what autograd
    stores) to replay the same draws in the recomputation."""
    return any(isinstance(m, (nn.Dropout, StochasticDepth)) and m.p > 0 for m in unit.modules())


_RECOMPUTED: dict[type, type] = {}


def recomputed_class(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` with :class:`Recomputed` in front (one class per ``cls``, same ``__name__``)."""
    if issubclass(cls, Recomputed):
        return cls
    if cls not in _RECOMPUTED:
        _RECOMPUTED[cls] = type(cls.__name__, (Recomputed, cls), {"__qualname__": f"Recomputed[{cls.__qualname__}]"})
    return _RECOMPUTED[cls]


def prepare(model: nn.Module, policy: TrainPolicy) -> TransferModel:
    """Return a copy of ``model`` ready to train under ``policy``.

    Lower blocks, the stem and (for ``blocks=0``) the final conv stage are frozen and run without
    autograd; with K = all blocks nothing is frozen (full fine-tuning, stem included). For
    ``method="mobiletl"`` the top K blocks are rewritten by :func:`apply_mobiletl`; for
    ``"vanilla"`` they train with ordinary autograd. The final 1x1 conv stage (for K >= 1) and
    the classifier train in full. ``model`` itself is left unchanged. ``policy.saved_precision``
    applies to MobileTL blocks only: vanilla blocks, the stem, the final conv stage and the head
    keep fp32 inputs (ordinary autograd, the baselines MobileTL is compared against).

    ``policy.recompute``: every trained unit of ``features`` (each trained block, the final conv
    stage, and the stem under full fine-tuning) becomes :class:`Recomputed`. The final conv stage is
    included because it is the widest map of the top (e.g. 960 channels over MobileNetV3-Large's 160
    input channels: without recompute it stores its conv output and activation input, ~12x its input)
    and its recomputation is one 1x1 conv; the head (pooled vectors) is not worth it.
    """
    if not isinstance(policy, TrainPolicy):
        raise ConfigError(f"policy must be a TrainPolicy, got {type(policy).__name__}")
    if not find_blocks(model):
        raise ConfigError(f"{type(model).__name__} has no inverted-residual blocks")
    net = TransferModel(copy.deepcopy(model), policy)
    for p in net.parameters():
        p.requires_grad_(False)
    for name in net.top_names:
        unit = net.get_submodule(name)
        if uses_mobiletl(policy, unit):
            apply_mobiletl(unit, policy)
        for p in unit.parameters():
            p.requires_grad_(True)
        if policy.recompute:
            unit.__class__ = recomputed_class(type(unit))
    for p in net.classifier.parameters():
        p.requires_grad_(True)
    return net.train()
