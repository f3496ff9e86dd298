"""Inference programs: the whole classifier (``model.pte``) and the frozen bottom (``bottom.pte``),
both lowered to XNNPACK, in float32 or PT2E int8.

They are exported from plain torchvision modules in eval mode under ``torch.no_grad()``: a
:class:`~edgetl.nn.layers.ShiftOnlyNorm` is a frozen batch norm with the same state-dict keys,
so the trained weights load straight into the original architecture, and an eval-mode batch norm
under ``no_grad`` exports as ``_native_batch_norm_legit_no_training``, which XNNPACK fuses into
the preceding convolution. (Exporting with autograd on yields
``_native_batch_norm_legit_functional``, which has no ExecuTorch kernel: pytorch/executorch#1062.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from edgetl.exporter import _executorch as et
from edgetl.exporter.errors import UnsupportedModelError
from edgetl.exporter.nhwc import describe_part, hold_units
from edgetl.train.prepare import TransferModel


class Bottom(nn.Module):
    """The frozen bottom of a :class:`TransferModel` (eval mode): images in, NCHW features out."""

    def __init__(self, net: TransferModel) -> None:
        super().__init__()
        self.features, self.unit_paths = hold_units(net, net.bottom_names)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        for path in self.unit_paths:
            x = self.features.get_submodule(path)(x)
        return x


@dataclass
class InferenceExport:
    """A lowered inference program and how it was made."""

    program: et.LoweredProgram
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    seconds: float


def locate_operator(op: str, graphs, part_of) -> str:
    """``op`` (``aten::erfinv.out`` or ``aten.erfinv.default``) in words: the modules of ``graphs``
    (torch.fx graphs, searched in order until one knows) that call it, and their part of the model.
    Exact operator names are tried first, then names containing it (``special_erfinv`` for
    ``erfinv``: decompositions rename operators)."""
    base = op.replace("::", ".").split(".")[1]
    for exact in (True, False):
        for graph in graphs:
            where = set()
            for node in graph.nodes:
                if node.op != "call_function":
                    continue
                name = (_op_text(node.target).split(".") + [""])[1]
                if name == base or (not exact and base in name):
                    stack = node.meta.get("nn_module_stack") or {}
                    if stack:
                        path = str(list(stack.values())[-1][0]).removeprefix("L['self'].")
                        where.add(f"{path} ({part_of(path)})")
            if where:
                return ", ".join(sorted(where))
    return "an unknown part of the model"


def _op_text(target) -> str:
    text = str(target)
    if text.startswith("<EdgeOpOverload:"):
        text = text.split(":", 1)[1].split(">", 1)[0].strip()
    return text.replace("::", ".")


def export_inference(module: nn.Module, example: Tensor, *, part_of=lambda path: "model") -> InferenceExport:
    """Export ``module`` (eval, no grad) at the shape of ``example`` and lower it to XNNPACK.

    ``module`` may be a PT2E-quantized graph (:func:`edgetl.exporter.quantize.int8_graph`): the
    program is then int8, still taking and returning float32.

    Raises :class:`UnsupportedModelError` naming any operator the ExecuTorch runtime here cannot
    run and the modules that use it.
    """
    t0 = time.perf_counter()
    module.eval()  # not reassigned: a PT2E graph's eval() (allowed by torchao) returns None
    with torch.no_grad():
        out = module(example)
        ep = torch.export.export(module, (example,), strict=False)
    try:
        lowered = et.lower_to_xnnpack(ep)
    except et.MissingKernelError as exc:
        raise UnsupportedModelError(
            "; ".join(f"operator {op} has no ExecuTorch kernel, used in {locate_operator(op, [ep.graph], part_of)}" for op in exc.ops)
        ) from None
    missing = [op for op in lowered.operators if op not in et.registered_operators()]
    if missing:
        raise UnsupportedModelError(
            "; ".join(
                f"operator {op} has no kernel in this ExecuTorch runtime, used in "
                f"{locate_operator(op, [lowered.edge_graph, ep.graph], part_of)}"
                for op in missing
            )
        )
    return InferenceExport(lowered, tuple(example.shape), tuple(out.shape), time.perf_counter() - t0)


def part_namer(net: TransferModel):
    """``path -> words`` for error messages about ``net`` (paths as exported: ``features.16.conv.0``)."""
    return lambda path: describe_part(net, path)


def max_abs_diff(pte_path, module: nn.Module, x: Tensor, *, ptd_path=None, method: str = "forward") -> float:
    """Largest |program(x) - module(x)| over the outputs, the program run by the ExecuTorch runtime."""
    program = et.Program(pte_path, ptd_path)
    got = program.run(method, x.numpy())[0]
    with torch.no_grad():
        want = module.eval()(x).numpy()
    return float(np.abs(got - want).max())
