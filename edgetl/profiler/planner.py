"""The planner: the largest K, then the largest batch size, then the fastest memory options, whose
predicted peak fits a device.

Every candidate ``(K, batch size)`` is scored against the device's usable memory,
``memory_budget x (1 - safety_margin)``, for one of two runtimes:

* ``eager`` (PyTorch on the device): :func:`edgetl.profiler.estimate.predict_step_peak` (an estimate,
  pure functions of shapes) plus the device profile's runtime overhead. Nothing is run. Each
  ``(K, batch)`` is tried with the policy's memory options beyond MobileTL (``bottom_chunk``,
  ``saved_precision``, ``recompute``), cheapest first by :data:`TIME_COST`; the first that fits is
  that candidate's answer.
* ``native`` (``deploy/native``'s ``edgetl-device``): :func:`edgetl.profiler.native.predict_native_peak`
  over the training program's memory plan, which only ExecuTorch's memory planner knows: the
  caller passes ``program_memory(policy, batch_size)`` (the CLI passes the exporter's, which emits
  the program without verifying it). It is called at two batch sizes per K and the arena is taken
  as linear in the batch between and beyond them (activations scale with it, weights and
  gradients do not; tests hold the extrapolation against an emitted program).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from edgetl._format import format_size
from edgetl.errors import ConfigError, EdgetlError
from edgetl.models.blocks import find_blocks
from edgetl.profiler.device import DeviceProfile, load_device
from edgetl.profiler.estimate import StepPeakEstimate, predict_step_peak, trainable_shapes_problem
from edgetl.profiler.native import NativePeakEstimate, ProgramMemory, predict_native_peak
from edgetl.profiler.predict import predict_units
from edgetl.profiler.settings import StepSettings
from edgetl.profiler.step_time import StepTimeEstimate, predict_native_step_time, step_work
from edgetl.train.optim import DEVICE_OPTIMIZERS, check_optimizer, state_floats
from edgetl.train.policy import METHODS, TrainPolicy

DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
RUNTIMES = ("eager", "native")
#: the native runtime's default optimizer (SGD with momentum; edgetl-device also runs AdamW)
NATIVE_OPTIMIZER = "sgd"
#: the batch sizes at which the native runtime's program memory is emitted (then extrapolated)
NATIVE_ANCHORS = (2, 4)
#: step time of each memory option relative to the step without it (multiplied when combined),
#: measured side by side with benchmarks/train_step.py (MobileNetV3-Large K=5, batch 8, 224 px,
#: x86-64, 1 thread): recompute runs the trained blocks' forward twice; the bottom in micro-batches
#: of BOTTOM_CHUNK images pays per-call overhead; compressing saved inputs costs a cast each way
TIME_COST: dict[str, float] = {"recompute": 1.23, "bottom_chunk": 1.03, "bf16": 1.02, "int8": 1.05}
#: the micro-batch the planner tries for the frozen bottom
BOTTOM_CHUNK = 2


@dataclass(frozen=True)
class Candidate:
    """One configuration and its predicted peak (runtime included) against the usable memory."""

    blocks: int
    batch_size: int
    estimate: StepPeakEstimate | NativePeakEstimate
    usable: int
    policy: TrainPolicy | None = None  # with the memory options chosen (eager runtime)
    #: predicted seconds of a native step (the device profile's rates; None without them)
    step_time: StepTimeEstimate | None = None

    @property
    def time_cost(self) -> float:
        """Predicted step time relative to the same K and batch without memory options."""
        return option_time_cost(self.policy) if self.policy is not None else 1.0

    @property
    def options(self) -> str:
        """The memory options in use, for people."""
        p = self.policy
        if p is None:
            return ""
        parts = [f"bottom_chunk={p.bottom_chunk}"] if p.bottom_chunk else []
        parts += [f"saved_precision={p.saved_precision}"] if p.saved_precision != "fp32" else []
        parts += ["recompute"] if p.recompute else []
        return ", ".join(parts) or "no options"

    @property
    def peak(self) -> int:
        return self.estimate.total

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable

    @property
    def headroom(self) -> int:
        """Usable bytes left (negative: over budget)."""
        return self.usable - self.peak

    def to_dict(self) -> dict:
        return {
            "blocks": self.blocks,
            "batch_size": self.batch_size,
            "predicted_peak": self.peak,
            "usable": self.usable,
            "headroom": self.headroom,
            "fits": self.fits,
            "policy": self.policy.to_dict() if self.policy else None,
            "time_cost": self.time_cost,
            "step_time": self.step_time.to_dict() if self.step_time else None,
            "estimate": self.estimate.to_dict(),
        }


def option_time_cost(policy: TrainPolicy) -> float:
    """Predicted step time of ``policy``'s memory options relative to none (:data:`TIME_COST`)."""
    cost = TIME_COST["recompute"] if policy.recompute else 1.0
    cost *= TIME_COST["bottom_chunk"] if policy.bottom_chunk else 1.0
    return cost * TIME_COST.get(policy.saved_precision, 1.0)


