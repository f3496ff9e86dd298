"""The trained top in channels-last (NHWC) form: what the ExecuTorch training program runs.

Why: ExecuTorch's portable CPU kernels have a naive convolution, and a 1x1 convolution in NCHW
becomes a matrix product only through permutes, which are just as slow there. Channels-last makes
every 1x1 convolution (expansion, projection, squeeze-excitation fc, final conv stage) a plain
``mm`` with no activation permute in its forward and one in its backward (dW = dY^T X).
Depthwise convolutions become a custom operator whose forward and backward are shifted-window
multiply-adds (elementwise kernels), and whose backward recomputes the windows from the saved
input, so the program keeps one tensor per depthwise conv for backward, as autograd does in
eager, and not one per kernel tap.

The conversion swaps leaf modules only and keeps every parameter and buffer *object*, so names
(``features.16.conv.0.0.weight``) are the torchvision state-dict keys and the blocks' own
``forward`` code (residuals, squeeze-excitation gating) runs unchanged. What it stores for
backward matches the eager MobileTL model:

* 1x1 conv: its input (as ``F.linear`` saves it); shift-only norm: nothing;
* train-mode batch norm: written out so autograd keeps only its input (``x * a + b`` with
  per-channel ``a``, ``b`` from ``var_mean``); running statistics update in place, as
  ``nn.BatchNorm2d`` does (momentum, unbiased variance);
* masked activations: unchanged (layout-agnostic custom ops).

Dropout and stochastic depth become identities: the portable kernels could draw the noise, but
a deterministic program is what lets an export verify itself step for step against eager PyTorch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import StochasticDepth

from edgetl.exporter.errors import UnsupportedModelError
from edgetl.nn import ops
from edgetl.nn.layers import MaskedActivation, SamePad2d, ShiftOnlyNorm, activation_kind
from edgetl.train.prepare import TransferModel

DW_OP = "edgetl_export::depthwise_nhwc"
DW_GRAD_INPUT_OP = "edgetl_export::depthwise_grad_input"
DW_GRAD_WEIGHT_OP = "edgetl_export::depthwise_grad_weight"
PW_OP = "edgetl_export::pointwise_nhwc"
PW_GRAD_INPUT_OP = "edgetl_export::pointwise_grad_input"
PW_GRAD_WEIGHT_OP = "edgetl_export::pointwise_grad_weight"
MEAN_OP = "edgetl_export::spatial_mean"
MEAN_GRAD_OP = "edgetl_export::spatial_mean_grad"
AFFINE_OP = "edgetl_export::channel_affine"
SCALE_OP = "edgetl_export::channel_scale"
SUM_OP = "edgetl_export::channel_sum"
DOT_OP = "edgetl_export::channel_dot"
ACT_OP = "edgetl_export::activation"
MASK_GRAD_OP = "edgetl_export::mask_grad"
EXACT_ACT_GRAD_OP = "edgetl_export::exact_act_grad"
PACKED_MASK_GRAD_OP = "edgetl_export::packed_mask_grad"


# --- depthwise convolution ---------------------------------------------------------------------


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _window(xp: Tensor, i: int, j: int, stride: int, ho: int, wo: int) -> Tensor:
    """The input pixels kernel tap (i, j) sees, for every output pixel: N x Ho x Wo x C."""
    return xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :]


def _pad_hw(x: Tensor, padding: int) -> Tensor:
    return F.pad(x, (0, 0, padding, padding, padding, padding)) if padding else x


def depthwise_forward(x: Tensor, weight: Tensor, stride: int, padding: int) -> Tensor:
    """Depthwise convolution of NHWC ``x`` with ``weight`` (C x 1 x k x k) as k*k multiply-adds."""
    k = weight.shape[-1]
    xp = _pad_hw(x, padding)
    ho, wo = _out_size(x.shape[1], k, stride, padding), _out_size(x.shape[2], k, stride, padding)
    y = None
    for i in range(k):
        for j in range(k):
            term = _window(xp, i, j, stride, ho, wo) * weight[:, 0, i, j]
            y = term if y is None else y + term
    return y


def _dilate(t: Tensor, stride: int, dim: int) -> Tensor:
    """Insert ``stride - 1`` zeros between neighbours along ``dim`` (the transpose of striding)."""
    if stride == 1:
        return t
    stacked = torch.stack([t] + [torch.zeros_like(t)] * (stride - 1), dim=dim + 1)
    shape = list(t.shape)
    shape[dim] *= stride
    return stacked.reshape(shape).narrow(dim, 0, (t.shape[dim] - 1) * stride + 1)


def depthwise_grad_input(dy: Tensor, weight: Tensor, x_shape: list[int], stride: int, padding: int) -> Tensor:
    """dL/dx of :func:`depthwise_forward`: each tap's contribution placed back by zero padding."""
    _, h, w, _ = x_shape
    k = weight.shape[-1]
    hp, wp = h + 2 * padding, w + 2 * padding
    d = _dilate(_dilate(dy, stride, 1), stride, 2)
    hd, wd = d.shape[1], d.shape[2]
    gxp = None
    for i in range(k):
        for j in range(k):
            term = F.pad(d * weight[:, 0, i, j], (0, 0, j, wp - j - wd, i, hp - i - hd))
            gxp = term if gxp is None else gxp + term
    return gxp[:, padding : padding + h, padding : padding + w, :] if padding else gxp


