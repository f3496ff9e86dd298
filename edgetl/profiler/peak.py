"""Whole training-step memory: a predicted peak (pure functions) and a measured one (a child process).

Two figures, never to be confused:

* :func:`predict_step_peak` - an **estimate** of the peak bytes of one steady-state training step,
  computed from shapes and the policy alone (formula in its docstring). The planner uses it.
* :func:`measure_process_peak` - the **measured** peak resident set size (OS, ``VmHWM`` on Linux,
  ``ru_maxrss`` on macOS) of a fresh Python process that loads the model, prepares it and runs
  real training steps (forward, backward, optimizer step). It includes everything the device
  really pays: the interpreter, PyTorch's libraries, allocator retention and fragmentation.

The child's entry point is ``_child`` (arguments ``--model NAME --blocks K --method M ...``; it
prints one JSON object on stdout). The parent starts it with ``python -c`` rather than ``-m``
because ``import edgetl`` already imports this module, which ``-m`` would then run a second time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from edgetl.errors import EdgetlError
from edgetl.models.blocks import LayerSpec, block_spec, feature_units, is_irb, layer_specs
from edgetl.profiler.analytic import FLOAT_BYTES, Shape, conv_output_shape
from edgetl.profiler.measure import HEAD
from edgetl.profiler.predict import UnitPrediction, predict_units
from edgetl.train.policy import TrainPolicy

#: fp32 optimizer-state tensors kept per trained parameter
OPTIMIZER_STATE_FLOATS: dict[str, int] = {
    "adam": 2,  # exp_avg, exp_avg_sq
    "adamw": 2,
    "sgd": 1,  # momentum buffer (SGD with momentum, as edgetl's trainer runs it)
    "sgd_nomomentum": 0,
}
#: the backward of a layer holds about as much again as its forward (dy, dx, kernel temporaries)
BACKWARD_FACTOR = 2
#: weights are resident twice after loading: prepare() deep-copies the loaded network, and the
#: allocator keeps most of the freed original (measured: RSS after load - baseline ~ 2.5-3 x W)
LOAD_FACTOR = 2
#: heap fragmentation over live activation bytes; measured up to +29% for MobileTL under glibc's
#: dynamic mmap threshold (its shift-only norms and masked activations free full-size
#: temporaries between tensors that stay saved), a few % for vanilla
ALLOCATOR_SLACK = 1.25
#: the smallest configuration, run by :func:`calibrate_runtime`
CALIBRATION = {"model": "mobilenet_v3_small", "blocks": 1, "batch_size": 2, "image_size": 64, "num_classes": 10}


def _numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def check_optimizer(optimizer: str) -> None:
    if optimizer not in OPTIMIZER_STATE_FLOATS:
        raise EdgetlError(f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZER_STATE_FLOATS)}")


# --- parameters, as a function of structure and policy ---------------------------------------------


@dataclass(frozen=True)
class ParamBytes:
    """Bytes of a prepared network's tensors that are not activations."""

    weights: int  # every parameter and buffer, frozen or not (all resident in fp32)
    trainable: int  # parameters that train; their gradients take as much again
    trainable_count: int  # number of trainable scalars


def unit_layers(name: str, unit: nn.Module) -> list[LayerSpec]:
    """A unit's layers as :func:`~edgetl.profiler.predict.predict_units` reads them."""
    return list(block_spec(name, unit).layers) if is_irb(unit) else layer_specs(unit)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def unit_param_bytes(unit: nn.Module, *, trains: bool, mobiletl: bool) -> tuple[int, int, int]:
    """(all weight bytes, trainable bytes, trainable count) of one unit of the *original* model.

    MobileTL (:func:`edgetl.train.prepare.apply_mobiletl`) turns every norm of an IRB but the last
    into a shift-only norm: its scale stops training and two derived per-channel buffers appear.
    """
    weights = _tensor_bytes(unit.parameters()) + _tensor_bytes(unit.buffers())
    if not trains:
        return weights, 0, 0
    params = list(unit.parameters())
    trainable, count = _tensor_bytes(params), sum(p.numel() for p in params)
    if mobiletl and is_irb(unit):
        norms = [m for m in unit.modules() if isinstance(m, nn.BatchNorm2d)][:-1]
        for bn in norms:
            c = bn.num_features
            weights += 2 * c * FLOAT_BYTES  # ShiftOnlyNorm.scale, .offset
            if bn.weight is not None:
                trainable -= bn.weight.numel() * bn.weight.element_size()
                count -= bn.weight.numel()
    return weights, trainable, count


