"""Where every MiB of a training step goes: live tensor bytes over one real step, by phase and by
category, next to the OS's resident set size.

:func:`measure_step_timeline` builds the model, prepares it under a policy, runs a warm-up step (the
optimizer state now exists: the steady state) and a step whose phases' RSS it reads, then records one
more step in phases —
data (the batch), frozen-bottom forward, top forward (with the loss), backward, optimizer step,
evaluation (a no-grad forward in eval mode) — from PyTorch's own allocation events
(:mod:`edgetl.profiler._torch_memory`). Figures are bytes; the recording costs time, not accounting.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from edgetl._allocator import DEFAULT as DEFAULT_ALLOCATOR
from edgetl._rss import current_rss_bytes
from edgetl.models.zoo import load_model
from edgetl.profiler._torch_memory import CATEGORIES, Recorder, Recording
from edgetl.profiler.estimate import PHASES as STEP_PHASES
from edgetl.profiler.settings import StepSettings
from edgetl.train.optim import build_optimizer
from edgetl.train.policy import TrainPolicy
from edgetl.train.prepare import prepare
from edgetl.train.step import train_step

PHASES: tuple[str, ...] = ("data", *STEP_PHASES)


@dataclass(frozen=True)
class StepTimeline:
    """One recorded training step (see the module docstring). Bytes; times in µs from the start."""

    model: str
    method: str
    blocks: int
    batch_size: int
    image_size: int
    optimizer: str
    times_us: tuple[int, ...]
    live: tuple[tuple[int, ...], ...]  # per time, bytes per CATEGORIES entry
    phases: tuple[tuple[str, int, int], ...]  # (phase, start, end)
    rss_after: dict[str, int]  # the process's RSS at the end of each phase
    loaded_rss: int  # RSS with the model and optimizer state in place, before the recorded step
    runtime_rss: int = 0  # RSS of the process before the model loaded (interpreter, torch, edgetl)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StepTimeline:
        """Inverse of :meth:`to_dict` (derived fields ignored)."""
        names = {f.name for f in fields(cls)}
        v = {k: values[k] for k in names if k in values}
        v["times_us"] = tuple(v["times_us"])
        v["live"] = tuple(tuple(row) for row in v["live"])
        v["phases"] = tuple(tuple(p) for p in v["phases"])
        return cls(**v)

    @property
    def peak_rss(self) -> int:
        """The largest RSS read at a phase's end."""
        return max(self.rss_after.values(), default=self.loaded_rss)

    @property
    def allocator_slack(self) -> int:
        """RSS over what the runtime, and the live tensors at their peak, account for: memory the
        allocator holds that no tensor uses (freed chunks, fragmentation), and the loaded copy of
        the weights ``prepare`` copied from."""
        return self.peak_rss - self.runtime_rss - self.peak_bytes if self.runtime_rss else 0

    def total(self, i: int) -> int:
        return sum(self.live[i])

    @property
    def peak_index(self) -> int:
        return max(range(len(self.live)), key=self.total)

    @property
    def peak_bytes(self) -> int:
        """The most live tensor bytes at any instant of the step."""
        return self.total(self.peak_index)

    @property
    def peak_phase(self) -> str:
        return self.phase_at(self.times_us[self.peak_index])

    def phase_progress(self) -> list[float]:
        """Each event's position on a phase-aligned axis: phase i spans [i, i + 1) in :data:`PHASES`
        order, so steps of different speeds line up on one plot."""
        spans = {name: (start, end) for name, start, end in self.phases}
        out = []
        for t in self.times_us:
            x = float(len(PHASES))
            for i, name in enumerate(PHASES):
                start, end = spans.get(name, (0, -1))
                if start <= t <= end:
                    x = i + (t - start) / max(end - start, 1)
                    break
                if t < start:
                    x = float(i)
                    break
            out.append(x)
        return out

    def phase_at(self, t: int) -> str:
        for name, start, end in self.phases:
            if start <= t <= end:
                return name
        return "between phases"

    def breakdown_at_peak(self) -> dict[str, int]:
        return dict(zip(CATEGORIES, self.live[self.peak_index], strict=True))

    def phase_peaks(self) -> dict[str, int]:
        """The most live bytes within each phase."""
        out = {}
        for name, start, end in self.phases:
            inside = [self.total(i) for i, t in enumerate(self.times_us) if start <= t <= end]
            out[name] = max(inside) if inside else 0
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(peak_bytes=self.peak_bytes, peak_phase=self.peak_phase, breakdown_at_peak=self.breakdown_at_peak())
        d["phase_peaks"] = self.phase_peaks()
        return d