def depthwise_grad_weight(dy: Tensor, x: Tensor, weight_shape: list[int], stride: int, padding: int) -> Tensor:
    """dL/dweight of :func:`depthwise_forward`, the windows recomputed from the saved input."""
    k = weight_shape[-1]
    xp = _pad_hw(x, padding)
    n, ho, wo, c = dy.shape
    # the per-channel sum over pixels as a (1 x pixels) @ (pixels x C) product: ExecuTorch's
    # portable sum over leading dims walks memory with stride C, mm does not
    ones = dy.new_ones((1, n * ho * wo))
    taps = [torch.mm(ones, (dy * _window(xp, i, j, stride, ho, wo)).reshape(n * ho * wo, c)) for i in range(k) for j in range(k)]
    return torch.cat(taps, dim=0).t().reshape(weight_shape)


@torch.library.custom_op(DW_OP, mutates_args=())
def depthwise_nhwc(x: Tensor, weight: Tensor, stride: int, padding: int) -> Tensor:
    """NHWC depthwise convolution; backward keeps only ``x`` and ``weight``."""
    # eager: the native kernel (fast); exported programs get depthwise_forward (DECOMPOSITIONS)
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, stride=stride, padding=padding, groups=weight.shape[0])
    return y.permute(0, 2, 3, 1).contiguous()


@depthwise_nhwc.register_fake
def _(x: Tensor, weight: Tensor, stride: int, padding: int) -> Tensor:
    k = weight.shape[-1]
    n, h, w, c = x.shape
    return x.new_empty((n, _out_size(h, k, stride, padding), _out_size(w, k, stride, padding), c))


@torch.library.custom_op(DW_GRAD_INPUT_OP, mutates_args=())
def depthwise_grad_input_op(dy: Tensor, weight: Tensor, h: int, w: int, stride: int, padding: int) -> Tensor:
    """dL/dx of :func:`depthwise_nhwc` as one operator (a native kernel on the device)."""
    return depthwise_grad_input(dy, weight, [dy.shape[0], h, w, dy.shape[3]], stride, padding)


@depthwise_grad_input_op.register_fake
def _(dy: Tensor, weight: Tensor, h: int, w: int, stride: int, padding: int) -> Tensor:
    return dy.new_empty((dy.shape[0], h, w, dy.shape[3]))


@torch.library.custom_op(DW_GRAD_WEIGHT_OP, mutates_args=())
def depthwise_grad_weight_op(dy: Tensor, x: Tensor, k: int, stride: int, padding: int) -> Tensor:
    """dL/dweight of :func:`depthwise_nhwc` as one operator (a native kernel on the device)."""
    return depthwise_grad_weight(dy, x, [x.shape[3], 1, k, k], stride, padding)


@depthwise_grad_weight_op.register_fake
def _(dy: Tensor, x: Tensor, k: int, stride: int, padding: int) -> Tensor:
    return x.new_empty((x.shape[3], 1, k, k))


def _dw_setup(ctx, inputs, output) -> None:
    x, weight, ctx.stride, ctx.padding = inputs
    ctx.x_shape = list(x.shape)
    ctx.w_shape = list(weight.shape)
    ctx.save_for_backward(x, weight)


def _dw_backward(ctx, dy: Tensor):
    x, weight = ctx.saved_tensors
    _, h, w, _ = ctx.x_shape
    gx = depthwise_grad_input_op(dy, weight, h, w, ctx.stride, ctx.padding) if ctx.needs_input_grad[0] else None
    gw = depthwise_grad_weight_op(dy, x, ctx.w_shape[-1], ctx.stride, ctx.padding) if ctx.needs_input_grad[1] else None
    return gx, gw, None, None


depthwise_nhwc.register_autograd(_dw_backward, setup_context=_dw_setup)


def _decompose_depthwise(x: Tensor, weight: Tensor, stride: int, padding: int) -> Tensor:
    return depthwise_forward(x, weight, stride, padding)


# --- 1x1 convolution -----------------------------------------------------------------------


