"""Layers that keep their input for backward compressed (activation-compressed training).

A trainable conv's weight gradient needs its input, and a squeeze-excitation's gating multiply
needs its input for the gate's gradient; autograd keeps both in fp32. The convs and the gating
multiply here keep a compressed copy instead and decompress it to fp32 in backward (as ActNN /
GACT do, on CPU):

* ``"bf16"``: the input rounded to bfloat16 (``x.to(torch.bfloat16)``: round to nearest, ties to
  even, not truncation; 8 significant bits, so every element is off by at most 2^-8 of itself),
  2 bytes an element;
* ``"int8"``: symmetric int8 with one fp32 scale per channel over the whole batch,
  ``s_c = max |x[:, c]| / 127`` (1 where the channel is all zeros), ``q = round(x / s_c)``; every
  element is off by at most ``s_c / 2``. 1 byte an element plus 4 bytes a channel. One scale per
  channel rather than per sample and channel: MobileTL's top blocks run on tiny maps (3 x 3 at
  96 px) where per-sample scales would add 4 / 9 of a byte to every element.

The forward is the ordinary fp32 convolution (bit-identical output). Backward computes
``grad_input`` from the weight alone, as the transposed convolution of ``dy`` (bit-identical to fp32
autograd's: it never reads the input, so no input-sized stand-in is allocated), and
``grad_weight`` (and ``grad_bias``) from the decompressed input, in batch chunks: each chunk of
:func:`decompress_chunk` images is decompressed to fp32 on its own and its
``aten.convolution_backward`` weight gradient is added to the sum, so backward holds one fp32
chunk, never the whole fp32 map (the profiler predicts those bytes with the same function). Those
gradients are sums over chunks, so they equal the unchunked formula up to fp32 rounding of the sum.
The operators are ``torch.library.custom_op`` s with ``register_autograd``, as
:mod:`edgetl.nn.ops`: autograd stores only what the operator returns for it (the compressed tensor
and the scales) and the weight, never the fp32 input.

The gating multiply ``y = gate * x`` (gate N x C x 1 x 1) is bit-identical forward; backward gives
``dx = dy * gate`` exactly and ``dgate = sum over H, W of dy * x`` from the stored ``x``, chunk by
chunk (one sample's sum never spans chunks, so chunking changes no bit of it). Unlike a conv's,
that error does travel down: the gate's gradient reaches ``x`` again through the SE's pooling and
1x1 convs, so the gradients below a compressed SE are close to fp32's, not equal.
The exporter's training program carries none of these (it refuses such a policy).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from edgetl.nn.choices import COMPRESSED_PRECISIONS

INT8_MAX = 127
#: the most fp32 bytes one chunk of a stored input takes while backward decompresses it (at least
#: one image a chunk): a byte limit rather than a number of chunks, so the small maps of small
#: images (2 x 2 at 64 px) stay one call and only maps worth saving are split. 1 MiB, measured with
#: benchmarks/decompress_chunks.py (int8, whole training steps, limits alternating, median step time
#: to the whole batch in one chunk): MobileNetV3-Large K=5 b=8 224 px 1.010 (512 KiB 1.038, one
#: image a chunk 1.085), Lite0 K=8 b=32 64 px 1.012 (512 KiB 1.030, one image 1.433: the many tiny
#: calls); the 4.0 MiB map at 224 px is then held 0.5 MiB at a time. See docs/memory.md, "Backward
#: decompresses in chunks".
DECOMPRESS_CHUNK_BYTES = 2**20


def compressed_nbytes(shape: tuple[int, ...], precision: str) -> int:
    """Bytes a conv input of ``shape`` (N x C x H x W) costs stored at ``precision``."""
    numel = 1
    for s in shape:
        numel *= s
    if precision == "fp32":
        return 4 * numel
    if precision == "bf16":
        return 2 * numel
    if precision == "int8":
        return numel + 4 * shape[1]  # int8 values + one fp32 scale per channel
    raise ValueError(f"unknown saved precision {precision!r}; expected fp32, bf16 or int8")


def int8_scale(x: Tensor) -> Tensor:
    """One symmetric scale per channel of ``x`` (N x C x ...), over the batch: max |x| / 127 (1 for
    an all-zero channel, whose values then quantize to 0 exactly)."""
    dims = [d for d in range(x.dim()) if d != 1]
    x = x.detach()
    amax = torch.maximum(x.amax(dim=dims), -x.amin(dim=dims))  # max |x| without a full-size |x|
    return torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))


def _channel_view(scale: Tensor, dim: int) -> Tensor:
    return scale.view((1, -1) + (1,) * (dim - 2))


def quantize_int8(x: Tensor, scale: Tensor) -> Tensor:
    """``round(x / scale)`` per channel as int8 (ties to even; within [-127, 127] by construction)."""
    # one fp32 temporary (the quotient), rounded and clamped in place
    return torch.div(x.detach(), _channel_view(scale, x.dim())).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    """``q * scale`` per channel, fp32, in one fp32 map: the integers converted, then scaled in
    place (bit-identical to ``q.to(float32) * scale``). Not ``torch.mul(q, scale)``: on CPU its type
    promotion converts ``q`` into a temporary fp32 map first (measured: two maps alive, as the
    out-of-place product)."""
    return q.to(torch.float32).mul_(_channel_view(scale, q.dim()))


def decompress_chunk(shape: tuple[int, ...]) -> int:
    """Images a chunk of a stored input of ``shape`` (N x C x ...) has while backward decompresses it:
    as many as keep its fp32 copy within :data:`DECOMPRESS_CHUNK_BYTES`, at least one, at most N.
    The profiler's estimate (:mod:`edgetl.profiler.estimate`) calls this very function."""
    per_image = 4
    for s in shape[1:]:
        per_image *= s
    return max(1, min(shape[0], DECOMPRESS_CHUNK_BYTES // max(per_image, 1)))


def _chunks(batch: int, chunk: int) -> list[tuple[int, int]]:
    return [(i, min(i + chunk, batch)) for i in range(0, batch, chunk)]


def _conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int], groups: int):
    return torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)