def param_bytes(model: nn.Module, policy: TrainPolicy, rows: Sequence[UnitPrediction] | None = None) -> ParamBytes:
    """Parameter bytes of ``model`` (original torchvision layout) once prepared under ``policy``."""
    rows = rows if rows is not None else predict_units(model, policy, batch_size=1, image_size=32)
    role = {r.name: r.role for r in rows}
    weights = trainable = count = 0
    for name, unit in feature_units(model):
        w, t, c = unit_param_bytes(unit, trains=role[name] != "frozen", mobiletl=policy.method == "mobiletl")
        weights, trainable, count = weights + w, trainable + t, count + c
    w, t, c = unit_param_bytes(model.classifier, trains=True, mobiletl=False)
    return ParamBytes(weights + w, trainable + t, count + c)


# --- working sets -------------------------------------------------------------------------------------


def layer_working_set(layers: Sequence[LayerSpec], in_shape: Shape, *, residual: bool = False) -> int:
    """Largest ``input + output`` bytes of any one layer of a unit (fp32).

    With ``residual`` the unit's input stays live until the addition, so it is added on top.
    """
    shape, largest = tuple(in_shape), 0
    for layer in layers:
        if layer.op == "conv":
            out = conv_output_shape(layer, shape)
        elif layer.op == "linear":
            out = shape[:-1] + (layer.out_channels,)
        elif layer.op == "pad":
            left, right, top, bottom = layer.padding
            out = shape[:2] + (shape[2] + top + bottom, shape[3] + left + right)
        elif layer.op == "pool":
            out = shape[:2]
        else:
            out = shape
        largest = max(largest, (_numel(shape) + _numel(out)) * FLOAT_BYTES)
        shape = out
    return largest + (_numel(in_shape) * FLOAT_BYTES if residual else 0)


@dataclass(frozen=True)
class StepPeakEstimate:
    """Predicted peak bytes of one steady-state training step, by component. An estimate.

    See :func:`predict_step_peak` for the formula. ``model_bytes`` is what the model and its
    training add to a process; ``total`` adds ``runtime`` (the interpreter and framework baseline,
    supplied by the caller: it is a property of the runtime and platform, not of shapes).
    """

    weights: int
    gradients: int
    optimizer_state: int
    input_batch: int
    saved_activations: int
    transient_frozen: int
    transient_trained: int
    runtime: int = 0
    optimizer: str = "adam"

    @property
    def activations(self) -> int:
        """The activation term: ``T_frozen + ALLOCATOR_SLACK * (S + T_trained)``."""
        return self.transient_frozen + int(ALLOCATOR_SLACK * (self.saved_activations + self.transient_trained))

    @property
    def model_bytes(self) -> int:
        return LOAD_FACTOR * self.weights + self.gradients + self.optimizer_state + self.input_batch + self.activations

    @property
    def total(self) -> int:
        return self.runtime + self.model_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "activations": self.activations, "model_bytes": self.model_bytes, "total": self.total}

    def summary(self, size) -> str:
        """One line for the planner (``size`` formats bytes)."""
        return (
            f"saved activations {size(self.saved_activations)}, weights+grads+{self.optimizer} state "
            f"{size(self.weights + self.gradients + self.optimizer_state)}"
        )


