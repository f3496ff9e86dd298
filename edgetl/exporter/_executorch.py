"""The one module that touches ExecuTorch's experimental and private APIs (written against 1.5.x).

A new ExecuTorch release should need a change here and nowhere else. Two halves:

* **Ahead of time** (the workstation; imports ``executorch.exir`` lazily): lowering to XNNPACK,
  ``torch.export.experimental._export_forward_backward``, emitting the training program with its
  external weights, and rewriting the ``.ptd`` so every tensor has its own bytes.
* **Runtime** (the workstation's verification of what it exports): loading programs, running
  methods on numpy arrays, the training session over the joint forward-backward method,
  ExecuTorch's SGD, and saving updated weights into a new ``.ptd``. The device runs the same
  programs with the native runner (``deploy/native``, ExecuTorch's C++ runtime, no torch).

ExecuTorch's Python bindings import torch themselves (their shared library links libtorch), so
torch is imported lazily, here, only to hand tensors to those bindings.

Facts this module works around (verified on ExecuTorch 1.5.1 / torch 2.13):

1. ``_get_training_metadata`` counts buffer-mutation outputs (batch-norm running statistics),
   which the emitted method does not return, so ``__et_training_gradients_index_<m>`` and
   ``__et_training_parameters_index_<m>`` are too large by their number and ExecuTorch's
   ``TrainingModule`` (Python, C++ and Java) slices gradients and parameters wrongly. We emit
   corrected metadata; :class:`TrainingSession` derives the layout from the output count and
   checks the metadata against it.
2. Mutated buffers are emitted without their initial values ("meaningless initial state")
   unless tagged ``et_init_buffer``; we tag the running statistics so, and place them in the
   ``.ptd`` beside the trainable weights (``constant_tag``), so training resumes from saved ones.
   A method's buffers are not reachable from the Java ``TrainingModule``: edgetl's training
   programs also return the updated statistics as outputs (after loss and logits).
3. The emitter fails on a ``view`` of an external weight ("Constant tag is not set for external
   tensor"); the exported models use ``squeeze``/``t`` on weights instead (see ``nhwc.py``).
4. The ``.ptd`` writer de-duplicates identical tensors (two zero-initialised biases share bytes);
   :func:`unshare_ptd` rewrites it with one segment per name so updated weights can be written
   in place of the old ones.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: The ExecuTorch release series this adapter is written against.
SUPPORTED_SERIES = "1.5"
EXTERNAL_TAG = "_default_external_constant"
_GRAD_PREFIX = "__et_training_gradients_index_"
_PARAM_PREFIX = "__et_training_parameters_index_"
_FQN_PREFIX = "__et_training_fqn_"

# ScalarType codes of ExecuTorch's flatbuffer schema -> numpy dtypes (those a model's state uses)
_SCALAR_TYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 6: "float32", 7: "float64", 11: "bool"}


class ExecutorchUnavailable(ImportError):
    """The ExecuTorch Python package (or a part of it this adapter needs) is not installed."""


def executorch_version() -> str | None:
    """The installed ExecuTorch version, or None when it is not installed."""
    try:
        from executorch.version import __version__
    except ImportError:
        return None
    return str(__version__)


def require_executorch() -> str:
    """The installed ExecuTorch version; raises :class:`ExecutorchUnavailable` if there is none."""
    version = executorch_version()
    if version is None:
        raise ExecutorchUnavailable("ExecuTorch is not installed: pip install executorch==1.5.1 (Linux x86-64/aarch64, macOS arm64)")
    return version


def _torch():
    import torch  # ExecuTorch's bindings already loaded it; tensors are their currency

    return torch


def _bindings():
    try:
        from executorch.extension.pybindings import portable_lib
    except ImportError as exc:
        raise ExecutorchUnavailable(f"the ExecuTorch runtime is not importable: {exc}") from None
    return portable_lib


def _to_tensor(value: Any):
    if isinstance(value, np.ndarray):
        return _torch().from_numpy(np.ascontiguousarray(value))
    return value


def _to_numpy(value: Any) -> Any:
    torch = _torch()
    return value.detach().clone().numpy() if isinstance(value, torch.Tensor) else value


# =============================================================================================
# Runtime
# =============================================================================================


#: where ``deploy/native/build.sh`` puts edgetl's kernel library, in a checkout (EDGETL_NATIVE_KERNELS overrides)
_KERNELS_IN_CHECKOUT = Path(__file__).resolve().parents[2] / "deploy" / "native" / "build" / "libedgetl_kernels.so"


def load_native_kernels(path: str | os.PathLike | None = None) -> Path | None:
    """Load edgetl's ExecuTorch kernel library (``deploy/native/kernels``) into this process, so
    the Python bindings run the operators the device runs; returns its path, or None if absent.

    It links the same ``libexecutorch.so`` as the bindings, whose operator registry its static
    initialisers fill (once per process: the dynamic loader does not load a library twice).
    """
    import ctypes

    candidate = Path(path or os.environ.get("EDGETL_NATIVE_KERNELS") or _KERNELS_IN_CHECKOUT)
    if not candidate.is_file():
        return None
    _bindings()  # libexecutorch.so first, from the bindings' own location
    ctypes.CDLL(str(candidate), mode=ctypes.RTLD_GLOBAL)
    return candidate


def set_threads(n: int) -> None:
    """Threads of ExecuTorch's shared thread pool (XNNPACK and the optimized kernels use it)."""
    _bindings()._unsafe_reset_threadpool(int(n))