# --- the operators ---------------------------------------------------------------------------


@torch.library.custom_op("edgetl::conv2d_saved_bf16", mutates_args=())
def conv2d_saved_bf16(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int], groups: int
) -> tuple[Tensor, Tensor]:
    """``conv2d(x, ...)`` and ``x`` rounded to bfloat16, which backward reads for dW."""
    return _conv(x, weight, bias, stride, padding, dilation, groups), x.to(torch.bfloat16)


@conv2d_saved_bf16.register_fake
def _(x, weight, bias, stride, padding, dilation, groups):
    return _conv(x, weight, bias, stride, padding, dilation, groups), torch.empty_like(x, dtype=torch.bfloat16)


@torch.library.custom_op("edgetl::conv2d_saved_int8", mutates_args=())
def conv2d_saved_int8(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int], groups: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``conv2d(x, ...)``, ``x`` as int8 and its per-channel fp32 scales, which backward reads for dW."""
    scale = int8_scale(x)
    return _conv(x, weight, bias, stride, padding, dilation, groups), quantize_int8(x, scale), scale


@conv2d_saved_int8.register_fake
def _(x, weight, bias, stride, padding, dilation, groups):
    y = _conv(x, weight, bias, stride, padding, dilation, groups)
    return y, torch.empty_like(x, dtype=torch.int8), x.new_empty((x.shape[1],))


def _setup(ctx, inputs, output) -> None:
    x, weight, bias, ctx.stride, ctx.padding, ctx.dilation, ctx.groups = inputs
    ctx.has_bias = bias is not None
    ctx.x_shape = x.shape
    ctx.mark_non_differentiable(*output[1:])
    # the stored tensors get no gradient: without this autograd would hand backward zeros of their
    # shape (a full int8 / bf16 map allocated and zero-filled in every backward)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(weight, *output[1:])


def _input_grad(ctx, dy: Tensor, weight: Tensor) -> Tensor:
    """``grad_input`` of the conv: the transposed convolution of ``dy``, which never reads the input.
    ``convolution_backward`` would want an input-sized tensor even for this alone (an ``expand``ed
    stand-in gets copied to a full map), so the transposed conv is called directly; its output is
    bit-identical to ``convolution_backward``'s (held in tests)."""
    out_padding = [
        ctx.x_shape[2 + i] - ((dy.shape[2 + i] - 1) * ctx.stride[i] - 2 * ctx.padding[i] + ctx.dilation[i] * (weight.shape[2 + i] - 1) + 1)
        for i in range(2)
    ]
    return torch.nn.functional.conv_transpose2d(dy, weight, None, ctx.stride, ctx.padding, out_padding, ctx.groups, ctx.dilation)


