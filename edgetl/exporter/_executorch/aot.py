"""Ahead-of-time half: from ``torch.export`` programs to ExecuTorch program bytes (the workstation).

Lowering inference programs to XNNPACK, ``_export_forward_backward``, emitting the training
program with its external weights and corrected training metadata, and writing ``.ptd`` files.
``executorch.exir`` and its private modules are imported lazily, inside the functions.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgetl.exporter._executorch.runtime import GRADIENTS_INDEX, PARAMETER_NAMES, PARAMETERS_INDEX, TensorSlot, ptd_slots

#: the file stem ExecuTorch gives external weights tagged without a name of their own
EXTERNAL_TAG = "_default_external_constant"


class MissingKernelError(RuntimeError):
    """Operators in a program that ExecuTorch cannot run (no out-variant or no kernel)."""

    def __init__(self, ops: Iterable[str], detail: str = "") -> None:
        self.ops = sorted(set(ops))
        super().__init__(f"no ExecuTorch kernel for {', '.join(self.ops)}" + (f" ({detail})" if detail else ""))


def _missing_operators(exc: BaseException) -> list[str] | None:
    """The operators an ExecuTorch compile error says it cannot handle, or None for other errors."""
    text = str(exc)
    core = re.findall(r"Operator (\S+) is not in Core ATen opset", text)
    if core:
        return [op.removeprefix("torch._ops.") for op in core]
    if "Missing out variants" not in text:
        return None
    inner = text.split("Missing out variants:", 1)[1]
    return [tok.strip(" '{}\"") for tok in inner.split(",") if tok.strip(" '{}\"")]


@contextlib.contextmanager
def _naming_missing_kernels(detail: str = "") -> Iterator[None]:
    """Turn ExecuTorch's errors about operators it cannot compile into :class:`MissingKernelError`.

    They come as text only: the verifier's ``SpecViolationError`` for operators outside core ATen,
    ``RuntimeError("Missing out variants: ...")`` from ``to_executorch``.
    """
    try:
        yield
    except Exception as exc:
        missing = _missing_operators(exc)
        if missing is None:
            raise
        raise MissingKernelError(missing, detail) from None


def export_forward_backward(ep):
    """The joint forward-backward graph of an exported program whose first output is a loss."""
    from torch.export.experimental import _export_forward_backward

    return _export_forward_backward(ep)


@dataclass
class LoweredProgram:
    """An inference program lowered to XNNPACK."""

    buffer: bytes
    #: operators left outside the XNNPACK delegate (run by portable kernels), as edge-graph targets
    undelegated: list[str] = field(default_factory=list)
    #: operators the program calls (``aten::mm.out``), delegates excluded
    operators: list[str] = field(default_factory=list)
    #: backends the program delegates to
    delegates: list[str] = field(default_factory=list)
    #: the edge program (for locating an operator in the model)
    edge_graph: Any = None


def _plan_operators(plan) -> list[str]:
    return sorted(f"{op.name}.{op.overload}" if op.overload else op.name for op in plan.operators)


def _op_name(target: Any) -> str:
    text = str(target)
    return text.split(":", 1)[1].split(">", 1)[0].strip() if text.startswith("<EdgeOpOverload:") else text


def lower_to_xnnpack(ep) -> LoweredProgram:
    """``to_edge_transform_and_lower`` with the XNNPACK partitioner, then ``to_executorch``."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.utils.configs import get_transform_passes
    from executorch.exir import to_edge_transform_and_lower

    with _naming_missing_kernels("not in the Core ATen operator set"):
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()], transform_passes=get_transform_passes())
    graph = edge.exported_program().graph
    undelegated = sorted(
        {
            _op_name(n.target)
            for n in graph.nodes
            if n.op == "call_function" and "executorch_call_delegate" not in str(n.target) and "getitem" not in str(n.target)
        }
    )
    with _naming_missing_kernels():
        program = edge.to_executorch()
    plan = program.executorch_program.execution_plan[0]
    return LoweredProgram(bytes(program.buffer), undelegated, _plan_operators(plan), sorted({d.id for d in plan.delegates}), graph)


def portable_program(ep) -> bytes:
    """``ep`` emitted as is, no delegate: every operator runs ExecuTorch's (or edgetl's) kernels.
    The IR check is off so edgetl's custom operators (outside core ATen) pass."""
    from executorch.exir import EdgeCompileConfig, to_edge

    with _naming_missing_kernels():
        return bytes(to_edge(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False)).to_executorch().buffer)