def predict_step_peak(
    model: nn.Module,
    policy: TrainPolicy,
    *,
    batch_size: int,
    image_size: int,
    optimizer: str = "adam",
    runtime_bytes: int = 0,
    rows: Sequence[UnitPrediction] | None = None,
) -> StepPeakEstimate:
    """Estimate the peak resident memory of a steady-state training step of ``model`` under ``policy``.

    A pure function of the structure (shapes, which parameters train) and the policy; nothing
    runs. The formula, all tensors fp32::

        peak = runtime + 2 W + G + O + X + T_frozen + 1.25 (S + 2 T_trained)

    * ``W``: every parameter and buffer of the prepared network (frozen ones are resident too),
      counted :data:`LOAD_FACTOR` = 2 times: ``prepare`` deep-copies the loaded network and the
      allocator keeps most of the freed original.
    * ``G``: gradients of the trained parameters (as many bytes as those parameters). They are
      alive during the next step's forward (the trainer zeroes them just before backward).
    * ``O``: optimizer state, :data:`OPTIMIZER_STATE_FLOATS` per trained parameter (Adam: 2,
      SGD with momentum: 1); Adam's per-tensor step counters are ignored (a few bytes each).
    * ``X``: the input batch (N x 3 x S x S floats) and its int64 labels.
    * ``S``: bytes saved for backward (:func:`edgetl.profiler.predict.predict_units`, exact
      against autograd). All of it is alive at the end of the forward pass.
    * ``T_frozen``: the frozen bottom's working set, the largest input + output of one layer
      (plus a residual block's input). Added, not maxed with the rest: the allocator keeps those
      freed pages and they are not all reused by the trained part.
    * ``T_trained``: the same for the trained part, doubled (:data:`BACKWARD_FACTOR`): a layer's
      backward holds the incoming gradient, the outgoing one and kernel temporaries next to what is
      still saved.
    * ``1.25`` (:data:`ALLOCATOR_SLACK`): heap fragmentation over the live trained-part bytes.
    * ``runtime``: the interpreter + framework baseline, which shapes cannot tell (pass it in: a
      device profile's ``runtime_overhead``, or :func:`calibrate_runtime` on the device).

    Why it is an estimate: ``2 W``, ``T_frozen`` and ``1.25`` stand for allocator behaviour
    (glibc malloc keeps freed memory and fragments), calibrated against child-process peak RSS on
    x86-64 Linux (glibc, torch 2.13 CPU; 20 configurations of MobileNetV2/V3 and EfficientNet-B0,
    K 1-17, batch 2-64, 64-224 px): measured/predicted total was 0.85-1.12. Kernel scratch
    buffers (oneDNN) and autograd's graph nodes are not modelled. Summing ``G + O`` with the
    activations is conservative for the very first step (nothing of them exists yet).
    """
    check_optimizer(optimizer)
    if batch_size < 1 or image_size < 8:
        raise EdgetlError(f"batch size must be >= 1 and image size >= 8, got {batch_size} and {image_size}")
    rows = list(rows) if rows is not None else predict_units(model, policy, batch_size=batch_size, image_size=image_size)
    params = param_bytes(model, policy, rows)
    units = dict(feature_units(model))
    frozen = trained = 0
    for row in rows:
        if row.name == HEAD:
            layers = layer_specs(nn.Sequential(nn.AdaptiveAvgPool2d(1), model.classifier))
            residual = False
        else:
            unit = units[row.name]
            layers = unit_layers(row.name, unit)
            residual = bool(getattr(unit, "use_res_connect", False))
        ws = layer_working_set(layers, row.in_shape, residual=residual)
        if row.role == "frozen":
            frozen = max(frozen, ws)
        else:
            trained = max(trained, ws)
    return StepPeakEstimate(
        weights=params.weights,
        gradients=params.trainable,
        optimizer_state=OPTIMIZER_STATE_FLOATS[optimizer] * params.trainable,
        input_batch=batch_size * 3 * image_size * image_size * FLOAT_BYTES + batch_size * 8,
        saved_activations=sum(r.nbytes for r in rows),
        transient_frozen=frozen,
        transient_trained=BACKWARD_FACTOR * trained,
        runtime=runtime_bytes,
        optimizer=optimizer,
    )


