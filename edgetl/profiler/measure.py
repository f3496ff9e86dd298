"""Measured bytes stored for backward, from autograd's own saved-tensor hooks.

``torch.autograd.graph.saved_tensors_hooks`` sees every tensor autograd keeps. Each is counted
once per storage (views and in-place results share one), attributed to the unit whose forward was
running when it was first saved. Storages of parameters and buffers are not activations (a conv
keeps its weight for dL/dx, the shift-only norm its frozen scale) and are skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from edgetl.profiler.units import HEAD


@dataclass
class UnitMeasurement:
    """What one unit (block, conv stage, head) kept for backward in one forward."""

    name: str
    in_shape: tuple[int, ...] = ()
    nbytes: int = 0
    tensors: list[tuple[tuple[int, ...], str, int]] = field(default_factory=list)  # shape, dtype, bytes


def measure_saved_bytes(model: nn.Module, units: dict[str, nn.Module], x: Tensor) -> dict[str, UnitMeasurement]:
    """Run ``model(x)`` once with grad enabled and report, per unit, the bytes kept for backward.

    Args:
        model: the network (a :class:`~edgetl.train.prepare.TransferModel` or any module).
        units: name -> submodule of ``model``; a saved tensor goes to the innermost running unit,
            or to :data:`HEAD` when none is running.
        x: one input batch.
    """
    constant = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    result = {name: UnitMeasurement(name) for name in units}
    result.setdefault(HEAD, UnitMeasurement(HEAD))
    running: list[str] = []
    seen: set[int] = set()

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in constant and ptr not in seen:
            seen.add(ptr)
            nbytes = t.untyped_storage().nbytes()
            unit = result[running[-1] if running else HEAD]
            unit.nbytes += nbytes
            unit.tensors.append((tuple(t.shape), str(t.dtype).removeprefix("torch."), nbytes))
        return t

    def enter(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            running.append(name)
            if not result[name].in_shape and args and isinstance(args[0], Tensor):
                result[name].in_shape = tuple(args[0].shape)

        return hook

    def leave(_module: nn.Module, _args: tuple, _out: object) -> None:
        running.pop()

    with ExitStack() as stack:
        for name, module in units.items():
            stack.callback(module.register_forward_pre_hook(enter(name)).remove)
            stack.callback(module.register_forward_hook(leave).remove)
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        with torch.enable_grad():
            model(x)
    return result