def _stored_chunk(stored: list[Tensor], i: int, j: int) -> Tensor:
    """Images ``i:j`` of the input, fp32, from what an operator stored: bf16 ``(q,)`` or int8 ``(q, scale)``."""
    q = stored[0][i:j]
    return dequantize_int8(q, stored[1]) if len(stored) == 2 else q.to(torch.float32)


def _compressed_conv_backward(ctx, dy: Tensor | None, *_):
    if dy is None:  # grads are not materialized (_setup): no gradient reached the output
        return None, None, None, None, None, None, None
    weight, *stored = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and ctx.has_bias
    gx = _input_grad(ctx, dy, weight) if need_x else None
    gw = gb = None
    if need_w or need_b:
        # the weight (and bias) gradient summed over batch chunks, one decompressed chunk alive at a time
        for i, j in _chunks(dy.shape[0], decompress_chunk(tuple(ctx.x_shape))):
            _, w, b = torch.ops.aten.convolution_backward(
                dy[i:j],
                _stored_chunk(stored, i, j),
                weight,
                [weight.shape[0]] if ctx.has_bias else None,
                ctx.stride,
                ctx.padding,
                ctx.dilation,
                False,
                [0, 0],
                ctx.groups,
                [False, need_w, need_b],
            )
            if need_w:
                gw = w if gw is None else gw.add_(w)
            if need_b:
                gb = b if gb is None else gb.add_(b)
    return gx, gw, gb, None, None, None, None


conv2d_saved_bf16.register_autograd(_compressed_conv_backward, setup_context=_setup)
conv2d_saved_int8.register_autograd(_compressed_conv_backward, setup_context=_setup)


# --- the squeeze-excitation's gating multiply ----------------------------------------------------


@torch.library.custom_op("edgetl::scale_saved_bf16", mutates_args=())
def scale_saved_bf16(x: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """``gate * x`` and ``x`` rounded to bfloat16, which backward reads for the gate's gradient."""
    return gate * x, x.to(torch.bfloat16)


@scale_saved_bf16.register_fake
def _(x, gate):
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bfloat16)


@torch.library.custom_op("edgetl::scale_saved_int8", mutates_args=())
def scale_saved_int8(x: Tensor, gate: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``gate * x``, ``x`` as int8 and its per-channel fp32 scales, which backward reads for the gate's gradient."""
    scale = int8_scale(x)
    return gate * x, quantize_int8(x, scale), scale


@scale_saved_int8.register_fake
def _(x, gate):
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.int8), x.new_empty((x.shape[1],))


def _scale_setup(ctx, inputs, output) -> None:
    _, gate = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zeros for the stored tensors' gradients (as _setup)
    ctx.save_for_backward(gate, *output[1:])


def _scale_backward(ctx, dy: Tensor | None, *_):
    if dy is None:  # grads are not materialized (_scale_setup): no gradient reached the output
        return None, None
    gate, *stored = ctx.saved_tensors
    need_x, need_gate = ctx.needs_input_grad
    dgate = None
    if need_gate:
        # per chunk one fp32 map: the stored values converted, times dy in place, summed over H, W;
        # int8's per-channel scale applied to the sums (``dy * q`` would convert q into a second map)
        q, *scale = stored
        hw = tuple(range(2, dy.dim()))
        chunks = _chunks(dy.shape[0], decompress_chunk(tuple(q.shape)))
        dgate = torch.cat([q[i:j].to(torch.float32).mul_(dy[i:j]).sum(dim=hw, keepdim=True) for i, j in chunks])
        if scale:
            dgate.mul_(_channel_view(scale[0], dy.dim()))
    return dy * gate if need_x else None, dgate