def trainable_shapes_problem(rows: Sequence[UnitPrediction]) -> str | None:
    """Why a configuration cannot train, or None.

    A train-mode batch norm needs more than one value per channel: batch x H x W > 1 at every
    trained unit's output (the smallest map the unit's last norm sees).
    """
    for row in rows:
        if row.role in ("block", "stage") and len(row.out_shape) == 4:
            n, _, h, w = row.out_shape
            if n * h * w <= 1:
                return (
                    f"{row.name} trains a batch norm on a {n}x{h}x{w} map (batch x height x width), which has one value "
                    "per channel; use a batch size of at least 2 or a larger image size"
                )
    return None


# --- the measured peak: a fresh child process ------------------------------------------------------


@dataclass(frozen=True)
class ProcessPeak:
    """Resident set sizes of a child process running real training steps (bytes, from the OS).

    * ``runtime_rss``: after importing Python, PyTorch, torchvision and edgetl (the baseline).
    * ``loaded_rss``: after loading the model, preparing it, creating the optimizer and one input
      batch, i.e. just before the first step; ``loaded_peak_rss``: the peak up to then.
    * ``step_peak_rss``: the peak RSS during the steps. Where the kernel allows resetting the
      high-water mark (Linux ``/proc/self/clear_refs``, ``hwm_reset=True``) it is reset right
      before the steps, so this is the steps' own peak; otherwise it is the process's lifetime peak,
      an upper bound of it.
    * ``step_delta``: ``step_peak_rss - loaded_rss``, what the steps need on top of the loaded model.
    * ``peak_rss``: the process's lifetime peak, ``max(loaded_peak_rss, step_peak_rss)``: what the
      device must have.
    """

    method: str
    runtime_rss: int
    loaded_rss: int
    loaded_peak_rss: int
    step_peak_rss: int
    hwm_reset: bool
    steps: int
    optimizer: str
    torch_version: str
    platform: str

    @property
    def step_delta(self) -> int:
        return self.step_peak_rss - self.loaded_rss

    @property
    def peak_rss(self) -> int:
        return max(self.loaded_peak_rss, self.step_peak_rss)

    @property
    def model_delta(self) -> int:
        """Peak over the runtime baseline: what the model and its training add to the process."""
        return self.peak_rss - self.runtime_rss

    def to_dict(self) -> dict:
        return {**asdict(self), "step_delta": self.step_delta, "peak_rss": self.peak_rss, "model_delta": self.model_delta}


def _child_env() -> dict[str, str]:
    env = dict(os.environ)  # OMP_NUM_THREADS passes through only if the parent set it
    root = str(Path(__file__).resolve().parents[2])  # so the child imports this very edgetl
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def measure_process_peak(
    model: str | nn.Module,
    policy: TrainPolicy,
    *,
    batch_size: int,
    image_size: int,
    num_classes: int = 1000,
    optimizer: str = "adam",
    steps: int = 2,
    timeout: float = 600.0,
) -> ProcessPeak:
    """Run ``steps`` real training steps in a fresh Python process and report its RSS.

    ``model`` is a name for :func:`edgetl.load_model` (random weights) or a module of one of its
    architectures (its state dict goes to the child through a temporary file, read with
    ``weights_only=True``). The default ``steps=2``: the first step allocates the
    gradients and the optimizer state; the second is the steady state, whose forward runs with
    them alive. A fresh process per call because the peak RSS only grows within a process.
    """
    check_optimizer(optimizer)
    if steps < 1:
        raise EdgetlError(f"steps must be >= 1, got {steps}")
    with tempfile.TemporaryDirectory(prefix="edgetl-peak-") as tmp:
        if isinstance(model, nn.Module):
            import torch

            from edgetl.models.zoo import classifier_linear, identify_model

            path = str(Path(tmp) / "model.pt")
            torch.save(model.state_dict(), path)
            num_classes = classifier_linear(model)[2].out_features  # the module's own head
            source = ["--model", identify_model(model), "--weights", path]
        else:
            source = ["--model", model]
        cmd = [
            sys.executable, "-c", "import sys; from edgetl.profiler.peak import _child; sys.exit(_child(sys.argv[1:]))",
            *source, "--blocks", str(policy.blocks), "--method", policy.method,
            "--activation-grad", policy.activation_grad, "--activation-mask", policy.activation_mask,
            "--batch-size", str(batch_size), "--image-size", str(image_size), "--num-classes", str(num_classes),
            "--optimizer", optimizer, "--steps", str(steps),
        ]  # fmt: skip
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise EdgetlError(f"the training-step child process did not finish within {timeout:.0f}s") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise EdgetlError(f"the training-step child process failed (exit {done.returncode}):\n{tail}")
    values = json.loads(done.stdout.strip().splitlines()[-1])
    return ProcessPeak(**values)