class Program:
    """A loaded ``.pte`` (with its ``.ptd``, if any) whose methods run on numpy arrays."""

    def __init__(self, pte: str | os.PathLike, ptd: str | os.PathLike | None = None) -> None:
        lib = _bindings()
        self.path = Path(pte)
        self._program = lib._load_program(str(pte), data_path=None if ptd is None else str(ptd))
        self._methods: dict[str, Any] = {}

    @property
    def method_names(self) -> list[str]:
        return [self._program.get_method_name(i) for i in range(self._program.num_methods())]

    def method(self, name: str):
        if name not in self._methods:
            self._methods[name] = self._program.load_method(name)
        return self._methods[name]

    def run(self, method: str, *inputs: Any) -> list[Any]:
        """Run ``method`` on numpy arrays (or tensors); outputs as numpy arrays (copies)."""
        outputs = self.method(method).call([_to_tensor(x) for x in inputs])
        return [_to_numpy(o) for o in outputs]

    def input_shapes(self, method: str) -> list[tuple[int, ...]]:
        """The static input shapes of ``method``."""
        meta = self._program.method_meta(method)
        return [tuple(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]


@dataclass
class TrainingLayout:
    """Where a joint forward-backward method's outputs are: ``[user outputs, gradients, parameters]``."""

    parameter_names: list[str]
    num_user_outputs: int
    gradients_start: int
    parameters_start: int
    #: what the program's ``__et_training_*_index`` metadata says (differs from the true layout
    #: in programs emitted by an unpatched ExecuTorch 1.5 with mutated buffers)
    recorded_gradients_start: int
    recorded_parameters_start: int

    @property
    def metadata_ok(self) -> bool:
        return (self.recorded_gradients_start, self.recorded_parameters_start) == (self.gradients_start, self.parameters_start)


class TrainingSession:
    """A training program (joint forward-backward method + external weights) being fine-tuned.

    The same calls an app makes through ExecuTorch's ``TrainingModule`` (``forward_backward``,
    ``named_parameters``, ``named_gradients``), plus the running statistics (``named_buffers``:
    edgetl's programs return them after the loss and logits, named by ``buffer_names``) and
    :meth:`state`, everything a ``.ptd`` holds (see :func:`write_ptd`).
    """

    def __init__(
        self, pte: str | os.PathLike, ptd: str | os.PathLike, *, method: str = "forward", buffer_names: Sequence[str] = ()
    ) -> None:
        self.program = Program(pte, ptd)
        self.method_name = method
        self._method = self.program.method(method)
        self.layout = self._layout(method)
        self.buffer_names = list(buffer_names)
        if len(self.buffer_names) > self.layout.num_user_outputs:
            raise ValueError(f"{method} returns {self.layout.num_user_outputs} user outputs, fewer than {len(self.buffer_names)} buffers")
        self._params: dict[str, Any] | None = None
        self._grads: dict[str, Any] = {}
        self._buffers: dict[str, np.ndarray] = {}

    def _metadata(self, name: str) -> list[Any]:
        return list(self.program.method(name).call([]))

    def _layout(self, method: str) -> TrainingLayout:
        names = [str(n) for n in self._metadata(_FQN_PREFIX + method)]
        n_out = self._method.method_meta().num_outputs()
        # parameters are the last len(names) outputs and gradients the len(names) before them,
        # whatever the metadata says (see fact 1 in the module docstring)
        grads_start, params_start = n_out - 2 * len(names), n_out - len(names)
        return TrainingLayout(
            parameter_names=names,
            num_user_outputs=grads_start,
            gradients_start=grads_start,
            parameters_start=params_start,
            recorded_gradients_start=int(self._metadata(_GRAD_PREFIX + method)[0]),
            recorded_parameters_start=int(self._metadata(_PARAM_PREFIX + method)[0]),
        )

    def forward_backward(self, *inputs: Any) -> list[Any]:
        """One forward and backward pass; returns the user outputs (loss first) as numpy arrays.

        Gradients and parameters are left in the program's memory (no copies), so an optimizer
        step updates the weights the next call uses.
        """
        outputs = self._method.call([_to_tensor(x) for x in inputs], clone_outputs=False)
        lay = self.layout
        self._grads = dict(zip(lay.parameter_names, outputs[lay.gradients_start : lay.parameters_start], strict=True))
        if self._params is None:
            self._params = dict(zip(lay.parameter_names, outputs[lay.parameters_start :], strict=True))
        user = [_to_numpy(o) for o in outputs[: lay.num_user_outputs]]
        if self.buffer_names:
            self._buffers = dict(zip(self.buffer_names, user[lay.num_user_outputs - len(self.buffer_names) :], strict=True))
        return user

    def named_parameters(self) -> dict[str, Any]:
        """Live parameter tensors (mutating them changes the program's weights)."""
        if self._params is None:
            raise RuntimeError("call forward_backward once before named_parameters")
        return self._params

    def named_gradients(self) -> dict[str, Any]:
        """The last step's gradients, by parameter name (program memory, valid until the next step)."""
        return self._grads

    def named_buffers(self) -> dict[str, np.ndarray]:
        """The running statistics after the last step (copies)."""
        return self._buffers

    def sgd(self, lr: float, *, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False) -> SGD:
        """ExecuTorch's SGD over this session's parameters (PyTorch's ``torch.optim.SGD`` rule)."""
        return SGD(self, lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)

    def state(self) -> dict[str, np.ndarray]:
        """Copies of the current parameters and running statistics, by name."""
        out = {name: _to_numpy(t) for name, t in self.named_parameters().items()}
        out.update(self.named_buffers())
        return out


class SGD:
    """ExecuTorch's C++ SGD (``get_sgd_optimizer``) bound to a :class:`TrainingSession`.

    Its momentum buffers live inside the C++ object: they are not saved with the weights and
    restart at zero when a session is resumed.
    """

    def __init__(
        self, session: TrainingSession, lr: float, *, momentum: float, dampening: float, weight_decay: float, nesterov: bool
    ) -> None:
        try:
            from executorch.extension.training import get_sgd_optimizer
        except ImportError as exc:
            raise ExecutorchUnavailable(f"ExecuTorch's training extension is not importable: {exc}") from None
        self.session = session
        self.lr = lr
        self._opt = get_sgd_optimizer(session.named_parameters(), lr, momentum, dampening, weight_decay, nesterov)

    def step(self) -> None:
        self._opt.step(self.session.named_gradients())


# --- the external weights file (.ptd) -----------------------------------------------------------


@dataclass(frozen=True)
class TensorSlot:
    """Where one named tensor's bytes are in a ``.ptd`` file."""

    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"offset": self.offset, "nbytes": self.nbytes, "dtype": self.dtype, "shape": list(self.shape)}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> TensorSlot:
        return TensorSlot(int(d["offset"]), int(d["nbytes"]), str(d["dtype"]), tuple(int(s) for s in d["shape"]))


