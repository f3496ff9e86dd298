"""The trained top in channels-last (NHWC) form: what the ExecuTorch training program runs.

Why: a 1x1 convolution on channels-last maps is a plain matrix product over pixels x channels,
with no permute of the activations in forward or backward. Every layer of the top becomes one of
edgetl's device operators (:mod:`edgetl.exporter.device_ops`): 1x1 and depthwise convolutions,
linear layers, norms, global pooling and activations, each with its own backward operators, run
on the device by ``deploy/native/kernels``.

The conversion swaps leaf modules (and squeeze-excitation, for its gating multiply) and keeps
every parameter and buffer *object*, so names (``features.16.conv.0.0.weight``) are the
torchvision state-dict keys and the blocks' own ``forward`` code (residuals) runs unchanged. What it stores for
backward matches the eager MobileTL model:

* 1x1 conv: its input (as ``F.linear`` saves it); shift-only norm: nothing;
* train-mode batch norm: written out so autograd keeps one map, its centred input ``xc``
  (``xc * a + bias``, ``a`` from ``xc``'s sum of squares); running statistics update in place, as
  ``nn.BatchNorm2d`` does (momentum, unbiased variance);
* masked activations: unchanged (layout-agnostic custom ops); other activations: what autograd
  keeps for them (the output of a ReLU or Sigmoid, else the input).

Dropout and stochastic depth become identities: the portable kernels could draw the noise, but
a deterministic program is what lets an export verify itself step for step against eager PyTorch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import SqueezeExcitation, StochasticDepth

from edgetl.exporter.device_ops import (
    activation_code,
    channel_affine,
    channel_center,
    channel_gate,
    channel_sum,
    channel_sumsq,
    depthwise_nhwc,
    exact_act,
    pointwise_nhwc,
    spatial_mean,
)
from edgetl.exporter.errors import UnsupportedModelError
from edgetl.nn.layers import MaskedActivation, SamePad2d, ShiftOnlyNorm, activation_kind
from edgetl.nn.spare import SpareClassLinear, cross_entropy, mask_logits
from edgetl.train.prepare import TransferModel

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
    its backward reads the weight in place, where ATen's ``addmm`` / ``mm`` would transpose it.
    A :class:`~edgetl.nn.spare.SpareClassLinear` keeps its ``active`` buffer and its masking."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.spare = isinstance(linear, SpareClassLinear)
        if self.spare:
            self.register_buffer("active", linear.active)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            y = F.linear(x, self.weight, self.bias)
        else:
            y = pointwise_nhwc(x, self.weight)
            y = y if self.bias is None else y + self.bias
        return mask_logits(y, self.active) if self.spare else y


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
        if not self.training:
            a = self.weight * torch.rsqrt(self.running_var + self.eps)
            return channel_affine(x, a, self.bias - self.running_mean * a)
        # normalise the centred map (see device_ops.channel_center): dL/da sums dy * xc, not dy * x
        n = x.numel() // x.shape[-1]
        xc = channel_center(x)
        var = channel_sumsq(xc) / n
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(channel_sum(x) / n, alpha=m)
            self.running_var.mul_(1 - m).add_(var * (n / max(n - 1, 1)), alpha=m)  # unbiased, as nn.BatchNorm2d
            self.num_batches_tracked.add_(1)
        return channel_affine(xc, self.weight * torch.rsqrt(var + self.eps), self.bias)


class ExactActivation(nn.Module):
    """An activation module outside MobileTL's reach (:func:`exact_act`)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.code = activation_code(kind, "exact")

    def forward(self, x: Tensor) -> Tensor:
        return exact_act(x, self.code)


class SqueezeExcitationNHWC(nn.Module):
    """torchvision's ``SqueezeExcitation`` (timm's is converted to it) on NHWC input: the same
    children under the same names, its ``_scale`` computation, the gating multiply as one operator."""

    def __init__(self, se: SqueezeExcitation) -> None:
        super().__init__()
        for name, child in se.named_children():
            self.add_module(name, child)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return channel_gate(x, scale)


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
        if type(child) is SqueezeExcitation:  # a container whose own forward does the gating
            child = SqueezeExcitationNHWC(child)
            setattr(root, name, child)
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
        #: what ``forward(features)`` returns: ``"logits"``, or ``"embedding"`` (the ``embed`` method)
        self.output = "logits"
        _convert(self, "", net)

    def _pooled(self, features: Tensor) -> Tensor:
        x = features.permute(0, 2, 3, 1)  # NCHW -> NHWC, once
        for path in self.unit_paths:
            x = self.features.get_submodule(path)(x)
        return x.mean((1, 2))

    def logits(self, features: Tensor) -> Tensor:
        return self.classifier(self._pooled(features))

    def _active(self) -> Tensor | None:
        head = self._head()
        return head.active if head.spare else None

    def _head(self) -> Linear:
        """The classifier's last linear layer (the one whose rows are the classes)."""
        return [m for m in self.classifier.modules() if isinstance(m, Linear)][-1]

    def embedding(self, features: Tensor) -> Tensor:
        """The classifier's last linear layer's input: what weight imprinting averages per class."""
        x = self._pooled(features)
        if isinstance(self.classifier, Linear):
            return x
        head = self._head()
        for layer in self.classifier.children():
            if layer is head:
                return x
            x = layer(x)
        raise UnsupportedModelError("the classifier's last linear layer is not one of its direct layers")

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
            return self.embedding(features) if self.output == "embedding" else self.logits(features)
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
        loss = cross_entropy(logits, labels, label_smoothing=self.label_smoothing, active=self._active())
        # the updated running statistics are outputs too, so any runtime (ExecuTorch's Java
        # TrainingModule has no access to a method's buffers) can save them with the weights
        stats = (buf.detach().clone() for _, buf in self.updated_buffers())
        return (loss, logits.detach(), *recorded, *stats)


def trainable_top(net: TransferModel, *, label_smoothing: float = 0.0, record_activations: bool = False) -> TrainableTop:
    """An NHWC :class:`TrainableTop` of a copy of ``net`` (same names and values; ``net`` is not modified)."""
    import copy

    return TrainableTop(copy.deepcopy(net), label_smoothing=label_smoothing, record_activations=record_activations)
