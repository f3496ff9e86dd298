"""Runtime half: running ExecuTorch programs from Python (the workstation's checks of what it exports).

Loading programs through the pybindings, running methods on numpy arrays, the training session
over a joint forward-backward method with ExecuTorch's SGD, edgetl's native kernel library, and
reading the external weights file (``.ptd``). The device runs the same programs with the native
runner (``deploy/native``, ExecuTorch's C++ runtime, no torch).

ExecuTorch's Python bindings import torch themselves (their shared library links libtorch), so
torch is imported lazily, here, only to hand tensors to those bindings.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: The ExecuTorch release series this adapter is written against.
SUPPORTED_SERIES = "1.5"
#: names of the constant methods holding a training program's output layout (``+ method name``)
GRADIENTS_INDEX = "__et_training_gradients_index_"
PARAMETERS_INDEX = "__et_training_parameters_index_"
PARAMETER_NAMES = "__et_training_fqn_"

# ScalarType codes of ExecuTorch's flatbuffer schema -> numpy dtypes (those a model's state uses)
SCALAR_TYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 6: "float32", 7: "float64", 11: "bool"}

#: where ``deploy/native/build.sh`` puts edgetl's kernel library, in a checkout (EDGETL_NATIVE_KERNELS overrides)
_KERNELS_IN_CHECKOUT = Path(__file__).resolve().parents[3] / "deploy" / "native" / "build" / "libedgetl_kernels.so"


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
    """ExecuTorch's Python bindings (``portable_lib``); :class:`ExecutorchUnavailable` without them."""
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


def registered_operators() -> set[str]:
    """Operators (``aten::mm.out``) the installed ExecuTorch runtime has kernels for."""
    return set(_bindings()._get_operator_names())


class Program:
    """A loaded ``.pte`` (with its ``.ptd``, if any) whose methods run on numpy arrays."""

    def __init__(self, pte: str | os.PathLike, ptd: str | os.PathLike | None = None) -> None:
        self.path = Path(pte)
        self._program = _bindings()._load_program(str(pte), data_path=None if ptd is None else str(ptd))
        self._methods: dict[str, Any] = {}

    def method(self, name: str):
        """The loaded method ``name`` (loaded once, kept: its memory holds a training step's state)."""
        if name not in self._methods:
            self._methods[name] = self._program.load_method(name)
        return self._methods[name]

    def run(self, method: str, *inputs: Any) -> list[Any]:
        """Run ``method`` on numpy arrays (or tensors); outputs as numpy arrays (copies)."""
        outputs = self.method(method).call([_to_tensor(x) for x in inputs])
        return [_to_numpy(o) for o in outputs]


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
    :meth:`state`, everything a ``.ptd`` holds (see ``aot.write_ptd``).
    """

    def __init__(
        self, pte: str | os.PathLike, ptd: str | os.PathLike, *, method: str = "forward", buffer_names: Sequence[str] = ()
    ) -> None:
        self.program = Program(pte, ptd)
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
        names = [str(n) for n in self._metadata(PARAMETER_NAMES + method)]
        n_out = self._method.method_meta().num_outputs()
        # parameters are the last len(names) outputs and gradients the len(names) before them,
        # whatever the metadata says (see fact 1 in the package docstring)
        grads_start, params_start = n_out - 2 * len(names), n_out - len(names)
        return TrainingLayout(
            parameter_names=names,
            num_user_outputs=grads_start,
            gradients_start=grads_start,
            parameters_start=params_start,
            recorded_gradients_start=int(self._metadata(GRADIENTS_INDEX + method)[0]),
            recorded_parameters_start=int(self._metadata(PARAMETERS_INDEX + method)[0]),
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

    def sgd(
        self,
        lr: float,
        *,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        decay: Collection[str] | None = None,
    ) -> SGD:
        """ExecuTorch's SGD over this session's parameters (PyTorch's ``torch.optim.SGD`` rule);
        weight decay applies to the parameters named in ``decay`` (None: all)."""
        return SGD(self, lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, decay=decay)

    def parameter_arrays(self) -> dict[str, np.ndarray]:
        """The live parameters as numpy arrays sharing the program's memory (an optimizer written
        in numpy updates them in place)."""
        return {name: t.detach().numpy() for name, t in self.named_parameters().items()}

    def gradient_arrays(self) -> dict[str, np.ndarray]:
        """The last step's gradients as numpy arrays (program memory, valid until the next step)."""
        return {name: t.detach().numpy() for name, t in self.named_gradients().items()}

    def state(self) -> dict[str, np.ndarray]:
        """Copies of the current parameters and running statistics, by name."""
        out = {name: _to_numpy(t) for name, t in self.named_parameters().items()}
        out.update(self.named_buffers())
        return out