@dataclass
class TrainingProgram:
    """An emitted training program: the ``.pte``, its ``.ptd`` and where each tensor is in it."""

    pte: bytes
    ptd: bytes
    layout: dict[str, TensorSlot]
    #: planned (non-constant) memory arenas per method, in bytes
    planned_bytes: dict[str, list[int]]
    #: operators each method calls
    operators: dict[str, list[str]]


def _corrected_training_metadata(methods: Mapping[str, Any]) -> dict[str, Any]:
    """ExecuTorch's ``_get_training_metadata`` without counting buffer-mutation outputs, which the
    emitter drops from the method's outputs (fact 1)."""
    from torch.export.graph_signature import OutputKind

    metadata: dict[str, Any] = {}
    for name, method in methods.items():
        index, fqns, grads_at, params_at = 0, [], None, None
        for spec in method.graph_signature.output_specs:
            if spec.kind == OutputKind.BUFFER_MUTATION:
                continue
            if spec.kind == OutputKind.GRADIENT_TO_PARAMETER:
                grads_at = index if grads_at is None else grads_at
                fqns.append(spec.target)
            elif spec.kind == OutputKind.TOKEN and params_at is None and grads_at is not None:
                params_at = index  # weights_to_outputs_pass appends the weights as TOKEN outputs
            index += 1
        if grads_at is not None:
            metadata[GRADIENTS_INDEX + name] = grads_at
            metadata[PARAMETERS_INDEX + name] = params_at if params_at is not None else index
            metadata[PARAMETER_NAMES + name] = fqns
    return metadata


def training_metadata(methods: Mapping[str, Any], *, corrected: bool = True) -> dict[str, Any]:
    """The ``__et_training_*`` metadata a program emitted from ``methods`` carries: edgetl's
    (``corrected``) or what ExecuTorch computes by itself."""
    if corrected:
        return _corrected_training_metadata(methods)
    from executorch.exir.emit._emit_program import _get_training_metadata

    return _get_training_metadata(dict(methods))


@contextlib.contextmanager
def _emitting_corrected_training_metadata() -> Iterator[None]:
    """While inside, ExecuTorch's emitter writes :func:`_corrected_training_metadata` (fact 1).

    The emitter computes the ``__et_training_*`` constant methods itself, from a module-level
    function of ``executorch.exir.emit._emit_program``, with no option to supply them (passing our
    own as constant methods would duplicate the names), so that function is swapped for the
    duration of one ``to_executorch`` call and restored after, even on error. Not thread-safe:
    exports do not run concurrently in one process.
    """
    import executorch.exir.emit._emit_program as emitter

    original = emitter._get_training_metadata
    emitter._get_training_metadata = _corrected_training_metadata
    try:
        yield
    finally:
        emitter._get_training_metadata = original


def _tag_external(names: set[str]) -> Callable:
    """A pass placing the placeholders ``names`` in the ``.ptd``, initial values included (fact 2)."""
    from executorch.exir.pass_base import PassResult

    def tag(gm):
        for node in gm.graph.nodes:
            if node.op == "placeholder" and node.name in names:
                node.meta["constant_tag"] = EXTERNAL_TAG
                node.meta["et_init_buffer"] = True
        return PassResult(gm, True)

    return tag