def read_ptd(data: bytes) -> dict[str, np.ndarray]:
    """Every named tensor of a ``.ptd`` file (needs the ExecuTorch package's serializer)."""
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorHeader, _deserialize_to_flat_tensor

    header = FlatTensorHeader.from_bytes(data[8:])
    if not header.is_valid():
        raise ValueError("not an ExecuTorch .ptd file")
    flat = _deserialize_to_flat_tensor(data[: header.flatbuffer_offset + header.flatbuffer_size])
    out = {}
    for named in flat.named_data:
        seg, tl = flat.segments[named.segment_index], named.tensor_layout
        dtype = _SCALAR_TYPES[int(getattr(tl.scalar_type, "value", tl.scalar_type))]
        slot = TensorSlot(header.segment_base_offset + seg.offset, seg.size, dtype, tuple(int(s) for s in tl.sizes))
        out[named.key] = read_ptd_tensor(data, slot).copy()
    return out


def read_ptd_tensor(data: bytes, slot: TensorSlot) -> np.ndarray:
    """One tensor out of a ``.ptd`` file's bytes."""
    return np.frombuffer(data, dtype=slot.dtype, count=int(np.prod(slot.shape, dtype=np.int64)), offset=slot.offset).reshape(slot.shape)


def write_ptd(base: bytes, layout: Mapping[str, TensorSlot], tensors: Mapping[str, np.ndarray]) -> bytes:
    """``base`` (a ``.ptd`` whose tensors each own their bytes, see :func:`unshare_ptd`) with
    ``tensors`` written over the named slots. Shapes and dtypes must match the layout."""
    out = bytearray(base)
    for name, value in tensors.items():
        slot = layout[name]
        arr = np.ascontiguousarray(value, dtype=slot.dtype)
        if arr.size == int(np.prod(slot.shape, dtype=np.int64)):
            arr = arr.reshape(slot.shape)  # the runtime hands 0-d tensors back as 1-d
        if tuple(arr.shape) != slot.shape or arr.nbytes != slot.nbytes:
            raise ValueError(f"{name}: shape {tuple(arr.shape)} does not fit the weights file slot {slot.shape}")
        out[slot.offset : slot.offset + slot.nbytes] = arr.tobytes()
    return bytes(out)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# =============================================================================================
