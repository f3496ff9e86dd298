"""The measured peak: resident set size of a fresh process running real training steps.

:func:`measure_process_peak` starts ``python -m edgetl.profiler._child`` (one process per
measurement: the peak RSS only grows within a process), which loads the model, prepares it and runs
real training steps (forward, backward, optimizer step), and reads back its RSS from the operating
system (``VmHWM`` on Linux, ``ru_maxrss`` on macOS). It includes everything the device really pays:
the interpreter, PyTorch's libraries, allocator retention and fragmentation. The child runs on the
``malloc`` named by ``allocator`` (:mod:`edgetl._allocator`; default ``glibc``, as ``edgetl
finetune``), so a measurement is of the process the trainer runs. The estimate it is
held against is :func:`edgetl.profiler.estimate.predict_step_peak`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetl._allocator import DEFAULT as DEFAULT_ALLOCATOR
from edgetl._allocator import resolve as resolve_allocator
from edgetl.errors import ConfigError, EdgetlError
from edgetl.profiler.estimate import predict_step_peak
from edgetl.profiler.settings import StepSettings
from edgetl.train.optim import check_optimizer
from edgetl.train.policy import TrainPolicy

#: the smallest configuration, run by :func:`calibrate_runtime`
CALIBRATION = {"model": "mobilenet_v3_small", "blocks": 1, "batch_size": 2, "image_size": 64, "num_classes": 10}


@dataclass(frozen=True)
class ProcessPeak:
    """Resident set sizes of a child process running real training steps (bytes, from the OS).

    * ``runtime_rss``: after importing Python, PyTorch, torchvision and edgetl (the baseline).
    * ``loaded_rss``: after loading the model, preparing it, creating the optimizer and one input
      batch, i.e. just before the first step.
    * ``warm_rss``: after that and a warm-up (a forward and backward of two images, nothing kept):
      the runtime has faulted in what every first step faults in, whatever the policy (kernel code
      pages, thread pools, oneDNN's primitives); ``loaded_peak_rss``: the peak up to then.
    * ``step_peak_rss``: the peak RSS during the steps. Where the kernel allows resetting the
      high-water mark (Linux ``/proc/self/clear_refs``, ``hwm_reset=True``) it is reset right
      before the steps, so this is the steps' own peak; otherwise it is the process's lifetime peak,
      an upper bound of it.
    * ``step_delta``: ``step_peak_rss - loaded_rss``, what the steps need on top of the loaded model.
    * ``warm_delta``: ``step_peak_rss - warm_rss``, what the steps' own tensors (and the allocator's
      keeping of them) need on top of a warmed runtime: the part a policy can change, held against
      the predicted live peak less the weights and input batch already loaded.
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
    step_seconds: float = 0.0  # median wall time of the steps after the first (the first allocates state)
    warm_rss: int = 0
    allocator: str = DEFAULT_ALLOCATOR  # the malloc the child ran on (edgetl._allocator.active)

    @property
    def warm_delta(self) -> int:
        return self.step_peak_rss - self.warm_rss

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

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "step_delta": self.step_delta,
            "warm_delta": self.warm_delta,
            "peak_rss": self.peak_rss,
            "model_delta": self.model_delta,
        }


def _child_env(allocator: str = DEFAULT_ALLOCATOR) -> dict[str, str]:
    env = resolve_allocator(allocator).env()  # OMP_NUM_THREADS passes through only if the parent set it
    root = str(Path(__file__).resolve().parents[2])  # so the child imports this very edgetl
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def measure_process_peak(
    model: str | nn.Module,
    policy: TrainPolicy,
    *,
    batch_size: int,
    image_size: int,
    num_classes: int = StepSettings.num_classes,
    optimizer: str = StepSettings.optimizer,
    steps: int = 2,
    timeout: float = 600.0,
    allocator: str = DEFAULT_ALLOCATOR,
) -> ProcessPeak:
    """Run ``steps`` real training steps in a fresh Python process and report its RSS.

    ``model`` is a name for :func:`edgetl.load_model` (random weights) or a module of one of its
    architectures (its state dict goes to the child through a temporary file, read with
    ``weights_only=True``; the module's own classifier sets the classes). The default
    ``steps=2``: the first step allocates the gradients and the optimizer state; the second is the
    steady state, whose forward runs with them alive. ``allocator``: the child's ``malloc``
    (:data:`edgetl._allocator.ALLOCATORS`).

    Raises:
        ConfigError: an unknown optimizer or allocator, jemalloc asked for where it is not
            installed, ``steps < 1``, or a module without a classifier.
        EdgetlError: a module of none of the zoo's architectures; the child process failed or timed out.
    """
    check_optimizer(optimizer)
    resolve_allocator(allocator)  # refused before any work
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    with tempfile.TemporaryDirectory(prefix="edgetl-peak-") as tmp:
        if isinstance(model, nn.Module):
            from edgetl.models.zoo import classifier_linear, model_name

            try:
                num_classes = classifier_linear(model)[2].out_features
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            path = str(Path(tmp) / "model.pt")
            torch.save(model.state_dict(), path)
            source = ["--model", model_name(model), "--weights", path]
        else:
            source = ["--model", model]
        values = run_child(
            source, policy, batch_size=batch_size, image_size=image_size, num_classes=num_classes, optimizer=optimizer,
            extra=["--steps", str(steps)], timeout=timeout, allocator=allocator,
        )  # fmt: skip
    return ProcessPeak(**values)


def run_child(
    source: list[str],
    policy: TrainPolicy,
    *,
    batch_size: int,
    image_size: int,
    num_classes: int,
    optimizer: str,
    extra: list[str],
    timeout: float,
    allocator: str = DEFAULT_ALLOCATOR,
) -> dict[str, Any]:
    """Run ``python -m edgetl.profiler._child`` (``source``: ``--model NAME [--weights PATH]``;
    ``extra``: its mode's flags) and return the JSON object it prints last."""
    cmd = [sys.executable, "-m", "edgetl.profiler._child", *source, "--policy", json.dumps(policy.to_dict())]
    cmd += ["--batch-size", str(batch_size), "--image-size", str(image_size), "--num-classes", str(num_classes)]
    cmd += ["--optimizer", optimizer, *extra]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(allocator), timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise EdgetlError(f"the training-step child process did not finish within {timeout:.0f}s") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise EdgetlError(f"the training-step child process failed (exit {done.returncode}):\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def calibrate_runtime(*, timeout: float = 600.0, allocator: str = DEFAULT_ALLOCATOR) -> int:
    """Measure this platform's runtime overhead: the ``runtime_overhead`` of a device profile.

    Runs the smallest configuration (:data:`CALIBRATION`) in a child process and returns its peak
    RSS minus the predicted model bytes, i.e. the interpreter, the framework's libraries and what
    the first training step faults in. Run it on the device itself, on the ``allocator`` the
    training will run on (the planner's prediction is this overhead plus live bytes, which do not
    depend on the allocator; how closely the process follows them does).
    """
    from edgetl.models.zoo import load_model

    c = CALIBRATION
    policy = TrainPolicy(c["blocks"], "mobiletl")
    measured = measure_process_peak(
        c["model"],
        policy,
        batch_size=c["batch_size"],
        image_size=c["image_size"],
        num_classes=c["num_classes"],
        timeout=timeout,
        allocator=allocator,
    )
    estimate = predict_step_peak(
        load_model(c["model"], num_classes=c["num_classes"]), policy, batch_size=c["batch_size"], image_size=c["image_size"]
    )
    return measured.peak_rss - estimate.model_bytes