@torch.library.custom_op(PW_OP, mutates_args=())
def pointwise_nhwc(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight[:, :, 0, 0]^T`` for 2-D ``x`` (pixels x channels), a 1x1 convolution's weight or
    a linear layer's (``Cout x Cin``); backward keeps ``x`` and the weight itself, not a transposed
    copy of it."""
    return _pointwise_forward(x, weight)


@pointwise_nhwc.register_fake
def _(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op(PW_GRAD_INPUT_OP, mutates_args=())
def pointwise_grad_input_op(dy: Tensor, weight: Tensor) -> Tensor:
    """dL/dx of :func:`pointwise_nhwc`: ``dy @ weight[:, :, 0, 0]``."""
    return _pointwise_grad_input(dy, weight)


@pointwise_grad_input_op.register_fake
def _(dy: Tensor, weight: Tensor) -> Tensor:
    return dy.new_empty((dy.shape[0], weight.shape[1]))


@torch.library.custom_op(PW_GRAD_WEIGHT_OP, mutates_args=())
def pointwise_grad_weight_op(dy: Tensor, x: Tensor, rank: int) -> Tensor:
    """dL/dweight of :func:`pointwise_nhwc`: ``dy^T @ x`` as a weight of ``rank`` 4 (Cout x Cin x 1 x 1)
    or 2 (Cout x Cin)."""
    return _pointwise_grad_weight(dy, x, rank)


@pointwise_grad_weight_op.register_fake
def _(dy: Tensor, x: Tensor, rank: int) -> Tensor:
    return x.new_empty((dy.shape[1], x.shape[1]) + (1, 1)[: rank - 2])


def _pw_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _pw_backward(ctx, dy: Tensor):
    x, weight = ctx.saved_tensors
    gx = pointwise_grad_input_op(dy, weight) if ctx.needs_input_grad[0] else None
    gw = pointwise_grad_weight_op(dy, x, weight.dim()) if ctx.needs_input_grad[1] else None
    return gx, gw


pointwise_nhwc.register_autograd(_pw_backward, setup_context=_pw_setup)


# The matrix products in ATen, for programs without edgetl's kernels. squeeze, not view:
# ExecuTorch 1.5 cannot emit a view of an external (.ptd) weight.
def _matrix(weight: Tensor) -> Tensor:
    return weight.squeeze(3).squeeze(2) if weight.dim() == 4 else weight


def _pointwise_forward(x: Tensor, weight: Tensor) -> Tensor:
    return torch.mm(x, _matrix(weight).t())


def _pointwise_grad_input(dy: Tensor, weight: Tensor) -> Tensor:
    return torch.mm(dy, _matrix(weight))


def _pointwise_grad_weight(dy: Tensor, x: Tensor, rank: int) -> Tensor:
    gw = torch.mm(dy.t(), x)
    return gw.unsqueeze(2).unsqueeze(3) if rank == 4 else gw


# --- per-channel affine maps (the norms) --------------------------------------------------------


@torch.library.custom_op(AFFINE_OP, mutates_args=())
def channel_affine(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``x * a + b`` with per-channel ``a``, ``b`` over the last axis: a norm's output in one pass.
    Backward keeps ``x`` only when ``a`` is trained (a batch norm's scale), never for a shift-only norm."""
    return _channel_affine(x, a, b)


@channel_affine.register_fake
def _(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op(SCALE_OP, mutates_args=())
def channel_scale(dy: Tensor, a: Tensor) -> Tensor:
    """``dy * a`` with per-channel ``a``: dL/dx of :func:`channel_affine`."""
    return dy * a


@channel_scale.register_fake
def _(dy: Tensor, a: Tensor) -> Tensor:
    return torch.empty_like(dy)


@torch.library.custom_op(SUM_OP, mutates_args=())
def channel_sum(dy: Tensor) -> Tensor:
    """``dy`` summed over every axis but the last: dL/db of :func:`channel_affine`."""
    return _channel_sum(dy)


@channel_sum.register_fake
def _(dy: Tensor) -> Tensor:
    return dy.new_empty(dy.shape[-1:])


@torch.library.custom_op(DOT_OP, mutates_args=())
def channel_dot(dy: Tensor, x: Tensor) -> Tensor:
    """``dy * x`` summed over every axis but the last: dL/da of :func:`channel_affine`."""
    return _channel_sum(dy * x)


@channel_dot.register_fake
def _(dy: Tensor, x: Tensor) -> Tensor:
    return dy.new_empty(dy.shape[-1:])


def _channel_affine(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return x * a + b


def _channel_sum(t: Tensor) -> Tensor:
    return t.sum(dim=tuple(range(t.dim() - 1)))


def _affine_setup(ctx, inputs, output) -> None:
    x, a, _ = inputs
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, a)


def _affine_backward(ctx, dy: Tensor):
    x, a = ctx.saved_tensors
    needs = ctx.needs_input_grad
    return (channel_scale(dy, a) if needs[0] else None, channel_dot(dy, x) if needs[1] else None, channel_sum(dy) if needs[2] else None)


channel_affine.register_autograd(_affine_backward, setup_context=_affine_setup)


@torch.library.custom_op(MEAN_OP, mutates_args=())
def spatial_mean(x: Tensor) -> Tensor:
    """The mean over height and width of an NHWC map, N x 1 x 1 x C (global average pooling)."""
    return x.mean((1, 2), keepdim=True)


@spatial_mean.register_fake
def _(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], 1, 1, x.shape[3]))


