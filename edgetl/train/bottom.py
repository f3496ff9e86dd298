"""The frozen bottom, run so that each map is freed as soon as the next layer has read it.

Calling a unit holds its input for the whole call: the caller's loop (``for unit in units: x =
unit(x)``) and the unit's own ``forward(self, x)`` both reference it until the unit returns. Under
``no_grad`` nothing needs it after the unit's first layer has read it, unless the unit adds it back
(a residual). So the bottom runs flat:

* a unit whose forward is a sequence of layers is unrolled into its layers: torchvision's
  ``InvertedResidual`` (MobileNetV2, V3) and ``MBConv`` without their skip, ``Conv2dNormActivation``
  and any ``nn.Sequential`` that keeps ``Sequential.forward`` (recursively);
* a residual one of those runs its layers in turn and holds only its input, for the addition;
* anything else (timm's blocks), and a unit with forward hooks (so that they run), is called
  whole, holding its input.

The outputs are the units' own, bit for bit (test). What it saves: on MobileNetV3-Large at 224 px,
the stem's 16 x 112 x 112 output per image was held while block 2 expanded it to 64 channels and
filtered it, where the frozen bottom's working set peaks (6.1 MiB at batch 8).
:func:`frozen_run` tells the profiler's estimate how each unit runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from torch import Tensor, nn
from torchvision.models import mobilenetv2

from edgetl.models.blocks import IRB_TYPES


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _body(unit: nn.Module) -> nn.Sequential | None:
    """The layer sequence a torchvision block's forward runs, or None for any other unit."""
    if type(unit) not in IRB_TYPES:
        return None
    body = unit.conv if isinstance(unit, mobilenetv2.InvertedResidual) else unit.block
    return body if _is_plain_sequential(body) else None


def _leaves(module: nn.Module) -> Iterator[nn.Module]:
    if _is_plain_sequential(module):
        for child in module:
            yield from _leaves(child)
    else:
        yield module


def frozen_run(unit: nn.Module) -> str:
    """How :func:`run_frozen` runs ``unit``: ``"unrolled"`` (layer by layer, its input freed once read),
    ``"residual"`` (layer by layer, its input held for the addition) or ``"whole"`` (one call, its
    input held until it returns)."""
    body = _body(unit)
    if body is not None:
        return "residual" if unit.use_res_connect else "unrolled"
    return "unrolled" if _is_plain_sequential(unit) else "whole"


def _residual(unit: nn.Module, body: nn.Sequential, x: Tensor) -> Tensor:
    h = x
    for layer in _leaves(body):
        h = layer(h)
    drop = getattr(unit, "stochastic_depth", None)  # MBConv's; the identity in eval mode
    if drop is not None:
        h = drop(h)
    h += x  # as torchvision's blocks (MobileNetV2's x + body(x) is the same sum)
    return h


def run_frozen(units: Sequence[nn.Module], x: Tensor) -> Tensor:
    """``x`` through ``units`` in order, releasing each map as soon as it is read (module docstring).
    For the frozen bottom: call under ``torch.no_grad()`` with the units in eval mode."""
    steps: list[Callable[[Tensor], Tensor]] = []
    for unit in units:
        run = frozen_run(unit)  # the one decision, shared with the profiler's estimate
        if unit._forward_hooks or unit._forward_pre_hooks:  # a hooked unit is called, so its hooks run (the profiler's)
            steps.append(unit)
        elif run == "residual":
            steps.append(lambda h, unit=unit: _residual(unit, _body(unit), h))
        elif run == "unrolled":
            steps.extend(_leaves(_body(unit) or unit))
        else:
            steps.append(unit)
    for step in steps:
        x = step(x)
    return x