def option_policies(blocks: int, method: str, activation_mask: str, batch_size: int, precisions: Sequence[str]) -> list[TrainPolicy]:
    """Every combination of the memory options for one ``(K, batch)``, cheapest first."""
    chunks = [None, BOTTOM_CHUNK] if batch_size > BOTTOM_CHUNK else [None]
    combos = [
        TrainPolicy(blocks, method, activation_mask=activation_mask, bottom_chunk=c, saved_precision=p, recompute=r)
        for c in chunks
        for p in precisions
        for r in (False, True)
    ]
    return sorted(combos, key=option_time_cost)


@dataclass(frozen=True)
class Plan:
    """The planner's answer: the chosen configuration, the next-best ones, and the nearest misses.

    ``runner_ups``: the chosen K at the next smaller batch size, then each smaller K at its largest
    fitting batch size. ``over_budget``: the configurations just beyond the chosen one (the next
    larger batch size at the chosen K, and K + 1 at the smallest batch size), which do not fit.
    """

    device: DeviceProfile
    model: str
    image_size: int
    method: str
    optimizer: str
    num_blocks: int
    chosen: Candidate
    runner_ups: tuple[Candidate, ...]
    over_budget: tuple[Candidate, ...]
    runtime: str = "eager"
    #: native runtime: the chosen configuration's training program was exported and verified
    verified: bool = False

    def policy(self) -> TrainPolicy:
        """The chosen configuration's policy, memory options included."""
        return self.chosen.policy or TrainPolicy(self.chosen.blocks, self.method)

    def to_dict(self) -> dict:
        return {
            "device": self.device.to_dict(),
            "model": self.model,
            "image_size": self.image_size,
            "method": self.method,
            "optimizer": self.optimizer,
            "runtime": self.runtime,
            "num_blocks": self.num_blocks,
            "chosen": self.chosen.to_dict(),
            "runner_ups": [c.to_dict() for c in self.runner_ups],
            "over_budget": [c.to_dict() for c in self.over_budget],
            "verified": self.verified,
        }

    def render(self) -> str:
        d = self.device
        pct = 100 * d.safety_margin

        def line(c: Candidate) -> str:
            share = 100 * c.peak / c.usable if c.usable > 0 else float("inf")
            options = f"; {c.options}, time x{c.time_cost:.2f}" if c.policy is not None else ""
            options += f"; step {1000 * c.step_time.total:.0f} ms" if c.step_time else ""
            return (
                f"K={c.blocks:<2d} batch {c.batch_size:<3d} predicted peak {format_size(c.peak):>10s} "
                f"({share:5.1f}% of usable; {c.estimate.summary(format_size)}{options})"
            )

        overhead = d.runtime_overhead if self.runtime == "eager" else self.chosen.estimate.runtime

        out = [
            f"edgetl plan: {self.model} at {self.image_size} px, {self.method}, optimizer {self.optimizer}, "
            f"{self.runtime} runtime, on {d.name} ({d.path})",
            f"  memory budget {format_size(d.memory_budget)} of {format_size(d.memory_total)}, safety margin {pct:.0f}% "
            f"-> usable {format_size(d.usable_bytes)}; runtime overhead {format_size(overhead)} included",
            f"  chosen:      {line(self.chosen)}",
        ]
        for i, c in enumerate(self.runner_ups):
            out.append(f"  {'runner-ups:' if i == 0 else '':12s} {line(c)}")
        for i, c in enumerate(self.over_budget):
            out.append(f"  {'over budget:' if i == 0 else '':12s} {line(c)}, {format_size(-c.headroom)} too much")
        if self.runtime == "eager":
            out.append(
                "  Predicted peaks are estimates (edgetl.profiler.estimate.predict_step_peak), not measurements; "
                "check on the device with `edgetl profile ... --process`."
            )
        else:
            if self.verified:
                out.append("  The chosen configuration's training program was exported and verified against eager PyTorch.")
            out.append(
                "  Predicted peaks of edgetl-device finetune (edgetl.profiler.native): runtime + cached features + weights "
                "file + the program's planned arena + the optimizer's state (SGD's momentum, AdamW's two moments); "
                "check on the device with `edgetl-device --verbose finetune`."
            )
            out.append(
                "  Step times (edgetl.profiler.step_time) from the profile's gemm_gflops and memory_gbps."
                if d.gemm_gflops and d.memory_gbps
                else "  No step times: the device profile has no gemm_gflops / memory_gbps (measure them with edgetl-gemm-bench)."
            )
        return "\n".join(out)

    def __str__(self) -> str:
        return self.render()