@torch.library.custom_op(MEAN_GRAD_OP, mutates_args=())
def spatial_mean_grad(dy: Tensor, h: int, w: int) -> Tensor:
    """dL/dx of :func:`spatial_mean`: ``dy`` spread over an h x w map, divided by h * w."""
    return _spatial_mean_grad(dy, h, w)


@spatial_mean_grad.register_fake
def _(dy: Tensor, h: int, w: int) -> Tensor:
    return dy.new_empty((dy.shape[0], h, w, dy.shape[3]))


def _spatial_mean_grad(dy: Tensor, h: int, w: int) -> Tensor:
    return dy.expand(dy.shape[0], h, w, dy.shape[3]) / (h * w)


def _mean_setup(ctx, inputs, output) -> None:
    ctx.hw = inputs[0].shape[1:3]


spatial_mean.register_autograd(lambda ctx, dy: spatial_mean_grad(dy, *ctx.hw), setup_context=_mean_setup)


# --- masked activations -----------------------------------------------------------------------


def activation_code(kind: str, rule: str) -> int:
    """An activation kind and gradient rule as one integer, the native kernels' numbering:
    ``2 * ACTIVATION_KINDS.index(kind) + GRAD_RULES.index(rule)``."""
    return 2 * ops.ACTIVATION_KINDS.index(kind) + ops.GRAD_RULES.index(rule)