scale_saved_bf16.register_autograd(_scale_backward, setup_context=_scale_setup)
scale_saved_int8.register_autograd(_scale_backward, setup_context=_scale_setup)


def scale_saved(x: Tensor, gate: Tensor, precision: str) -> Tensor:
    """``gate * x`` keeping ``x`` at ``precision`` (``"bf16"`` or ``"int8"``) for backward."""
    if precision == "bf16":
        return scale_saved_bf16(x, gate)[0]
    if precision == "int8":
        return scale_saved_int8(x, gate)[0]
    raise ValueError(f"unknown compressed precision {precision!r}; expected one of {COMPRESSED_PRECISIONS}")


class CompressedGating:
    """Mixin for a squeeze-excitation whose ``_scale(x)`` gives the gate and whose forward is
    ``_scale(x) * x`` (torchvision's ``SqueezeExcitation``): the gating multiply keeps ``x`` at
    ``self.saved_precision`` for backward. :func:`compressed_gating_class` puts it in front of the
    module's class, so children, parameter names and state-dict keys stay the architecture's."""

    saved_precision: str

    def forward(self, x: Tensor) -> Tensor:
        gate = self._scale(x)
        if torch.is_grad_enabled() and (x.requires_grad or gate.requires_grad):
            return scale_saved(x, gate, self.saved_precision)
        return gate * x


@functools.cache
def compressed_gating_class(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` with :class:`CompressedGating` in front (one class per ``cls``, same ``__name__``)."""
    if not hasattr(cls, "_scale"):
        raise TypeError(f"{cls.__name__} has no _scale(x): not a squeeze-excitation whose gating multiply can be compressed")
    return type(cls.__name__, (CompressedGating, cls), {"__qualname__": f"CompressedGating[{cls.__qualname__}]"})


def compress_gating(se: nn.Module, precision: str) -> None:
    """Make the squeeze-excitation ``se`` keep its gating multiply's input at ``precision``, in place."""
    if precision not in COMPRESSED_PRECISIONS:
        raise ValueError(f"unknown compressed precision {precision!r}; expected one of {COMPRESSED_PRECISIONS}")
    if not isinstance(se, CompressedGating):
        se.__class__ = compressed_gating_class(type(se))
    se.saved_precision = precision


def decompressed(x: Tensor, precision: str) -> Tensor:
    """``x`` as backward sees it after storage at ``precision`` (fp32): for tests and error bounds."""
    if precision == "fp32":
        return x
    if precision == "bf16":
        return x.to(torch.bfloat16).to(torch.float32)
    if precision == "int8":
        scale = int8_scale(x)
        return dequantize_int8(quantize_int8(x, scale), scale)
    raise ValueError(f"unknown saved precision {precision!r}; expected fp32, bf16 or int8")


# --- the module ------------------------------------------------------------------------------


class CompressedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters, same state-dict keys) that keeps its input for backward
    at ``precision`` (``"bf16"`` or ``"int8"``). Without autograd (eval, ``no_grad``) it is the plain
    conv. Zero padding with integer sizes only, as every conv of the supported blocks."""

    def __init__(self, conv: nn.Conv2d, precision: str) -> None:
        if precision not in COMPRESSED_PRECISIONS:
            raise ValueError(f"unknown compressed precision {precision!r}; expected one of {COMPRESSED_PRECISIONS}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"a compressed conv needs integer zero padding, got {conv.padding!r} ({conv.padding_mode})")
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            device="meta",
        )
        self.weight = conv.weight
        self.bias = conv.bias
        self.precision = precision

    def forward(self, x: Tensor) -> Tensor:
        grads = self.weight.requires_grad or x.requires_grad or (self.bias is not None and self.bias.requires_grad)
        if not (torch.is_grad_enabled() and grads):
            return super().forward(x)
        args = (x, self.weight, self.bias, list(self.stride), list(self.padding), list(self.dilation), self.groups)
        if self.precision == "bf16":
            return conv2d_saved_bf16(*args)[0]
        return conv2d_saved_int8(*args)[0]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, saved={self.precision}"
