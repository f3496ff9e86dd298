"""MobileTL's operators: bit-packed activation masks and masked activations.

The activations keep their exact forward but back-propagate through a 1-bit mask (the paper's
"signed" approximation: the gradient passes where the activation input is > 0). They are
``torch.library.custom_op`` s with ``register_autograd`` because that is the one formulation
whose custom backward survives ``torch.export`` / ``_export_forward_backward`` (a
``torch.autograd.Function`` is silently differentiated exactly there), so the same operator serves
eager training and the ExecuTorch trainable program.

Two ways to keep the mask, chosen per activation by the policy's ``activation_mask``:

* ``"reuse"`` (``edgetl::masked_act``): backward reads the activation's *output*. Inside an
  inverted-residual block that output is the input of the next trainable conv (depthwise,
  projection, SE fc2) or of the SE multiply, which autograd stores anyway; saving the same tensor
  again costs zero bytes. It works because act(x) > 0 exactly where x > 0 for ReLU, ReLU6,
  Hard-Swish and SiLU, and 0 < act(x) < 6 exactly where 0 < x < 6 for ReLU6.
* ``"packed"`` (``edgetl::masked_act_packed``): the forward also returns the mask bit-packed
  into ``uint8`` (ceil(numel / 8) bytes) and backward reads only that. This is what an activation
  whose output nobody else keeps needs.

The squeeze-excitation gate (Hard-Sigmoid, Sigmoid) works on N x C x 1 x 1 tensors and its output
is stored by the gating multiply, so it keeps its exact derivative, computed from that output:
Hard-Sigmoid' = 1[0 < y < 1] / 6 (a binary mask, so exact), Sigmoid' = y (1 - y).
"""

from __future__ import annotations

import torch
from torch import Tensor

from edgetl.nn.choices import ACTIVATION_GRADS

#: Activation kinds edgetl knows, by the name used in the operators' ``kind`` argument.
ACTIVATION_KINDS = ("relu", "relu6", "hardswish", "silu", "hardsigmoid", "sigmoid")
#: Kinds used as squeeze-excitation gates: always exact, derivative from the output.
GATE_KINDS = frozenset({"hardsigmoid", "sigmoid"})
GRAD_RULES = ACTIVATION_GRADS


def _bit_weights(device: torch.device) -> Tensor:
    """1, 2, 4, ..., 128 as int32. Computed, not a ``torch.tensor`` literal: a literal inside the
    packed activation's backward becomes a graph constant that ``_export_forward_backward`` rejects."""
    return torch.pow(2, torch.arange(8, dtype=torch.int32, device=device))


def packed_numel(numel: int) -> int:
    """Bytes of a bit-packed mask of ``numel`` elements: ceil(numel / 8)."""
    return (numel + 7) // 8


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a boolean tensor into a flat ``uint8`` tensor, 8 elements a byte, LSB first."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    # sum of at most 255 fits uint8; sum() would promote, so accumulate as int32 then narrow
    return (flat.view(-1, 8).to(torch.int32) * _bit_weights(mask.device)).sum(dim=1).to(torch.uint8)


def pack_bits_lean(mask: Tensor) -> Tensor:
    """:func:`pack_bits`, the same bytes, with temporaries of ``numel / 8`` bytes instead of 9 bytes an
    element (a uint8 copy, an int32 copy and their product): what the eager operator runs, so that
    packing a mask does not set the top forward's peak. :func:`pack_bits` stays the exported form
    (plain arithmetic that every ExecuTorch runtime has)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8).view(torch.uint8)  # a bool is one byte, 0 or 1: reinterpreted, not copied
    packed = bits[:, 0].clone()
    for i in range(1, 8):
        packed |= bits[:, i] << i
    return packed


def unpack_bits(packed: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_bits`: a boolean tensor of ``shape``."""
    numel = 1
    for s in shape:
        numel *= s
    weights = _bit_weights(packed.device).to(torch.uint8)
    bits = torch.bitwise_and(packed.view(-1, 1), weights.view(1, 8)) != 0
    return bits.reshape(-1)[:numel].reshape(shape)


def activation_forward(x: Tensor, kind: str) -> Tensor:
    """The exact forward of activation ``kind`` (never in place)."""
    if kind == "relu":
        return torch.relu(x)
    if kind == "relu6":
        return torch.clamp(x, 0.0, 6.0)
    if kind == "hardswish":
        return torch.nn.functional.hardswish(x)
    if kind == "silu":
        return torch.nn.functional.silu(x)
    if kind == "hardsigmoid":
        return torch.nn.functional.hardsigmoid(x)
    if kind == "sigmoid":
        return torch.sigmoid(x)
    raise ValueError(f"unknown activation kind {kind!r}; expected one of {ACTIVATION_KINDS}")


def _check(kind: str, rule: str) -> None:
    if kind not in ACTIVATION_KINDS:
        raise ValueError(f"unknown activation kind {kind!r}; expected one of {ACTIVATION_KINDS}")
    if rule not in GRAD_RULES:
        raise ValueError(f"unknown activation-gradient rule {rule!r}; expected one of {GRAD_RULES}")