def plan(
    device: DeviceProfile | str | os.PathLike,
    model: str | nn.Module,
    *,
    image_size: int = StepSettings.image_size,
    method: str = "mobiletl",
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    num_classes: int = StepSettings.num_classes,
    optimizer: str | None = None,
    runner_ups: int = 4,
    min_blocks: int = 1,
    max_blocks: int | None = None,
    activation_mask: str = "reuse",
    runtime: str = "eager",
    program_memory: Callable[[TrainPolicy, int], ProgramMemory] | None = None,
    verify_program: Callable[[TrainPolicy, int], object] | None = None,
    images: int = 1000,
    precisions: Sequence[str] = ("fp32",),
    memory_options: bool = True,
) -> Plan:
    """Choose the largest K, then the largest batch size, whose predicted peak fits ``device``.

    Args:
        device: a :class:`DeviceProfile` or the path of its TOML file.
        model: a name for :func:`edgetl.load_model` (structure only, random weights) or the
            original torchvision-layout module.
        image_size: training resolution.
        method: ``"mobiletl"`` or ``"vanilla"``.
        batch_sizes: the candidate batch sizes.
        num_classes: classifier outputs (it sizes the head's parameters and optimizer state).
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (with momentum); the native runtime runs
            ``"sgd"`` and ``"adamw"`` (``DEVICE_OPTIMIZERS``);
            None: :data:`NATIVE_OPTIMIZER` for the native runtime, ``StepSettings.optimizer`` otherwise.
        runner_ups: how many next-best configurations to list.
        min_blocks: the smallest K considered (0 admits the classifier-only linear probe).
        max_blocks: the largest K considered (default: all blocks), e.g. to bound the training
            time, or the native runtime's program emissions (a minute each).
        runtime: ``"eager"`` (PyTorch) or ``"native"`` (``edgetl-device``, SGD or AdamW).
        program_memory: for the native runtime, ``(policy, batch_size) -> ProgramMemory`` of the
            exported training program (e.g. :func:`edgetl.exporter.training.program_memory`).
        verify_program: for the native runtime, ``(policy, batch_size)`` exports and verifies
            that training program, raising :class:`EdgetlError` if it is refused (e.g.
            :func:`edgetl.exporter.training.verify_program`): the best fitting configurations
            are tried in order and the first that verifies is chosen, so the plan names a
            bundle ``edgetl export --training`` makes.
        images: for the native runtime, the device's training images (their features are cached).
        precisions: the ``saved_precision`` values the eager planner may choose.
        memory_options: let the eager planner use ``bottom_chunk``, ``saved_precision`` and
            ``recompute`` (cheapest that fits); False plans plain policies only.

    Raises:
        ConfigError: bad arguments.
        EdgetlError: nothing fits (the message says what the smallest configuration needs).
    """
    profile = device if isinstance(device, DeviceProfile) else load_device(device)
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if optimizer is None:
        optimizer = NATIVE_OPTIMIZER if runtime == "native" else StepSettings.optimizer
    check_optimizer(optimizer)
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    if runtime == "native":
        if program_memory is None:
            raise ConfigError("the native runtime needs program_memory (the exporter's memory plan of the training program)")
        if optimizer not in DEVICE_OPTIMIZERS:
            raise ConfigError(f"the native runtime trains with {' or '.join(DEVICE_OPTIMIZERS)}, not {optimizer!r}")
        if images < 1:
            raise ConfigError(f"images must be >= 1, got {images}")
    sizes = sorted({int(b) for b in batch_sizes}, reverse=True)
    if not sizes or sizes[-1] < 1:
        raise ConfigError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if image_size < 8:
        raise ConfigError(f"image size must be >= 8, got {image_size}")
    if isinstance(model, str):
        from edgetl.models.zoo import load_model

        with torch.random.fork_rng(devices=[]):
            name, net = model, load_model(model, num_classes=num_classes)
    else:
        name, net = type(model).__name__, model
    num_blocks = len(find_blocks(net))
    if num_blocks == 0:
        raise ConfigError(f"{name} has no inverted-residual blocks")
    if not 0 <= min_blocks <= num_blocks:
        raise ConfigError(f"min_blocks must be in 0..{num_blocks}, got {min_blocks}")
    max_blocks = num_blocks if max_blocks is None else max_blocks
    if not min_blocks <= max_blocks <= num_blocks:
        raise ConfigError(f"max_blocks must be in {min_blocks}..{num_blocks} (min_blocks..the blocks of {name}), got {max_blocks}")

    def plain_policy(k: int) -> TrainPolicy:  # without memory options: what the native runtime trains
        return TrainPolicy(k, method, activation_mask=activation_mask)

    @cache
    def memory_at(k: int, b: int) -> ProgramMemory | EdgetlError:
        try:
            return program_memory(plain_policy(k), b)
        except EdgetlError as exc:  # remembered: a failing K is not emitted twice
            return exc

    def native_estimate(k: int, b: int) -> NativePeakEstimate:
        lo = memory_at(k, NATIVE_ANCHORS[0])
        if isinstance(lo, EdgetlError):
            raise lo
        hi = memory_at(k, NATIVE_ANCHORS[1])
        if isinstance(hi, EdgetlError):
            raise hi
        per_item = (hi.arena_bytes - lo.arena_bytes) / (NATIVE_ANCHORS[1] - NATIVE_ANCHORS[0])
        arena = max(0, round(lo.arena_bytes + (b - NATIVE_ANCHORS[0]) * per_item))
        return predict_native_peak(
            arena_bytes=arena,
            weights_file_bytes=lo.weights_file_bytes,
            trainable_bytes=lo.trainable_bytes,
            feature_bytes=lo.feature_bytes,
            images=images,
            optimizer_floats=state_floats(optimizer),
        )

    def score(k: int, b: int) -> Candidate | None:
        policy = plain_policy(k)
        rows = predict_units(net, policy, batch_size=b, image_size=image_size)
        if trainable_shapes_problem(rows):
            return None  # cannot train at all (batch norm on one value)
        if runtime == "native":
            step = None
            if profile.gemm_gflops and profile.memory_gbps:
                work = step_work(net, policy, batch_size=b, image_size=image_size)
                step = predict_native_step_time(work, gemm_gflops=profile.gemm_gflops, memory_gbps=profile.memory_gbps)
            try:
                return Candidate(k, b, native_estimate(k, b), profile.usable_bytes, step_time=step)
            except EdgetlError:
                return None  # no training program for this K (a layer or operator the exporter cannot carry)
        tried = option_policies(k, method, activation_mask, b, precisions) if memory_options else [policy]
        first = None
        for option in tried:  # cheapest first: the first that fits is the answer for (K, b)
            option_rows = rows if option == policy else predict_units(net, option, batch_size=b, image_size=image_size)
            est = predict_step_peak(
                net, option, batch_size=b, image_size=image_size, optimizer=optimizer, runtime_bytes=profile.runtime_overhead,
                rows=option_rows,
            )  # fmt: skip
            c = Candidate(k, b, est, profile.usable_bytes, option)
            if c.fits:
                return c
            first = first or c
        return first

    # best fitting batch per K, from the top K down; the peak grows with K and with the batch size
    best: dict[int, list[Candidate]] = {}
    smallest: Candidate | None = None
    for k in range(max_blocks, min_blocks - 1, -1):
        fitting = []
        for b in sizes:
            c = score(k, b)
            if c is None:
                continue
            if smallest is None or c.peak < smallest.peak:
                smallest = c
            if c.fits:
                fitting.append(c)
        if fitting:
            best[k] = fitting  # largest batch first
        if runtime == "native" and len(best) > runner_ups:
            break  # each K costs two program emissions: stop once the answer and its runner-ups are known
    if not best:
        if smallest is None:
            raise EdgetlError(f"no candidate configuration of {name} can train at {image_size} px with batch sizes {sizes[::-1]}")
        raise EdgetlError(
            f"nothing fits on {profile.name}: the smallest configuration (K={smallest.blocks}, batch {smallest.batch_size}, "
            f"{image_size} px, {method}) needs a predicted {format_size(smallest.peak)} "
            f"(runtime {format_size(smallest.estimate.runtime)} + model {format_size(smallest.peak - smallest.estimate.runtime)}) "
            f"but only {format_size(profile.usable_bytes)} is usable ({format_size(profile.memory_budget)} budget, "
            f"{100 * profile.safety_margin:.0f}% safety margin)"
        )
    verified = False
    if runtime == "native" and verify_program is not None:
        refused = []
        while best and not verified:
            k_best = max(best)
            candidate = best[k_best][0]
            try:
                verify_program(plain_policy(candidate.blocks), candidate.batch_size)
                verified = True
            except EdgetlError as exc:  # never chosen: the exporter would refuse it
                refused.append(f"K={candidate.blocks} batch {candidate.batch_size}: {exc}")
                best[k_best].pop(0)
                if not best[k_best]:
                    del best[k_best]
        if not verified:
            raise EdgetlError(f"no fitting configuration of {name} exports a training program that verifies: " + "; ".join(refused))
    k_best = max(best)
    chosen = best[k_best][0]
    alternatives: list[Candidate] = best[k_best][1:2]
    alternatives += [best[k][0] for k in sorted(best, reverse=True) if k != k_best]
    over: list[Candidate] = []
    larger = [b for b in sizes if b > chosen.batch_size]
    if larger:
        c = score(k_best, min(larger))
        if c is not None:
            over.append(c)
    if k_best < max_blocks:  # the next K up, when memory (not max_blocks) ruled it out
        c = next((c for b in reversed(sizes) if (c := score(k_best + 1, b)) is not None), None)
        if c is not None and not c.fits:
            over.append(c)
    return Plan(
        profile, name, image_size, method, optimizer, num_blocks, chosen, tuple(alternatives[:runner_ups]), tuple(over), runtime, verified
    )
