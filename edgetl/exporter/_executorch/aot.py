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
#: A convolution followed by a clamp (ReLU6) is quantized at the clamp's output, as XNNPACK runs
#: the pair (one convolution with a fused output range): the quantizer leaves ReLU6 out of its
#: convolution patterns and would give the clamp's [0, 6] the convolution's whole range otherwise.
INT8_SCHEME = {
    "name": "int8",
    "flow": "PT2E static: torchao prepare_pt2e -> calibrate -> convert_pt2e, lowered to XNNPACK",
    "quantizer": "executorch XNNPACKQuantizer, get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False); "
    "convolution + ReLU6 quantized at the clamp's output",
    "weights": "int8, symmetric, per output channel (convolutions and linear layers)",
    "activations": "int8, affine, per tensor, static (ranges observed over the calibration images)",
    "inputs_outputs": "float32 (the program quantizes its input and dequantizes its output)",
}

_HARDTANH = ("aten.hardtanh.default", "aten.hardtanh_.default")
_LAYER_OPS = ("aten.conv2d.default", "aten.convolution.default", "aten.linear.default")


def _owner(node) -> str | None:
    """The innermost module a graph node was traced in (its qualified name), or None (weights,
    constants)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path.removeprefix("L['self'].")


def _observer(observer: str):
    """The activation observer named by ``ExportConfig.observer``; moving averages use torchao's
    momentum (0.01)."""
    from torchao.quantization.pt2e import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver

    if observer == "minmax":
        return MinMaxObserver.with_args(eps=2**-12)
    if observer == "moving_average":
        return MovingAverageMinMaxObserver.with_args(eps=2**-12)
    if observer == "histogram":
        return HistogramObserver.with_args(eps=2**-12)
    raise ValueError(f"unknown observer {observer!r}")


def _clamp_outputs(graph) -> None:
    """Move the output quantization of each convolution or linear layer whose one user is a
    hardtanh (ReLU6) onto the hardtanh, as the quantizer does for ReLU: the int8 grid then spans
    [0, 6] instead of the layer's pre-clamp range (which the clamp would share)."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

    key = "quantization_annotation"
    for h in graph.nodes:
        if h.op != "call_function" or str(h.target) not in _HARDTANH:
            continue
        layer = h.args[0]
        note = getattr(layer, "meta", {}).get(key)
        if note is None or str(layer.target) not in _LAYER_OPS or len(layer.users) != 1:
            continue
        spec = note.output_qspec
        if spec is None or isinstance(spec, SharedQuantizationSpec):
            continue
        note.output_qspec = None
        h.meta[key] = QuantizationAnnotation(output_qspec=spec, _annotated=True)


def capture(module, example):
    """``module`` (eval mode) captured by ``torch.export`` at the shape of ``example``: the graph
    :func:`prepare_int8` annotates (pass it as ``captured`` to capture once for many preparations)."""
    import torch

    with torch.no_grad():
        return torch.export.export(module.eval(), (example,), strict=False).module()


def _reads_padded_activation(node) -> bool:
    """``node`` reads an explicit pad (``ZeroPad2d``) of an intermediate activation. XNNPACK folds
    such a pad into the convolution after it together with the pad's int8 input, so that
    convolution cannot stay float32 between int8 layers (ExecuTorch 1.5: "Weight and Input should
    both be quantized"); a pad of the network's input lowers either way."""
    x = node.args[0]
    return "pad" in str(getattr(x, "target", "")) and getattr(x.args[0], "op", "") != "placeholder"


def quantizable_layers(module, example, *, floatable: bool = False) -> list[str]:
    """The qualified names of ``module``'s convolutions and linear layers, in graph order: what
    ``float_layers`` of :func:`quantize_int8` can name; with ``floatable``, only those XNNPACK can
    run in float32 between int8 layers."""
    captured = capture(module, example)
    names: list[str] = []
    for n in captured.graph.nodes:
        if n.op == "call_function" and str(n.target) in _LAYER_OPS and _owner(n) not in names:
            if not (floatable and _reads_padded_activation(n)):
                names.append(_owner(n))
    return names


def prepare_int8(
    module,
    example,
    *,
    observer: str = "minmax",
    float_layers: Iterable[str] = (),
    only_layers: Iterable[str] | None = None,
    fuse_clamps: bool = True,
    captured=None,
):
    """``module`` (eval mode) captured at the shape of ``example`` and prepared for PT2E int8 on
    XNNPACK: batch norms folded into their convolutions, an observer on every tensor to quantize.
    Its forward is the float32 network's (observers only watch): call it on calibration images,
    then :func:`convert_int8`.

    ``float_layers`` (qualified names of convolutions / linear layers, :func:`quantizable_layers`)
    stay float32; with ``only_layers`` every other layer does. ``fuse_clamps=False`` leaves the
    quantizer's own ReLU6 handling (the clamp shares its layer's pre-clamp range): a measurement
    option. ``captured`` (:func:`capture` of the same module and shape) is copied instead of
    capturing again.
    """
    import copy

    import torch
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    float_set = set(float_layers)
    only = None if only_layers is None else set(only_layers)

    def keep(node) -> bool:
        owner = _owner(node)
        if owner is None or str(node.target) not in _LAYER_OPS:
            return True
        return owner not in float_set and (only is None or owner in only)

    quantizer = _int8_quantizer(observer, fuse_clamps, keep)
    graph = capture(module, example) if captured is None else copy.deepcopy(captured)
    with torch.no_grad():
        return prepare_pt2e(graph, quantizer)