def _kind_rule(code: int) -> tuple[str, str]:
    return ops.ACTIVATION_KINDS[code // 2], ops.GRAD_RULES[code % 2]


@torch.library.custom_op(ACT_OP, mutates_args=())
def activation_op(x: Tensor, code: int) -> Tensor:
    """The exact forward of the activation ``code`` (:func:`activation_code`)."""
    return ops.activation_forward(x, _kind_rule(code)[0])


@activation_op.register_fake
def _(x: Tensor, code: int) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op(MASK_GRAD_OP, mutates_args=())
def mask_grad_op(dy: Tensor, y: Tensor, code: int) -> Tensor:
    """:func:`edgetl.nn.ops.mask_grad` with kind and rule as one integer."""
    return ops.mask_grad_aten(dy, y, *_kind_rule(code))


@mask_grad_op.register_fake
def _(dy: Tensor, y: Tensor, code: int) -> Tensor:
    return torch.empty_like(dy)


@torch.library.custom_op(PACKED_MASK_GRAD_OP, mutates_args=())
def packed_mask_grad_op(dy: Tensor, packed: Tensor) -> Tensor:
    """:func:`edgetl.nn.ops.packed_mask_grad`."""
    return ops.packed_mask_grad_aten(dy, packed)


@packed_mask_grad_op.register_fake
def _(dy: Tensor, packed: Tensor) -> Tensor:
    return torch.empty_like(dy)


#: activations whose exact derivative autograd computes from the output; the others, from the input
_FROM_OUTPUT = frozenset({"relu", "sigmoid"})


@torch.library.custom_op("edgetl_export::exact_act", mutates_args=())
def exact_act(x: Tensor, code: int) -> Tensor:
    """An activation outside MobileTL's trained blocks (a conv stage's, the head's): the exact
    forward and derivative, keeping for backward the tensor autograd keeps (output or input)."""
    return ops.activation_forward(x, _kind_rule(code)[0])


@exact_act.register_fake
def _(x: Tensor, code: int) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op(EXACT_ACT_GRAD_OP, mutates_args=())
def exact_act_grad(dy: Tensor, t: Tensor, code: int) -> Tensor:
    """dL/dx of :func:`exact_act` from the output ``t`` (ReLU, Sigmoid) or the input ``t``."""
    return _exact_act_grad(dy, t, code)


@exact_act_grad.register_fake
def _(dy: Tensor, t: Tensor, code: int) -> Tensor:
    return torch.empty_like(dy)


def _exact_act_grad(dy: Tensor, t: Tensor, code: int) -> Tensor:
    # PyTorch's derivative formulas (threshold, hardtanh, hardswish, silu, hardsigmoid, sigmoid backward)
    kind = _kind_rule(code)[0]
    if kind in ("relu", "sigmoid"):
        return ops.mask_grad_aten(dy, t, kind, "exact")  # 1[y > 0]; y (1 - y)
    x = t
    if kind == "relu6":
        return torch.where((x > 0) & (x < 6), dy, 0.0)
    if kind == "hardswish":
        return torch.where(x <= -3, 0.0, torch.where(x < 3, dy * (x / 3 + 0.5), dy))
    if kind == "hardsigmoid":
        return torch.where((x > -3) & (x < 3), dy / 6, 0.0)
    s = torch.sigmoid(x)  # silu
    return dy * (s * (1 + x * (1 - s)))


def _exact_setup(ctx, inputs, output) -> None:
    x, ctx.code = inputs
    ctx.save_for_backward(output if _kind_rule(ctx.code)[0] in _FROM_OUTPUT else x)


exact_act.register_autograd(lambda ctx, dy: (exact_act_grad(dy, ctx.saved_tensors[0], ctx.code), None), setup_context=_exact_setup)


class ExactActivation(nn.Module):
    """An activation module outside MobileTL's reach (:func:`exact_act`)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.code = activation_code(kind, "exact")

    def forward(self, x: Tensor) -> Tensor:
        return exact_act(x, self.code)


def _define_out_variants() -> None:
    """``.out`` overloads of the operators above: ExecuTorch emits out-variant calls,
    which the device's native kernels (``deploy/native/kernels``) implement."""
    lib = torch.library.Library("edgetl_export", "FRAGMENT")
    specs = {
        # SymInt: the schema torch.library.custom_op gives the functional operators' int arguments
        "depthwise_nhwc": ("Tensor x, Tensor weight, SymInt stride, SymInt padding", depthwise_nhwc),
        "depthwise_grad_input": ("Tensor dy, Tensor weight, SymInt h, SymInt w, SymInt stride, SymInt padding", depthwise_grad_input_op),
        "depthwise_grad_weight": ("Tensor dy, Tensor x, SymInt k, SymInt stride, SymInt padding", depthwise_grad_weight_op),
        "pointwise_nhwc": ("Tensor x, Tensor weight", pointwise_nhwc),
        "pointwise_grad_input": ("Tensor dy, Tensor weight", pointwise_grad_input_op),
        "pointwise_grad_weight": ("Tensor dy, Tensor x, SymInt rank", pointwise_grad_weight_op),
        "spatial_mean": ("Tensor x", spatial_mean),
        "spatial_mean_grad": ("Tensor dy, SymInt h, SymInt w", spatial_mean_grad),
        "channel_affine": ("Tensor x, Tensor a, Tensor b", channel_affine),
        "channel_scale": ("Tensor dy, Tensor a", channel_scale),
        "channel_sum": ("Tensor dy", channel_sum),
        "channel_dot": ("Tensor dy, Tensor x", channel_dot),
        "activation": ("Tensor x, SymInt code", activation_op),
        "mask_grad": ("Tensor dy, Tensor y, SymInt code", mask_grad_op),
        "exact_act": ("Tensor x, SymInt code", exact_act),
        "exact_act_grad": ("Tensor dy, Tensor t, SymInt code", exact_act_grad),
        "packed_mask_grad": ("Tensor dy, Tensor packed", packed_mask_grad_op),
    }
    for name, (args, functional) in specs.items():
        lib.define(f"{name}.out({args}, *, Tensor(a!) out) -> Tensor(a!)")

        def impl(*args, out, _f=functional):
            return out.copy_(_f(*args))

        def meta(*args, out, _f=functional):
            return out

        lib.impl(f"{name}.out", impl, "CPU")
        lib.impl(f"{name}.out", meta, "Meta")
    _define_out_variants.library = lib  # keep the registrations alive


_define_out_variants()


# --- leaf modules --------------------------------------------------------------------------------


class PointwiseConv(nn.Module):
    """A 1x1 convolution on NHWC input: ``x @ W^T`` (the same ``weight`` / ``bias`` objects)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride = conv.stride[0]

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :: self.stride, :: self.stride, :]
        n, h, w, c = x.shape
        y = pointwise_nhwc(x.reshape(n * h * w, c), self.weight).view(n, h, w, -1)
        return y if self.bias is None else y + self.bias


class Linear(nn.Module):
    """``nn.Linear`` on 2-D input through the 1x1 operators (the same ``weight`` / ``bias`` objects):
    its backward reads the weight in place, where ATen's ``addmm`` / ``mm`` would transpose it."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            return F.linear(x, self.weight, self.bias)
        y = pointwise_nhwc(x, self.weight)
        return y if self.bias is None else y + self.bias


class DenseConv(nn.Module):
    """Any other convolution (the stem's 3 x 3 over RGB under full fine-tuning) on NHWC input:
    ATen's convolution between two permutes. ExecuTorch's portable kernels have its forward and
    backward; it is the slow path, for layers a 1x1 or depthwise form does not cover."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: Tensor) -> Tensor:
        y = F.conv2d(x.permute(0, 3, 1, 2), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return y.permute(0, 2, 3, 1)


class DepthwiseConv(nn.Module):
    """A depthwise k x k convolution on NHWC input (see :func:`depthwise_nhwc`)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride = conv.stride[0]
        self.padding = conv.padding[0]

    def forward(self, x: Tensor) -> Tensor:
        y = depthwise_nhwc(x, self.weight, self.stride, self.padding)
        return y if self.bias is None else y + self.bias


class ShiftOnlyNormNHWC(nn.Module):
    """:class:`~edgetl.nn.layers.ShiftOnlyNorm` on the channel-last axis (same ``bias``, ``scale``, ``offset``)."""

    def __init__(self, norm: ShiftOnlyNorm) -> None:
        super().__init__()
        self.bias = norm.bias
        self.register_buffer("scale", norm.scale, persistent=False)
        self.register_buffer("offset", norm.offset, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return channel_affine(x, self.scale, self.bias + self.offset)


class BatchNormNHWC(nn.Module):
    """``nn.BatchNorm2d`` on the channel-last axis, sharing its parameters and running statistics
    (also ``nn.BatchNorm1d`` on pooled ``N x C`` features: timm's MobileNetV4 head norm).

    Train mode normalises with batch statistics and updates the running ones in place (the graph's
    buffer mutations); eval mode uses the running ones.
    """

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        if bn.weight is None or bn.bias is None or bn.running_mean is None or bn.running_var is None:
            raise UnsupportedModelError("batch norm without affine parameters or running statistics")
        if bn.momentum is None:
            raise UnsupportedModelError("batch norm with momentum=None (cumulative average)")
        self.weight, self.bias = bn.weight, bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)
        self.eps, self.momentum = bn.eps, bn.momentum
        self.train(bn.training)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            var, mean = torch.var_mean(x, dim=tuple(range(x.dim() - 1)), correction=0)
            n = x.numel() // x.shape[-1]
            with torch.no_grad():
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(mean, alpha=m)
                self.running_var.mul_(1 - m).add_(var * (n / max(n - 1, 1)), alpha=m)  # unbiased, as nn.BatchNorm2d
                self.num_batches_tracked.add_(1)
        else:
            mean, var = self.running_mean, self.running_var
        a = self.weight * torch.rsqrt(var + self.eps)
        return channel_affine(x, a, self.bias - mean * a)


class GlobalMean(nn.Module):
    """``AdaptiveAvgPool2d(1)`` on NHWC input, keeping the 1 x 1 spatial dims."""

    def forward(self, x: Tensor) -> Tensor:
        return spatial_mean(x)


class PadNHWC(nn.Module):
    """``ZeroPad2d`` on NHWC input."""

    def __init__(self, pad: nn.ZeroPad2d) -> None:
        super().__init__()
        self.padding = tuple(pad.padding)  # left, right, top, bottom

    def forward(self, x: Tensor) -> Tensor:
        return _pad_nhwc(x, self.padding)


class SamePadNHWC(nn.Module):
    """:class:`~edgetl.nn.layers.SamePad2d` (TF "SAME", sized by the input) on NHWC input."""

    def __init__(self, pad: SamePad2d) -> None:
        super().__init__()
        self.same = pad

    def forward(self, x: Tensor) -> Tensor:
        return _pad_nhwc(x, self.same.padding(x.shape[1], x.shape[2]))


def _pad_nhwc(x: Tensor, padding: tuple[int, int, int, int]) -> Tensor:
    # zero blocks concatenated, not F.pad: F.pad's backward is constant_pad_nd with negative
    # padding (a crop), which ExecuTorch's portable kernel refuses; cat's backward is slicing
    left, right, top, bottom = padding
    n, h, w, c = x.shape
    row = [x.new_zeros(n, h, left, c), x, x.new_zeros(n, h, right, c)]
    x = torch.cat([t for t in row if t.shape[2]], dim=2)
    column = [x.new_zeros(n, top, w + left + right, c), x, x.new_zeros(n, bottom, w + left + right, c)]
    return torch.cat([t for t in column if t.shape[1]], dim=1)


# --- conversion ------------------------------------------------------------------------------


_PASS_THROUGH = (nn.Sequential, nn.Identity, nn.Flatten, MaskedActivation)


def _convert_leaf(module: nn.Module, path: str, part: str) -> nn.Module | None:
    """The NHWC replacement of ``module``, or None to keep it. Raises for what cannot be expressed."""
    if isinstance(module, nn.Conv2d):
        k, s, p, d = module.kernel_size, module.stride, module.padding, module.dilation
        square = k[0] == k[1] and s[0] == s[1] and not isinstance(p, str) and p[0] == p[1] and d == (1, 1)
        if square and k == (1, 1) and module.groups == 1 and p == (0, 0):
            return PointwiseConv(module)
        if square and module.groups == module.in_channels == module.out_channels:
            return DepthwiseConv(module)
        if isinstance(p, str):
            raise UnsupportedModelError(
                f"cannot export {path} ({module}) in {part}: padding={p!r} has no fixed size in the training program"
            )
        return DenseConv(module)
    if isinstance(module, ShiftOnlyNorm):
        return ShiftOnlyNormNHWC(module)
    if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
        try:
            return BatchNormNHWC(module)
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"cannot export {path} in {part}: {exc}") from None
    if isinstance(module, nn.AdaptiveAvgPool2d):
        if module.output_size not in (1, (1, 1)):
            raise UnsupportedModelError(f"cannot export {path} in {part}: adaptive pooling to {module.output_size}")
        return GlobalMean()
    if isinstance(module, nn.ZeroPad2d):
        return PadNHWC(module)
    if isinstance(module, SamePad2d):
        return SamePadNHWC(module)
    if isinstance(module, (nn.Dropout, StochasticDepth)):
        return nn.Identity()
    if isinstance(module, nn.Linear):
        return Linear(module)
    if isinstance(module, _PASS_THROUGH):
        return None
    if activation_kind(module) is not None:
        return ExactActivation(activation_kind(module))
    if any(True for _ in module.children()):
        return None  # a container (block, squeeze-excitation, conv-norm-act): its leaves are converted
    if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
        raise UnsupportedModelError(f"cannot export {path} ({type(module).__name__}) in {part}: no channels-last form for this layer")
    return None  # parameter-free leaf (e.g. an activation edgetl does not know): layout-agnostic


