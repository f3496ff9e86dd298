"""The planner: the largest K, then the largest batch size, whose predicted peak fits a device.

Every candidate ``(K, batch size)`` is scored with :func:`edgetl.profiler.peak.predict_step_peak`
(an estimate, pure functions of shapes), plus the device's runtime overhead, against the device's
usable memory, ``memory_budget x (1 - safety_margin)``. Nothing is run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from edgetl.errors import EdgetlError
from edgetl.models.blocks import find_blocks
from edgetl.profiler.device import DeviceProfile, format_size, load_device
from edgetl.profiler.peak import StepPeakEstimate, check_optimizer, predict_step_peak, trainable_shapes_problem
from edgetl.profiler.predict import predict_units
from edgetl.train.policy import METHODS, TrainPolicy

DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Candidate:
    """One configuration and its predicted peak (runtime included) against the usable memory."""

    blocks: int
    batch_size: int
    estimate: StepPeakEstimate
    usable: int

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
        return {"blocks": self.blocks, "batch_size": self.batch_size, "predicted_peak": self.peak,
                "usable": self.usable, "headroom": self.headroom, "fits": self.fits, "estimate": self.estimate.to_dict()}


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

    def policy(self) -> TrainPolicy:
        return TrainPolicy(self.chosen.blocks, self.method)

    def to_dict(self) -> dict:
        return {
            "device": self.device.to_dict(),
            "model": self.model,
            "image_size": self.image_size,
            "method": self.method,
            "optimizer": self.optimizer,
            "num_blocks": self.num_blocks,
            "chosen": self.chosen.to_dict(),
            "runner_ups": [c.to_dict() for c in self.runner_ups],
            "over_budget": [c.to_dict() for c in self.over_budget],
        }

    def render(self) -> str:
        d = self.device
        pct = 100 * d.safety_margin

        def line(c: Candidate) -> str:
            e = c.estimate
            share = 100 * c.peak / c.usable if c.usable > 0 else float("inf")
            return (f"K={c.blocks:<2d} batch {c.batch_size:<3d} predicted peak {format_size(c.peak):>10s} "
                    f"({share:5.1f}% of usable; saved activations {format_size(e.saved_activations)}, "
                    f"weights+grads+{self.optimizer} state {format_size(e.weights + e.gradients + e.optimizer_state)})")

        out = [
            f"edgetl plan: {self.model} at {self.image_size} px, {self.method}, optimizer {self.optimizer}, "
            f"on {d.name} ({d.path})",
            f"  memory budget {format_size(d.memory_budget)} of {format_size(d.memory_total)}, safety margin {pct:.0f}% "
            f"-> usable {format_size(d.usable_bytes)}; runtime overhead {format_size(d.runtime_overhead)} included",
            f"  chosen:      {line(self.chosen)}",
        ]
        for i, c in enumerate(self.runner_ups):
            out.append(f"  {'runner-ups:' if i == 0 else '':12s} {line(c)}")
        for i, c in enumerate(self.over_budget):
            out.append(f"  {'over budget:' if i == 0 else '':12s} {line(c)}, {format_size(-c.headroom)} too much")
        out.append("  Predicted peaks are estimates (edgetl.profiler.peak.predict_step_peak), not measurements; "
                   "check on the device with `edgetl profile ... --process`.")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.render()


def plan(
    device: DeviceProfile | str | os.PathLike,
    model: str | nn.Module,
    *,
    image_size: int = 224,
    method: str = "mobiletl",
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    num_classes: int = 1000,
    optimizer: str = "adam",
    runner_ups: int = 4,
    min_blocks: int = 1,
    activation_mask: str = "reuse",
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
        optimizer: ``"adam"``, ``"adamw"``, ``"sgd"`` (momentum) or ``"sgd_nomomentum"``.
        runner_ups: how many next-best configurations to list.
        min_blocks: the smallest K considered (0 admits the classifier-only linear probe).

    Raises:
        EdgetlError: nothing fits (the message says what the smallest configuration needs), or bad
            arguments.
    """
    profile = device if isinstance(device, DeviceProfile) else load_device(device)
    if method not in METHODS:
        raise EdgetlError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    check_optimizer(optimizer)
    sizes = sorted({int(b) for b in batch_sizes}, reverse=True)
    if not sizes or sizes[-1] < 1:
        raise EdgetlError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if image_size < 8:
        raise EdgetlError(f"image size must be >= 8, got {image_size}")
    if isinstance(model, str):
        from edgetl.models.zoo import load_model

        with torch.random.fork_rng(devices=[]):
            name, net = model, load_model(model, num_classes=num_classes)
    else:
        name, net = type(model).__name__, model
    num_blocks = len(find_blocks(net))
    if num_blocks == 0:
        raise EdgetlError(f"{name} has no inverted-residual blocks")
    if not 0 <= min_blocks <= num_blocks:
        raise EdgetlError(f"min_blocks must be in 0..{num_blocks}, got {min_blocks}")

    def score(k: int, b: int) -> Candidate | None:
        policy = TrainPolicy(k, method, activation_mask=activation_mask)
        rows = predict_units(net, policy, batch_size=b, image_size=image_size)
        if trainable_shapes_problem(rows):
            return None  # cannot train at all (batch norm on one value)
        est = predict_step_peak(net, policy, batch_size=b, image_size=image_size, optimizer=optimizer,
                                runtime_bytes=profile.runtime_overhead, rows=rows)
        return Candidate(k, b, est, profile.usable_bytes)

    # best fitting batch per K, from the top K down; the peak grows with K and with the batch size
    best: dict[int, list[Candidate]] = {}
    smallest: Candidate | None = None
    for k in range(num_blocks, min_blocks - 1, -1):
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
    if not best:
        if smallest is None:
            raise EdgetlError(f"no candidate configuration of {name} can train at {image_size} px with batch sizes {sizes[::-1]}")
        raise EdgetlError(
            f"nothing fits on {profile.name}: the smallest configuration (K={smallest.blocks}, batch {smallest.batch_size}, "
            f"{image_size} px, {method}) needs a predicted {format_size(smallest.peak)} "
            f"(runtime {format_size(profile.runtime_overhead)} + model {format_size(smallest.estimate.model_bytes)}) "
            f"but only {format_size(profile.usable_bytes)} is usable ({format_size(profile.memory_budget)} budget, "
            f"{100 * profile.safety_margin:.0f}% safety margin)"
        )
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
    if k_best < num_blocks:
        c = next((c for b in reversed(sizes) if (c := score(k_best + 1, b)) is not None), None)
        if c is not None and not c.fits:
            over.append(c)
    return Plan(profile, name, image_size, method, optimizer, num_blocks, chosen, tuple(alternatives[:runner_ups]), tuple(over))
