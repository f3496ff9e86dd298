"""MobileTL's layers: the shift-only norm and the masked activation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from edgetl.nn import ops
from edgetl.nn.choices import ACTIVATION_MASKS


class ShiftOnlyNorm(nn.Module):
    """A frozen batch norm whose shift (beta) alone trains: ``y = x * s + (beta - mu * s)``.

    ``s = gamma / sqrt(var + eps)`` and the statistics are frozen buffers, so the layer is a
    per-channel affine map: ``dx = s * dy`` and ``dbeta = sum(dy)`` need only per-channel constants
    and autograd stores no activation for it (an eval-mode ``nn.BatchNorm2d`` would still save its
    input). Frozen values are buffers, not ``requires_grad=False`` parameters, so exported training
    graphs see them as constants. State-dict keys are those of ``nn.BatchNorm2d``, so a trained
    model loads back into the original torchvision architecture.
    """

    scale: Tensor
    offset: Tensor

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("ShiftOnlyNorm needs a batch norm with running statistics")
        c = bn.num_features
        weight = bn.weight.detach().clone() if bn.weight is not None else torch.ones(c)
        bias = bn.bias.detach().clone() if bn.bias is not None else torch.zeros(c)
        self.eps = bn.eps
        self.register_buffer("weight", weight)
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked.detach().clone())
        self.bias = nn.Parameter(bias)
        # s and -mu*s, derived once: buffers so autograd saves a view of constant storage
        self.register_buffer("scale", torch.empty_like(weight), persistent=False)
        self.register_buffer("offset", torch.empty_like(weight), persistent=False)
        self._refresh()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._refresh())

    @torch.no_grad()
    def _refresh(self) -> None:
        self.scale.copy_(self.weight * torch.rsqrt(self.running_var + self.eps))
        self.offset.copy_(-self.running_mean * self.scale)

    @property
    def num_features(self) -> int:
        return self.weight.numel()

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        # one fused kernel: x * s + b in a single output, no full-size temporary for x * s
        return torch.addcmul((self.bias + self.offset).view(shape), x, self.scale.view(shape))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, trains=shift"


class MaskedActivation(nn.Module):
    """An activation with its exact forward and MobileTL's 1-bit-mask backward.

    ``mask="reuse"`` reads the mask off the output (zero bytes when the next layer stores that
    output, as inside every inverted-residual block); ``mask="packed"`` stores it bit-packed.
    Gates (``hardsigmoid``, ``sigmoid``) always use the exact derivative read off their output.
    """

    def __init__(self, kind: str, rule: str = "sign", mask: str = "reuse") -> None:
        super().__init__()
        if kind not in ops.ACTIVATION_KINDS:
            raise ValueError(f"unknown activation kind {kind!r}; expected one of {ops.ACTIVATION_KINDS}")
        if mask not in ACTIVATION_MASKS:
            raise ValueError(f"unknown activation mask storage {mask!r}; expected one of {ACTIVATION_MASKS}")
        self.kind = kind
        self.rule = rule
        self.mask = "reuse" if kind in ops.GATE_KINDS else mask

    def forward(self, x: Tensor) -> Tensor:
        if self.mask == "packed":
            return ops.masked_act_packed(x, self.kind, self.rule)[0]
        return ops.masked_act(x, self.kind, self.rule)

    def extra_repr(self) -> str:
        return f"{self.kind}, grad={self.rule}, mask={self.mask}"


def activation_kind(module: nn.Module) -> str | None:
    """The edgetl kind of a torch activation module, or None if it is not one."""
    if isinstance(module, MaskedActivation):
        return module.kind
    if isinstance(module, nn.ReLU6):
        return "relu6"
    if isinstance(module, nn.Hardtanh) and module.min_val == 0.0 and module.max_val == 6.0:
        return "relu6"
    for cls, kind in (
        (nn.ReLU, "relu"),
        (nn.Hardswish, "hardswish"),
        (nn.SiLU, "silu"),
        (nn.Hardsigmoid, "hardsigmoid"),
        (nn.Sigmoid, "sigmoid"),
    ):
        if isinstance(module, cls):
            return kind
    return None


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "SAME" zero padding (before, after) of one spatial dimension of ``size`` pixels:
    the output has ``ceil(size / stride)`` pixels, and the odd pixel of padding goes after."""
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class SamePad2d(nn.Module):
    """TensorFlow's "SAME" zero padding for a conv of ``kernel``, ``stride``, ``dilation``, computed
    from each input's size (timm's ``tf_*`` models pad this way on their stride-2 convs). The conv
    after it has ``padding=0``. Backward is a slice: it keeps nothing for backward, the next conv
    keeps the padded tensor."""

    def __init__(self, kernel: int, stride: int, dilation: int = 1) -> None:
        super().__init__()
        self.kernel, self.stride, self.dilation = kernel, stride, dilation

    def padding(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(left, right, top, bottom)`` for an input of ``height`` x ``width``."""
        k, s, d = self.kernel, self.stride, self.dilation
        return (*same_padding(width, k, s, d), *same_padding(height, k, s, d))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.pad(x, self.padding(x.shape[-2], x.shape[-1]))

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}, dilation={self.dilation}"