def emit_training_program(methods: Mapping[str, Any], external: set[str]) -> TrainingProgram:
    """Emit ``methods`` (name -> ExportedProgram; joint forward-backward graphs and plain ones) as
    one program whose trainable weights and the state dict entries ``external`` live in a ``.ptd``."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge

    with _naming_missing_kernels():
        edge = to_edge(dict(methods), compile_config=EdgeCompileConfig(_check_ir_validity=False))
    placeholders: set[str] = set()
    for name in methods:
        sig = edge.exported_program(name).graph_signature
        pairs = list(sig.inputs_to_parameters.items()) + list(sig.inputs_to_buffers.items())
        placeholders |= {ph for ph, fqn in pairs if fqn in external}
    config = ExecutorchBackendConfig(external_mutable_weights=True, passes=[_tag_external(placeholders)])
    with _naming_missing_kernels(), _emitting_corrected_training_metadata():
        program = edge.to_executorch(config)
    blobs = program._tensor_data  # {file stem: Cord}
    if set(blobs) != {EXTERNAL_TAG}:
        raise RuntimeError(f"expected one external data file, got {sorted(blobs)}")
    ptd, layout = unshare_ptd(bytes(blobs[EXTERNAL_TAG]))
    plans = [p for p in program.executorch_program.execution_plan if not p.name.startswith("__et_")]
    return TrainingProgram(
        pte=bytes(program.buffer),
        ptd=ptd,
        layout=layout,
        planned_bytes={p.name: list(p.non_const_buffer_sizes) for p in plans},
        operators={p.name: _plan_operators(p) for p in plans},
    )


# --- writing the external weights file (.ptd) ----------------------------------------------------


def unshare_ptd(data: bytes) -> tuple[bytes, dict[str, TensorSlot]]:
    """Rewrite a ``.ptd`` so that every name has its own segment (fact 4); return it and its layout."""
    from executorch.exir._serialize.data_serializer import DataEntry, DataPayload
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    serializer = FlatTensorSerializer()
    payload = serializer.deserialize(data)
    names = sorted(payload.named_data)
    buffers = [bytes(payload.buffers[payload.named_data[n].buffer_index]) for n in names]
    entries = {n: DataEntry(buffer_index=i, alignment=16, tensor_layout=payload.named_data[n].tensor_layout) for i, n in enumerate(names)}
    out = bytes(serializer.serialize(DataPayload(buffers=buffers, named_data=entries)))
    layout = ptd_slots(out)
    spans = sorted((s.offset, s.offset + s.nbytes) for s in layout.values())
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False)):
        raise RuntimeError("weights file segments overlap after rewriting")
    return out, layout


def write_ptd(base: bytes, layout: Mapping[str, TensorSlot], tensors: Mapping[str, np.ndarray]) -> bytes:
    """``base`` (a ``.ptd`` whose tensors each own their bytes, see :func:`unshare_ptd`) with
    ``tensors`` written over the named slots. Shapes and dtypes must match the layout."""
    out = bytearray(base)
    for name, value in tensors.items():
        slot = layout[name]
        arr = np.ascontiguousarray(value, dtype=slot.dtype)
        if arr.size == math.prod(slot.shape):
            arr = arr.reshape(slot.shape)  # the runtime hands 0-d tensors back as 1-d
        if tuple(arr.shape) != slot.shape or arr.nbytes != slot.nbytes:
            raise ValueError(f"{name}: shape {tuple(arr.shape)} does not fit the weights file slot {slot.shape}")
        out[slot.offset : slot.offset + slot.nbytes] = arr.tobytes()
    return bytes(out)


#: what :func:`quantize_int8` does, in the manifest's words (XNNPACKQuantizer's symmetric static
#: config, ExecuTorch 1.5.x: weights per output channel, symmetric, int8 in [-127, 127];
#: activations per tensor, affine, int8 in [-128, 127], ranges observed on the calibration images).
#: Decided: activation ranges are the calibration images' min/max, not the config's default
#: histogram fit (which clips outliers): on the demo's Lite0 (400 validation images, 200
#: calibration images) min/max agreed with float32 on 91.5% of the images against 89.2%, and lost
#: 4.3 accuracy points against 6.8.
INT8_SCHEME = {
    "name": "int8",
    "flow": "PT2E static: torchao prepare_pt2e -> calibrate -> convert_pt2e, lowered to XNNPACK",
    "quantizer": "executorch XNNPACKQuantizer, get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False) "
    "with MinMaxObserver for activations",
    "weights": "int8, symmetric, per output channel (convolutions and linear layers)",
    "activations": "int8, affine, per tensor, static (min/max over the calibration images)",
    "inputs_outputs": "float32 (the program quantizes its input and dequantizes its output)",
}


def quantize_int8(module, example, batches: Iterable[Any]):
    """``module`` (eval mode) as a PT2E-quantized graph for XNNPACK: captured at the shape of
    ``example``, observed on every tensor of ``batches`` (each shaped like ``example``), converted.

    The result runs in eager PyTorch (quantize/dequantize around float kernels, the reference of
    what XNNPACK computes in int8); export it with ``torch.export`` and :func:`lower_to_xnnpack`.
    """
    import dataclasses

    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e import MinMaxObserver, allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
    activation = dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
    quantizer = XNNPACKQuantizer().set_global(dataclasses.replace(config, input_activation=activation, output_activation=activation))
    with torch.no_grad():
        captured = torch.export.export(module.eval(), (example,), strict=False).module()
        prepared = prepare_pt2e(captured, quantizer)
        for batch in batches:
            prepared(batch)
        converted = convert_pt2e(prepared)
    # an exported graph refuses .eval() unless allowed; it holds no dropout or batch norm left to switch
    allow_exported_model_train_eval(converted)
    return converted