def calibrate_runtime(*, timeout: float = 600.0) -> int:
    """Measure this platform's runtime overhead: the ``runtime_overhead`` of a device profile.

    Runs the smallest configuration (:data:`CALIBRATION`) in a child process and returns its peak
    RSS minus the predicted model bytes, i.e. the interpreter, the framework's libraries and what
    the first training step faults in. Run it on the device itself.
    """
    from edgetl.models.zoo import load_model

    c = CALIBRATION
    policy = TrainPolicy(c["blocks"], "mobiletl")
    measured = measure_process_peak(
        c["model"], policy, batch_size=c["batch_size"], image_size=c["image_size"], num_classes=c["num_classes"], timeout=timeout
    )
    estimate = predict_step_peak(
        load_model(c["model"], num_classes=c["num_classes"]), policy, batch_size=c["batch_size"], image_size=c["image_size"]
    )
    return measured.peak_rss - estimate.model_bytes


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgetl.profiler.peak", description="one training step, RSS as JSON")
    p.add_argument("--model", required=True, help="model name for edgetl.load_model")
    p.add_argument("--weights", help="state-dict file (default: random weights; memory does not depend on them)")
    p.add_argument("--blocks", type=int, required=True)
    p.add_argument("--method", default="mobiletl")
    p.add_argument("--activation-grad", default="sign")
    p.add_argument("--activation-mask", default="reuse")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args(argv)

    import gc
    import platform

    import torch

    import edgetl  # noqa: F401  (the runtime's baseline includes the package)
    from edgetl._rss import current_rss_bytes, peak_rss_bytes
    from edgetl.models.zoo import classifier_linear, load_model
    from edgetl.train.prepare import prepare

    runtime_rss = current_rss_bytes()
    policy = TrainPolicy(args.blocks, args.method, args.activation_grad, args.activation_mask)
    torch.manual_seed(0)
    original = load_model(args.model, weights=args.weights, num_classes=args.num_classes)
    net = prepare(original, policy)
    del original  # prepare deep-copies; the device would not keep the unprepared model
    params = [p for _, p in net.trainable_parameters()]
    if args.optimizer in ("adam", "adamw"):
        opt = (torch.optim.Adam if args.optimizer == "adam" else torch.optim.AdamW)(params, lr=1e-4)
    else:
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9 if args.optimizer == "sgd" else 0.0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    classes = classifier_linear(net)[2].out_features  # a saved module keeps its own head
    y = torch.randint(0, classes, (args.batch_size,))
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    gc.collect()
    loaded_rss, loaded_peak = current_rss_bytes(), peak_rss_bytes()
    reset = _reset_peak()
    for _ in range(args.steps):  # the trainer's order: forward, zero_grad, backward, step
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        del loss
    peak = peak_rss_bytes()
    result = ProcessPeak(
        method=args.method,
        runtime_rss=runtime_rss,
        loaded_rss=loaded_rss,
        loaded_peak_rss=loaded_peak,
        step_peak_rss=peak,
        hwm_reset=reset,
        steps=args.steps,
        optimizer=args.optimizer,
        torch_version=torch.__version__,
        platform=f"{platform.system()} {platform.machine()}",
    )
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(_child())