# Ahead of time
# =============================================================================================


class MissingKernelError(RuntimeError):
    """Operators in a program that ExecuTorch cannot run (no out-variant or no kernel)."""

    def __init__(self, ops: Iterable[str], detail: str = "") -> None:
        self.ops = sorted(set(ops))
        super().__init__(f"no ExecuTorch kernel for {', '.join(self.ops)}" + (f" ({detail})" if detail else ""))


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


def registered_operators() -> set[str]:
    """Operators (``aten::mm.out``) the installed ExecuTorch runtime has kernels for."""
    return set(_bindings()._get_operator_names())


def _plan_operators(plan) -> list[str]:
    return sorted(f"{op.name}.{op.overload}" if op.overload else op.name for op in plan.operators)


def _parse_missing(exc: BaseException) -> list[str] | None:
    text = str(exc)
    core = re.findall(r"Operator (\S+) is not in Core ATen opset", text)
    if core:
        return [op.removeprefix("torch._ops.") for op in core]
    if "Missing out variants" not in text:
        return None
    inner = text.split("Missing out variants:", 1)[1]
    return [tok.strip(" '{}\"") for tok in inner.split(",") if tok.strip(" '{}\"")]


def _op_name(target: Any) -> str:
    text = str(target)
    return text.split(":", 1)[1].split(">", 1)[0].strip() if text.startswith("<EdgeOpOverload:") else text