def measure_step_timeline(
    model: str,
    policy: TrainPolicy,
    *,
    batch_size: int,
    image_size: int,
    num_classes: int = StepSettings.num_classes,
    optimizer: str = StepSettings.optimizer,
    weights: str | None = None,
    seed: int = 0,
    runtime_rss: int = 0,
) -> StepTimeline:
    """Record one steady-state training step of ``model`` under ``policy`` in this process (see the
    module docstring). ``runtime_rss``: this process's RSS before anything loaded, when the caller
    read it (the child process does)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the new classifier's initialisation
        net = prepare(load_model(model, weights=weights, num_classes=num_classes), policy)
    opt = build_optimizer(optimizer, net.trainable_parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
        return x, torch.randint(0, num_classes, (batch_size,), generator=gen)

    def step(rec: Recorder | None, rss: dict[str, int]) -> None:
        def phase(name: str):
            return _Marked(rec.phase(name) if rec else nullcontext(), lambda: rss.__setitem__(name, current_rss_bytes()))

        net.train()
        with phase("data"):
            x, y = batch()
        train_step(net, x, y, loss_fn, opt, phase=phase)
        with phase("evaluation"), torch.no_grad():  # the trainer's end-of-epoch evaluation, one batch of it
            net.eval()
            net(x)
            net.train()

    step(None, {})  # warm-up: the optimizer state now exists (the steady state)
    loaded = current_rss_bytes()
    rss: dict[str, int] = {}
    step(None, rss)  # the RSS is read in a step of its own: the recording's event buffers would count
    rec: Recording = Recorder().run(lambda r: step(r, {}))
    t0 = rec.times_us[0] if rec.times_us else 0
    return StepTimeline(
        model=model,
        method=policy.method,
        blocks=policy.blocks,
        batch_size=batch_size,
        image_size=image_size,
        optimizer=optimizer,
        times_us=tuple(t - t0 for t in rec.times_us),
        live=rec.live,
        phases=tuple((name, start - t0, end - t0) for name, start, end in rec.phases),
        rss_after=rss,
        loaded_rss=loaded,
        runtime_rss=runtime_rss,
    )


def measure_step_timelines(
    model: str,
    policy: TrainPolicy,
    *,
    batch_size: int,
    image_size: int,
    num_classes: int = StepSettings.num_classes,
    optimizer: str = StepSettings.optimizer,
    timeout: float = 900.0,
    allocator: str = DEFAULT_ALLOCATOR,
) -> dict[str, StepTimeline]:
    """:func:`measure_step_timeline` for vanilla and MobileTL (``policy`` with each method), each in a
    fresh child process so the RSS figures are each method's own, on the ``malloc`` ``allocator``
    names (:mod:`edgetl._allocator`; live bytes do not depend on it, the RSS does)."""
    from edgetl.profiler.process_peak import run_child

    return {
        method: StepTimeline.from_dict(
            run_child(
                ["--model", model], replace(policy, method=method), batch_size=batch_size, image_size=image_size,
                num_classes=num_classes, optimizer=optimizer, extra=["--timeline"], timeout=timeout, allocator=allocator,
            )
        )
        for method in ("vanilla", "mobiletl")
    }  # fmt: skip


class _Marked:
    """A phase's context, then ``after()`` (the RSS reading) once it ends."""

    def __init__(self, inner, after) -> None:
        self.inner, self.after = inner, after

    def __enter__(self) -> None:
        self.inner.__enter__()

    def __exit__(self, *exc) -> None:
        self.inner.__exit__(*exc)
        self.after()