class SGD:
    """ExecuTorch's C++ SGD (``get_sgd_optimizer``) bound to a :class:`TrainingSession`.

    Its momentum buffers live inside the C++ object, for this process only (the native runner
    saves its own beside the weights).
    """

    def __init__(
        self,
        session: TrainingSession,
        lr: float,
        *,
        momentum: float,
        dampening: float,
        weight_decay: float,
        nesterov: bool,
        decay: Collection[str] | None = None,
    ) -> None:
        try:
            from executorch.extension.training import get_sgd_optimizer
        except ImportError as exc:
            raise ExecutorchUnavailable(f"ExecuTorch's training extension is not importable: {exc}") from None
        self.session = session
        params = session.named_parameters()
        decayed = set(params) if decay is None else set(decay)
        # two of ExecuTorch's SGDs when only some parameters decay (it has no per-group settings)
        groups = [(sorted(decayed & set(params)), weight_decay), (sorted(set(params) - decayed), 0.0)]
        self._opts = [
            (names, get_sgd_optimizer({k: params[k] for k in names}, lr, momentum, dampening, wd, nesterov))
            for names, wd in groups
            if names
        ]

    def step(self) -> None:
        grads = self.session.named_gradients()
        for names, opt in self._opts:
            opt.step({k: grads[k] for k in names})


def profile_operators(
    pte: str | os.PathLike, ptd: str | os.PathLike | None, method: str, inputs: Sequence[Any], runs: int = 3
) -> dict[str, float]:
    """Milliseconds per operator kernel over ``runs`` executions of ``method`` (ETDump + Inspector),
    ATen's (``mm.out``) and custom operators' (``edgetl_export::pointwise_nhwc.out``)."""
    import collections

    from executorch.devtools import Inspector

    module = _bindings()._load_for_executorch(str(pte), data_path=None if ptd is None else str(ptd), enable_etdump=True)
    for _ in range(runs):
        module.run_method(method, [_to_tensor(x) for x in inputs], clone_outputs=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "run.etdp")
        module.write_etdump_result_to_file(path)
        inspector = Inspector(etdump_path=path)
    totals: dict[str, float] = collections.Counter()
    for block in inspector.event_blocks:
        for event in block.events:
            if event.perf_data is not None and (event.name.startswith("native_call_") or "::" in event.name):
                totals[event.name.removeprefix("native_call_")] += float(event.perf_data.avg)
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


# --- reading the external weights file (.ptd) ----------------------------------------------------


@dataclass(frozen=True)
class TensorSlot:
    """Where one named tensor's bytes are in a ``.ptd`` file."""

    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


def ptd_slots(data: bytes) -> dict[str, TensorSlot]:
    """Where each named tensor of a ``.ptd`` file is (needs the ExecuTorch package's serializer)."""
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorHeader, _deserialize_to_flat_tensor

    header = FlatTensorHeader.from_bytes(data[8:])
    if not header.is_valid():
        raise ValueError("not an ExecuTorch .ptd file")
    flat = _deserialize_to_flat_tensor(data[: header.flatbuffer_offset + header.flatbuffer_size])
    slots: dict[str, TensorSlot] = {}
    for named in flat.named_data:
        seg, tl = flat.segments[named.segment_index], named.tensor_layout
        dtype = SCALAR_TYPES.get(int(getattr(tl.scalar_type, "value", tl.scalar_type)))
        if dtype is None:
            raise ValueError(f"{named.key}: unsupported tensor dtype {tl.scalar_type} in the weights file")
        slots[named.key] = TensorSlot(header.segment_base_offset + seg.offset, seg.size, dtype, tuple(int(s) for s in tl.sizes))
    return slots


def read_ptd(data: bytes) -> dict[str, np.ndarray]:
    """Every named tensor of a ``.ptd`` file (copies)."""
    return {name: read_ptd_tensor(data, slot).copy() for name, slot in ptd_slots(data).items()}


def read_ptd_tensor(data: bytes, slot: TensorSlot) -> np.ndarray:
    """One tensor out of a ``.ptd`` file's bytes (a view of them)."""
    return np.frombuffer(data, dtype=slot.dtype, count=math.prod(slot.shape), offset=slot.offset).reshape(slot.shape)