def lower_to_xnnpack(ep) -> LoweredProgram:
    """``to_edge_transform_and_lower`` with the XNNPACK partitioner, then ``to_executorch``."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    try:
        from executorch.backends.xnnpack.utils.configs import get_transform_passes

        passes = get_transform_passes()
    except ImportError:  # older releases: the passes are optional
        passes = None
    kwargs = {"transform_passes": passes} if passes is not None else {}
    try:
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()], **kwargs)
    except Exception as exc:  # the verifier raises SpecViolationError for operators outside core ATen
        missing = _parse_missing(exc)
        if missing is not None:
            raise MissingKernelError(missing, "not in the Core ATen operator set") from None
        raise
    undelegated = sorted(
        {
            _op_name(n.target)
            for n in edge.exported_program().graph.nodes
            if n.op == "call_function" and "executorch_call_delegate" not in str(n.target) and "getitem" not in str(n.target)
        }
    )
    try:
        program = edge.to_executorch()
    except RuntimeError as exc:
        missing = _parse_missing(exc)
        if missing is not None:
            raise MissingKernelError(missing) from None
        raise
    plan = program.executorch_program.execution_plan[0]
    return LoweredProgram(
        bytes(program.buffer), undelegated, _plan_operators(plan), sorted({d.id for d in plan.delegates}), edge.exported_program().graph
    )


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
            metadata[_GRAD_PREFIX + name] = grads_at
            metadata[_PARAM_PREFIX + name] = params_at if params_at is not None else index
            metadata[_FQN_PREFIX + name] = fqns
    return metadata


def training_metadata(methods: Mapping[str, Any], *, corrected: bool = True) -> dict[str, Any]:
    """The ``__et_training_*`` metadata a program emitted from ``methods`` carries: edgetl's
    (``corrected``) or what ExecuTorch computes by itself."""
    if corrected:
        return _corrected_training_metadata(methods)
    from executorch.exir.emit._emit_program import _get_training_metadata

    return _get_training_metadata(dict(methods))


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


def emit_training_program(
    methods: Mapping[str, Any], external: set[str], decompositions: Mapping[Any, Callable] | None = None
) -> TrainingProgram:
    """Emit ``methods`` (name -> ExportedProgram; joint forward-backward graphs and plain ones) as
    one program whose trainable weights and the state dict entries ``external`` live in a ``.ptd``.

    ``decompositions`` are applied first (``run_decompositions``), e.g. to turn custom operators
    into ATen after ``_export_forward_backward`` has recorded their backward.
    """
    import executorch.exir.emit._emit_program as emit_program
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge

    if decompositions:
        methods = {name: ep.run_decompositions(dict(decompositions)) for name, ep in methods.items()}
    try:
        edge = to_edge(dict(methods), compile_config=EdgeCompileConfig(_check_ir_validity=False))
    except RuntimeError as exc:
        missing = _parse_missing(exc)
        if missing is not None:
            raise MissingKernelError(missing) from None
        raise
    placeholders: set[str] = set()
    for name in methods:
        sig = edge.exported_program(name).graph_signature
        pairs = list(sig.inputs_to_parameters.items()) + list(sig.inputs_to_buffers.items())
        placeholders |= {ph for ph, fqn in pairs if fqn in external}
    config = ExecutorchBackendConfig(external_mutable_weights=True, passes=[_tag_external(placeholders)])
    original = emit_program._get_training_metadata
    emit_program._get_training_metadata = _corrected_training_metadata
    try:
        program = edge.to_executorch(config)
    except RuntimeError as exc:
        missing = _parse_missing(exc)
        if missing is not None:
            raise MissingKernelError(missing) from None
        raise
    finally:
        emit_program._get_training_metadata = original
    blobs = program._tensor_data  # {file stem: Cord}
    if set(blobs) != {EXTERNAL_TAG}:
        raise RuntimeError(f"expected one external data file, got {sorted(blobs)}")
    ptd, layout = unshare_ptd(bytes(blobs[EXTERNAL_TAG]))
    plans = program.executorch_program.execution_plan
    return TrainingProgram(
        pte=bytes(program.buffer),
        ptd=ptd,
        layout=layout,
        planned_bytes={p.name: list(p.non_const_buffer_sizes) for p in plans if not p.name.startswith("__et_")},
        operators={p.name: _plan_operators(p) for p in plans if not p.name.startswith("__et_")},
    )


def profile_operators(
    pte: str | os.PathLike, ptd: str | os.PathLike | None, method: str, inputs: Sequence[Any], runs: int = 3
) -> dict[str, float]:
    """Milliseconds per operator kernel over ``runs`` executions of ``method`` (ETDump + Inspector)."""
    import collections

    from executorch.devtools import Inspector

    lib = _bindings()
    module = lib._load_for_executorch(str(pte), data_path=None if ptd is None else str(ptd), enable_etdump=True)
    for _ in range(runs):
        module.run_method(method, [_to_tensor(x) for x in inputs], clone_outputs=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "run.etdp")
        module.write_etdump_result_to_file(path)
        inspector = Inspector(etdump_path=path)
    totals: dict[str, float] = collections.Counter()
    for block in inspector.event_blocks:
        for event in block.events:
            if event.perf_data is not None and event.name.startswith("native_call_"):
                totals[event.name.removeprefix("native_call_")] += float(event.perf_data.avg)
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def unshare_ptd(data: bytes) -> tuple[bytes, dict[str, TensorSlot]]:
    """Rewrite a ``.ptd`` so that every name has its own segment (fact 4); return it and its layout."""
    from executorch.exir._serialize.data_serializer import DataEntry, DataPayload
    from executorch.extension.flat_tensor.serialize.serialize import (
        FlatTensorHeader,
        FlatTensorSerializer,
        _deserialize_to_flat_tensor,
    )

    serializer = FlatTensorSerializer()
    payload = serializer.deserialize(data)
    names = sorted(payload.named_data)
    buffers = [bytes(payload.buffers[payload.named_data[n].buffer_index]) for n in names]
    entries = {n: DataEntry(buffer_index=i, alignment=16, tensor_layout=payload.named_data[n].tensor_layout) for i, n in enumerate(names)}
    out = bytes(serializer.serialize(DataPayload(buffers=buffers, named_data=entries)))

    header = FlatTensorHeader.from_bytes(out[8:])
    flat = _deserialize_to_flat_tensor(out[: header.flatbuffer_offset + header.flatbuffer_size])
    layout: dict[str, TensorSlot] = {}
    for named in flat.named_data:
        seg = flat.segments[named.segment_index]
        tl = named.tensor_layout
        dtype = _SCALAR_TYPES.get(int(tl.scalar_type.value if hasattr(tl.scalar_type, "value") else tl.scalar_type))
        if dtype is None:
            raise RuntimeError(f"{named.key}: unsupported tensor dtype {tl.scalar_type} in the weights file")
        layout[named.key] = TensorSlot(header.segment_base_offset + seg.offset, seg.size, dtype, tuple(int(s) for s in tl.sizes))
    offsets = sorted((s.offset, s.offset + s.nbytes) for s in layout.values())
    if any(a[1] > b[0] for a, b in zip(offsets, offsets[1:], strict=False)):
        raise RuntimeError("weights file segments overlap after rewriting")
    return out, layout