def describe_part(net: TransferModel, qualified: str) -> str:
    """Which part of the model ``qualified`` (a module or parameter path) is in, in words."""
    for name in net.top_names:
        if qualified == name or qualified.startswith(name + "."):
            kind = "trained block" if name in net.trained_block_names else "final conv stage"
            return f"{kind} {name}"
    for name in net.bottom_names:
        if qualified == name or qualified.startswith(name + "."):
            return f"frozen bottom unit {name}"
    if qualified.startswith("classifier"):
        return "classifier"
    return "model"


def _convert(root: nn.Module, prefix: str, net: TransferModel) -> None:
    for name, child in list(root.named_children()):
        path = f"{prefix}.{name}" if prefix else name
        new = _convert_leaf(child, path, describe_part(net, path))
        if new is not None:
            setattr(root, name, new)
        else:
            _convert(child, path, net)


def hold_units(net: TransferModel, names: list[str]) -> tuple[nn.Module, list[str]]:
    """A module holding ``net``'s units ``names`` (``features.16``, ...) at their torchvision paths
    (``16``, ...), so state-dict keys stay ``features.16.*``; and those paths, in forward order."""
    holder = nn.Module()
    paths = []
    for name in names:
        parts = name.split(".")[1:]  # drop "features"
        parent = holder
        for part in parts[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(parts[-1], net.get_submodule(name))
        paths.append(".".join(parts))
    return holder, paths


class TrainableTop(nn.Module):
    """The trained top of a :class:`TransferModel` in NHWC form, with its loss.

    ``forward(features, labels) -> (loss, logits)`` is the training step (the loss first, as
    ExecuTorch's training export requires); ``forward(features) -> logits`` is inference. Features
    are the frozen bottom's NCHW output. Only the top's modules are held (``features.<i>`` as in
    torchvision, ``classifier``), so the exported programs carry no frozen bottom weights.
    It takes over ``net``'s top modules (converting them in place): pass a copy, or use
    :func:`trainable_top`.

    ``record_activations``: the training step also returns every masked activation's input
    (channels-last), after the logits and before the running statistics, in the order of
    :meth:`activation_order`. Verification only: it is how a program's own 1-bit masks are read
    (see :mod:`edgetl.exporter.training`); a shipped program never keeps these maps alive.
    """

    def __init__(self, net: TransferModel, *, label_smoothing: float = 0.0, record_activations: bool = False) -> None:
        super().__init__()
        self.features, self.unit_paths = hold_units(net, net.top_names)
        self.classifier = net.classifier
        self.label_smoothing = label_smoothing
        self.record_activations = record_activations
        _convert(self, "", net)

    def logits(self, features: Tensor) -> Tensor:
        x = features.permute(0, 2, 3, 1)  # NCHW -> NHWC, once
        for path in self.unit_paths:
            x = self.features.get_submodule(path)(x)
        return self.classifier(x.mean((1, 2)))

    def _masked_activations(self) -> list[tuple[str, nn.Module]]:
        return [(name, m) for name, m in self.named_modules() if isinstance(m, MaskedActivation)]

    @torch.no_grad()
    def activation_order(self, features: Tensor) -> list[str]:
        """The masked activations' names in the order a step runs them (an eval-mode pass over
        one of ``features``: ``torch.export`` restores attributes a traced forward sets)."""
        order: list[str] = []
        hooks = [m.register_forward_pre_hook(lambda *_, name=name: order.append(name)) for name, m in self._masked_activations()]
        training = self.training
        try:
            self.eval().logits(features[:1])
        finally:
            self.train(training)
            for h in hooks:
                h.remove()
        return order

    def updated_buffers(self) -> list[tuple[str, Tensor]]:
        """The running statistics a training step updates (train-mode batch norms), in output order."""
        return [
            (f"{name}.{b}", getattr(m, b))
            for name, m in self.named_modules()
            if isinstance(m, BatchNormNHWC) and m.training
            for b in ("running_mean", "running_var", "num_batches_tracked")
        ]

    def forward(self, features: Tensor, labels: Tensor | None = None):
        if labels is None:
            return self.logits(features)
        recorded: list[Tensor] = []
        hooks = [
            m.register_forward_pre_hook(lambda _m, args: recorded.append(args[0].detach().clone()))
            for _, m in (self._masked_activations() if self.record_activations else [])
        ]
        try:
            logits = self.logits(features)
        finally:
            for h in hooks:
                h.remove()
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        # the updated running statistics are outputs too, so any runtime (ExecuTorch's Java
        # TrainingModule has no access to a method's buffers) can save them with the weights
        stats = (buf.detach().clone() for _, buf in self.updated_buffers())
        return (loss, logits.detach(), *recorded, *stats)


def trainable_top(net: TransferModel, *, label_smoothing: float = 0.0, record_activations: bool = False) -> TrainableTop:
    """An NHWC :class:`TrainableTop` of a copy of ``net`` (same names and values; ``net`` is not modified)."""
    import copy

    return TrainableTop(copy.deepcopy(net), label_smoothing=label_smoothing, record_activations=record_activations)


#: Decompositions that turn edgetl's custom operators into ATen for ExecuTorch, after
#: ``_export_forward_backward`` has recorded their custom backward formulas. With
#: ``native_kernels`` the depthwise, 1x1 and masked-activation operators stay (as
#: ``edgetl_export::*``), for the device's kernels to run.
def decompositions(native_kernels: bool = False) -> dict:
    def act(x: Tensor, kind: str, rule: str) -> Tensor:
        return activation_op(x, activation_code(kind, rule)) if native_kernels else ops.activation_forward(x, kind)

    def masked_act_packed(x: Tensor, kind: str, rule: str) -> tuple[Tensor, Tensor]:
        return act(x, kind, rule), ops.pack_bits(ops.mask_from_input(x, kind, rule))

    def empty_permuted(size, physical_layout, **kwargs) -> Tensor:
        # SiLU's backward decomposition allocates through empty_permuted, which has no ExecuTorch kernel
        physical = torch.empty([size[i] for i in physical_layout], **kwargs)
        inverse = sorted(range(len(physical_layout)), key=lambda i: physical_layout[i])
        return physical.permute(inverse)

    table = {
        torch.ops.aten.empty_permuted.default: empty_permuted,
        torch.ops.edgetl.masked_act.default: act,
        torch.ops.edgetl.masked_act_packed.default: masked_act_packed,
    }
    if native_kernels:
        table[torch.ops.edgetl.mask_grad.default] = lambda dy, y, kind, rule: mask_grad_op(dy, y, activation_code(kind, rule))
        table[torch.ops.edgetl.packed_mask_grad.default] = packed_mask_grad_op
    else:
        table[torch.ops.edgetl.mask_grad.default] = ops.mask_grad_aten
        table[torch.ops.edgetl.packed_mask_grad.default] = ops.packed_mask_grad_aten
        table[torch.ops.edgetl_export.exact_act.default] = lambda x, code: ops.activation_forward(x, _kind_rule(code)[0])
        table[torch.ops.edgetl_export.exact_act_grad.default] = _exact_act_grad
        table[torch.ops.edgetl_export.spatial_mean.default] = lambda x: x.mean((1, 2), keepdim=True)
        table[torch.ops.edgetl_export.spatial_mean_grad.default] = _spatial_mean_grad
        table[torch.ops.edgetl_export.channel_affine.default] = _channel_affine
        table[torch.ops.edgetl_export.channel_scale.default] = lambda dy, a: dy * a
        table[torch.ops.edgetl_export.channel_sum.default] = _channel_sum
        table[torch.ops.edgetl_export.channel_dot.default] = lambda dy, x: _channel_sum(dy * x)
        table[torch.ops.edgetl_export.pointwise_nhwc.default] = _pointwise_forward
        table[torch.ops.edgetl_export.pointwise_grad_input.default] = _pointwise_grad_input
        table[torch.ops.edgetl_export.pointwise_grad_weight.default] = _pointwise_grad_weight
        table[torch.ops.edgetl_export.depthwise_nhwc.default] = _decompose_depthwise
        table[torch.ops.edgetl_export.depthwise_grad_input.default] = lambda dy, weight, h, w, stride, padding: depthwise_grad_input(
            dy, weight, [dy.shape[0], h, w, dy.shape[3]], stride, padding
        )
        table[torch.ops.edgetl_export.depthwise_grad_weight.default] = lambda dy, x, k, stride, padding: depthwise_grad_weight(
            dy, x, [x.shape[3], 1, k, k], stride, padding
        )
    return table