def mask_from_input(x: Tensor, kind: str, rule: str) -> Tensor:
    """Where the gradient passes, computed from the activation input (non-gate kinds)."""
    if rule == "exact" and kind == "relu6":
        return (x > 0) & (x < 6)
    return x > 0  # "sign" rule; also "exact" for ReLU (its derivative is 1[x > 0])


def mask_from_output(y: Tensor, kind: str, rule: str) -> Tensor:
    """The same mask as :func:`mask_from_input`, read off the activation output."""
    if rule == "exact" and kind == "relu6":
        return (y > 0) & (y < 6)
    return y > 0  # act(x) > 0 <=> x > 0 for relu, relu6, hardswish, silu


def _gate_grad(grad: Tensor, y: Tensor, kind: str) -> Tensor:
    if kind == "hardsigmoid":
        return grad * ((y > 0) & (y < 1)).to(grad.dtype) / 6.0
    return grad * y * (1.0 - y)


# --- "reuse": backward reads the activation output -------------------------------------------


@torch.library.custom_op("edgetl::masked_act", mutates_args=())
def masked_act(x: Tensor, kind: str, rule: str) -> Tensor:
    """Activation ``kind`` whose backward is a 1-bit mask read off its own output."""
    _check(kind, rule)
    return activation_forward(x, kind)


@masked_act.register_fake
def _(x: Tensor, kind: str, rule: str) -> Tensor:
    return torch.empty_like(x)


def _masked_act_setup(ctx, inputs, output) -> None:
    _, ctx.kind, ctx.rule = inputs
    ctx.save_for_backward(output)


def _masked_act_backward(ctx, grad: Tensor):
    (y,) = ctx.saved_tensors
    return mask_grad(grad, y, ctx.kind, ctx.rule), None, None


# The backward formulas are operators of their own, so that an exported training program can run
# each as one kernel (deploy/native/kernels) instead of its ATen decomposition.
@torch.library.custom_op("edgetl::mask_grad", mutates_args=())
def mask_grad(grad: Tensor, y: Tensor, kind: str, rule: str) -> Tensor:
    """:func:`masked_act`'s backward: ``grad`` where the mask read off the output ``y`` is set, else 0
    (a gate: its exact derivative from ``y``)."""
    return mask_grad_aten(grad, y, kind, rule)


@mask_grad.register_fake
def _(grad: Tensor, y: Tensor, kind: str, rule: str) -> Tensor:
    return torch.empty_like(grad)


def mask_grad_aten(grad: Tensor, y: Tensor, kind: str, rule: str) -> Tensor:
    """:func:`mask_grad` in ATen operators."""
    if kind in GATE_KINDS:
        return _gate_grad(grad, y, kind)
    # where, not grad * mask.to(dtype): the same values without a float copy of the mask (the
    # cast is the slowest kernel of an ExecuTorch training step on portable kernels)
    return torch.where(mask_from_output(y, kind, rule), grad, 0.0)


masked_act.register_autograd(_masked_act_backward, setup_context=_masked_act_setup)


# --- "packed": backward reads a bit-packed uint8 mask ----------------------------------------


@torch.library.custom_op("edgetl::masked_act_packed", mutates_args=())
def masked_act_packed(x: Tensor, kind: str, rule: str) -> tuple[Tensor, Tensor]:
    """Activation ``kind`` returning ``(output, packed_mask)``; backward needs only the mask."""
    _check(kind, rule)
    if kind in GATE_KINDS:
        raise ValueError(f"{kind} is a gate: its exact derivative is read off its output, use masked_act")
    return activation_forward(x, kind), pack_bits_lean(mask_from_input(x, kind, rule))


@masked_act_packed.register_fake
def _(x: Tensor, kind: str, rule: str) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), x.new_empty((packed_numel(x.numel()),), dtype=torch.uint8)


def _packed_setup(ctx, inputs, output) -> None:
    x = inputs[0]
    ctx.shape = x.shape
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _packed_backward(ctx, grad: Tensor, _grad_mask: Tensor | None):
    (packed,) = ctx.saved_tensors
    return packed_mask_grad(grad, packed), None, None


@torch.library.custom_op("edgetl::packed_mask_grad", mutates_args=())
def packed_mask_grad(grad: Tensor, packed: Tensor) -> Tensor:
    """:func:`masked_act_packed`'s backward: ``grad`` where the bit-packed mask is set, else 0."""
    return packed_mask_grad_aten(grad, packed)


@packed_mask_grad.register_fake
def _(grad: Tensor, packed: Tensor) -> Tensor:
    return torch.empty_like(grad)


def packed_mask_grad_aten(grad: Tensor, packed: Tensor) -> Tensor:
    """:func:`packed_mask_grad` in ATen operators."""
    return torch.where(unpack_bits(packed, grad.shape), grad, 0.0)


masked_act_packed.register_autograd(_packed_backward, setup_context=_packed_setup)
