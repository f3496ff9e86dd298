"""edgetl's device operators (``edgetl_export::*``): what the training program calls and
``deploy/native/kernels`` implements.

Each operator has a Python implementation (what eager PyTorch and the exporter's verification
run), a fake (shapes, for ``torch.export``), its backward as further operators of this module, an
ATen decomposition (:func:`decompositions`, for an ExecuTorch runtime without edgetl's kernels)
and an ``.out`` overload (ExecuTorch emits out-variant calls). The channels-last modules of
:mod:`edgetl.exporter.nhwc` call them.

* depthwise convolution: forward and both gradients as shifted-window multiply-adds, whose
  backward recomputes the windows from the saved input (one tensor kept per convolution, as
  autograd does in eager, and not one per kernel tap);
* 1x1 convolution and linear layer: ``x @ W^T`` and its two gradients, reading the weight in place;
* per-channel affine maps (the norms), centring and sums of squares (a train-mode norm's
  statistics), squeeze-excitation's gating multiply and global average
  pooling, with their gradients;
* masked activations (MobileTL's 1-bit backward) and exact ones (outside the trained blocks).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from edgetl.nn import ops

DW_OP = "edgetl_export::depthwise_nhwc"
DW_GRAD_INPUT_OP = "edgetl_export::depthwise_grad_input"
DW_GRAD_WEIGHT_OP = "edgetl_export::depthwise_grad_weight"
PW_OP = "edgetl_export::pointwise_nhwc"
PW_GRAD_INPUT_OP = "edgetl_export::pointwise_grad_input"
PW_GRAD_WEIGHT_OP = "edgetl_export::pointwise_grad_weight"
GATE_OP = "edgetl_export::channel_gate"
GATE_GRAD_OP = "edgetl_export::channel_gate_grad"
MEAN_OP = "edgetl_export::spatial_mean"
MEAN_GRAD_OP = "edgetl_export::spatial_mean_grad"
AFFINE_OP = "edgetl_export::channel_affine"
SCALE_OP = "edgetl_export::channel_scale"
SUM_OP = "edgetl_export::channel_sum"
DOT_OP = "edgetl_export::channel_dot"
CENTER_OP = "edgetl_export::channel_center"
SUMSQ_OP = "edgetl_export::channel_sumsq"
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


# A train-mode batch norm normalises the centred map: with y = x * a + b over the raw input, dL/da
# is sum(dy * x) - mean * sum(dy), two large sums cancelling when a channel's mean is large against
# its spread (float32 loses ~log10((mean/std)^2) digits); over the centred map it is sum(dy * xc).


@torch.library.custom_op(CENTER_OP, mutates_args=())
def channel_center(x: Tensor) -> Tensor:
    """``x`` minus its per-channel mean over every axis but the last. Its own backward: centring is
    a symmetric projection, so dL/dx is the centred dL/dy."""
    return _channel_center(x)


@channel_center.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


def _channel_center(x: Tensor) -> Tensor:
    x64 = x.double()  # as the native kernel: the mean and the difference in double, rounded once
    return (x64 - x64.mean(dim=tuple(range(x.dim() - 1)))).to(x.dtype)


channel_center.register_autograd(lambda ctx, dy: channel_center(dy), setup_context=lambda ctx, inputs, output: None)


@torch.library.custom_op(SUMSQ_OP, mutates_args=())
def channel_sumsq(x: Tensor) -> Tensor:
    """``x * x`` summed over every axis but the last (a centred map's: n times its variance)."""
    return _channel_sumsq(x)


def _channel_sumsq(x: Tensor) -> Tensor:
    return _channel_sum(x.double().square()).to(x.dtype)


@channel_sumsq.register_fake
def _(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[-1:])


def _sumsq_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


channel_sumsq.register_autograd(lambda ctx, g: channel_scale(ctx.saved_tensors[0], 2 * g), setup_context=_sumsq_setup)


@torch.library.custom_op(GATE_OP, mutates_args=())
def channel_gate(x: Tensor, s: Tensor) -> Tensor:
    """``x * s`` for an NHWC map and a per-image, per-channel ``s`` (N x 1 x 1 x C): the
    squeeze-excitation's gating multiply."""
    return x * s


@channel_gate.register_fake
def _(x: Tensor, s: Tensor) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op(GATE_GRAD_OP, mutates_args=())
def channel_gate_grad(dy: Tensor, x: Tensor) -> Tensor:
    """dL/ds of :func:`channel_gate`: ``dy * x`` summed over height and width, N x 1 x 1 x C."""
    return (dy * x).sum((1, 2), keepdim=True)


@channel_gate_grad.register_fake
def _(dy: Tensor, x: Tensor) -> Tensor:
    return dy.new_empty((dy.shape[0], 1, 1, dy.shape[3]))


def _gate_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _gate_backward(ctx, dy: Tensor):
    x, s = ctx.saved_tensors
    needs = ctx.needs_input_grad
    return channel_gate(dy, s) if needs[0] else None, channel_gate_grad(dy, x) if needs[1] else None


channel_gate.register_autograd(_gate_backward, setup_context=_gate_setup)


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
        "channel_gate": ("Tensor x, Tensor s", channel_gate),
        "channel_gate_grad": ("Tensor dy, Tensor x", channel_gate_grad),
        "spatial_mean": ("Tensor x", spatial_mean),
        "spatial_mean_grad": ("Tensor dy, SymInt h, SymInt w", spatial_mean_grad),
        "channel_affine": ("Tensor x, Tensor a, Tensor b", channel_affine),
        "channel_scale": ("Tensor dy, Tensor a", channel_scale),
        "channel_sum": ("Tensor dy", channel_sum),
        "channel_dot": ("Tensor dy, Tensor x", channel_dot),
        "channel_center": ("Tensor x", channel_center),
        "channel_sumsq": ("Tensor x", channel_sumsq),
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
        table[torch.ops.edgetl_export.channel_gate.default] = lambda x, s: x * s
        table[torch.ops.edgetl_export.channel_gate_grad.default] = lambda dy, x: (dy * x).sum((1, 2), keepdim=True)
        table[torch.ops.edgetl_export.spatial_mean.default] = lambda x: x.mean((1, 2), keepdim=True)
        table[torch.ops.edgetl_export.spatial_mean_grad.default] = _spatial_mean_grad
        table[torch.ops.edgetl_export.channel_affine.default] = _channel_affine
        table[torch.ops.edgetl_export.channel_scale.default] = lambda dy, a: dy * a
        table[torch.ops.edgetl_export.channel_sum.default] = _channel_sum
        table[torch.ops.edgetl_export.channel_dot.default] = lambda dy, x: _channel_sum(dy * x)
        table[torch.ops.edgetl_export.channel_center.default] = _channel_center
        table[torch.ops.edgetl_export.channel_sumsq.default] = _channel_sumsq
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
