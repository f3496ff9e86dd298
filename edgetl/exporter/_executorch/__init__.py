"""The one place that touches ExecuTorch's experimental and private APIs (written against 1.5.x).

No other edgetl module imports ``executorch``, ``torchao`` or ``torch.export.experimental``: a new ExecuTorch
release should need a change here and nowhere else. Two halves:

* :mod:`.aot` - **ahead of time** (the workstation): lowering to XNNPACK,
  PT2E int8 quantization (torchao's ``prepare_pt2e``/``convert_pt2e`` with ExecuTorch's
  ``XNNPACKQuantizer``), ``torch.export.experimental._export_forward_backward``, emitting the training program with its
  external weights and corrected training metadata, and writing ``.ptd`` files;
* :mod:`.runtime` - **runtime** (the workstation's verification of what it exports): version
  checks, loading programs through the Python bindings, running methods on numpy arrays, the
  training session and ExecuTorch's SGD, edgetl's native kernel library, reading ``.ptd`` files.

Facts this package works around (verified on ExecuTorch 1.5.1 / torch 2.13):

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

from edgetl.exporter._executorch.aot import (
    INT8_SCHEME,
    LoweredProgram,
    MissingKernelError,
    TrainingProgram,
    capture,
    convert_int8,
    emit_training_program,
    export_forward_backward,
    lower_to_xnnpack,
    portable_program,
    prepare_int8,
    prepare_int8_qat,
    qat_mode,
    quantizable_layers,
    quantize_int8,
    training_metadata,
    unshare_ptd,
    write_ptd,
)
from edgetl.exporter._executorch.runtime import (
    SGD,
    SUPPORTED_SERIES,
    ExecutorchUnavailable,
    Program,
    TensorSlot,
    TrainingLayout,
    TrainingSession,
    executorch_version,
    load_native_kernels,
    profile_operators,
    ptd_slots,
    read_ptd,
    read_ptd_tensor,
    registered_operators,
    require_executorch,
    set_threads,
)

__all__ = [
    "INT8_SCHEME",
    "SGD",
    "SUPPORTED_SERIES",
    "ExecutorchUnavailable",
    "LoweredProgram",
    "MissingKernelError",
    "Program",
    "TensorSlot",
    "TrainingLayout",
    "TrainingProgram",
    "TrainingSession",
    "emit_training_program",
    "executorch_version",
    "export_forward_backward",
    "load_native_kernels",
    "lower_to_xnnpack",
    "capture",
    "convert_int8",
    "portable_program",
    "prepare_int8",
    "prepare_int8_qat",
    "qat_mode",
    "quantizable_layers",
    "quantize_int8",
    "profile_operators",
    "ptd_slots",
    "read_ptd",
    "read_ptd_tensor",
    "registered_operators",
    "require_executorch",
    "set_threads",
    "training_metadata",
    "unshare_ptd",
    "write_ptd",
]
