"""What an exported training program keeps between its forward and its backward.

A joint forward-backward graph has no autograd: a tensor the backward reads is simply kept alive
by the memory planner from where the forward makes it to where the backward uses it. So "saved for
backward" is a graph property: forward nodes (ancestors of the loss, the user outputs and the
buffer updates) that a backward node (an ancestor of a gradient and not a forward node) reads.
Parameters, buffers and constants are weights, not activations, and are not counted; views are
counted once, with their base. This is the exported counterpart of
:func:`edgetl.profiler.predict.predict_units` and is compared with it in every export.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import OutputKind

# ops whose output shares its input's storage (in the emitted program they become views, no copy)
_ALIASING = {"aten.view.default", "aten._unsafe_view.default", "aten.alias.default", "aten.reshape.default"}


@dataclass(frozen=True)
class SavedTensor:
    """A tensor a joint graph keeps from forward to backward."""

    node: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


def _base(node: torch.fx.Node) -> torch.fx.Node:
    while node.op == "call_function" and str(node.target) in _ALIASING:
        node = node.args[0]
    return node


def _ancestors(roots: list[torch.fx.Node]) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def saved_for_backward(joint: ExportedProgram) -> list[SavedTensor]:
    """The activations ``joint`` (from ``_export_forward_backward``) keeps for its backward.

    The graph is in execution order, forward first: the memory planner keeps a tensor alive from
    its producer to its last reader, so what is made at or before the loss and read by a gradient
    computation after it is what the program holds between the two passes. Copies derived from
    weights alone (e.g. a transposed weight) are left out: they are weights, not activations.
    """
    sig = joint.graph_signature
    nodes = list(joint.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    loss_name = next(s.arg.name for s in sig.output_specs if s.kind == OutputKind.LOSS_OUTPUT)
    boundary = index[by_name[loss_name]]
    grad_roots = [
        by_name[s.arg.name] for s in sig.output_specs if s.kind in (OutputKind.GRADIENT_TO_PARAMETER, OutputKind.GRADIENT_TO_USER_INPUT)
    ]
    backward = {n for n in _ancestors(grad_roots) if index[n] > boundary}
    weights = set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers) | set(sig.inputs_to_lifted_tensor_constants)
    # nodes computed from weights alone (no user input among their ancestors)
    activation_derived: set[torch.fx.Node] = set()
    for n in nodes:
        if (n.op == "placeholder" and n.name not in weights) or any(a in activation_derived for a in n.all_input_nodes):
            activation_derived.add(n)
    saved: dict[str, SavedTensor] = {}
    for node in backward:
        for arg in node.all_input_nodes:
            if index[arg] > boundary:
                continue
            base = _base(arg)
            if base.op == "placeholder" and base.name in weights:
                continue
            if base not in activation_derived:
                continue
            val = base.meta.get("val")
            if not isinstance(val, torch.Tensor) or base.name in saved:
                continue
            saved[base.name] = SavedTensor(
                base.name, tuple(val.shape), str(val.dtype).removeprefix("torch."), val.numel() * val.element_size()
            )
    return sorted(saved.values(), key=lambda s: index[by_name[s.node]])


def total_bytes(saved: list[SavedTensor]) -> int:
    """Bytes of ``saved``, together."""
    return sum(s.nbytes for s in saved)