def _int8_quantizer(observer: str, fuse_clamps: bool, keep=None, *, qat: bool = False):
    """ExecuTorch's XNNPACK quantizer as edgetl configures it (see :data:`INT8_SCHEME`); with
    ``qat`` its fake-quantizing configuration (moving-average activation ranges)."""
    import dataclasses

    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

    class _Quantizer(XNNPACKQuantizer):
        def annotate(self, model):
            model = super().annotate(model)
            if fuse_clamps:
                _clamp_outputs(model.graph)
            return model

    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False, is_qat=qat)
    if not qat:
        activation = dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=_observer(observer))
        config = dataclasses.replace(config, input_activation=activation, output_activation=activation)
    quantizer = _Quantizer().set_global(config)
    if keep is not None:
        quantizer.set_filter_function(keep)
    return quantizer


def prepare_int8_qat(module, example):
    """A copy of ``module`` captured (eval mode, any batch size) with its batch norms folded into
    their convolutions and fake quantization on every tensor :func:`prepare_int8` quantizes: a
    graph to train (:func:`qat_mode`), then :func:`convert_int8`.

    The batch norms are folded with their running statistics before training, as the PTQ graph
    folds them, so the fake-quantized network trains the very weights the int8 program holds (a
    folded convolution is one int8 tensor) and its float path is the float32 network's.
    """
    import copy

    import torch
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_

    batch = torch.export.Dim("batch", min=2)
    graph = torch.export.export(copy.deepcopy(module).eval(), (example,), dynamic_shapes=({0: batch},), strict=False).module()
    _fuse_conv_bn_(graph)
    return prepare_qat_pt2e(graph, _int8_quantizer("minmax", True, qat=True))


def qat_mode(prepared, *, observe: bool, fake_quant: bool = True) -> None:
    """Set a :func:`prepare_int8_qat` graph's fake quantizers: ``observe`` updates their ranges
    (moving averages of each batch's extremes) or freezes them; ``fake_quant=False`` passes every
    tensor through unrounded (the graph's float path)."""
    from torchao.quantization.pt2e import move_exported_model_to_eval

    move_exported_model_to_eval(prepared)  # no dropout or batch norm stays in the folded graph either way
    for m in prepared.modules():
        if hasattr(m, "observer_enabled") and hasattr(m, "fake_quant_enabled"):
            m.observer_enabled[0] = int(observe)
            m.fake_quant_enabled[0] = int(fake_quant)


def convert_int8(prepared, ranges: dict[str, tuple[float, float]] | None = None):
    """A calibrated :func:`prepare_int8` graph converted to its int8 form. ``ranges``, when given,
    receives each observed activation's ``(min, max)`` keyed ``"producing module: node"``."""
    import torch
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    if ranges is not None:
        ranges.update(_observed_ranges(prepared))
    with torch.no_grad():
        converted = convert_pt2e(prepared)
    # an exported graph refuses .eval() unless allowed; it holds no dropout or batch norm left to switch
    allow_exported_model_train_eval(converted)
    return converted


def quantize_int8(module, example, batches: Iterable[Any], *, ranges: dict[str, tuple[float, float]] | None = None, **options):
    """``module`` (eval mode) as a PT2E-quantized graph for XNNPACK: :func:`prepare_int8` (with
    ``options``), observed on every tensor of ``batches`` (each shaped like ``example``),
    :func:`convert_int8`.

    The result runs in eager PyTorch (quantize/dequantize around float kernels, the reference of
    what XNNPACK computes in int8); export it with ``torch.export`` and :func:`lower_to_xnnpack`.
    """
    import torch

    prepared = prepare_int8(module, example, **options)
    with torch.no_grad():
        for batch in batches:
            prepared(batch)
    return convert_int8(prepared, ranges)


def _observed_ranges(prepared) -> dict[str, tuple[float, float]]:
    """Each activation observer's ``(min, max)``, keyed ``"producing module: node"``."""
    out: dict[str, tuple[float, float]] = {}
    for n in prepared.graph.nodes:
        if n.op != "call_module" or not n.args:
            continue
        obs = getattr(prepared, n.target)
        lo, hi = getattr(obs, "min_val", None), getattr(obs, "max_val", None)
        if lo is None or hi is None or lo.numel() != 1:
            continue  # weights (per channel) or never run
        src = n.args[0]
        out[f"{_owner(src) or 'input'}: {src.name}"] = (float(lo), float(hi))
    return out
