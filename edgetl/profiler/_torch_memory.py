"""Live tensor bytes over time from PyTorch's own allocation events: the one module that touches
``torch.profiler._memory_profiler`` (private; its categories are what autograd knows of each tensor).

``torch.profiler.profile(profile_memory=True, record_shapes=True, with_stack=True)`` records every
allocation and free of the CPU allocator with the op that made it; the memory profiler then labels
each tensor (parameter, gradient, optimizer state, input, activation kept for backward, temporary,
autograd detail, or unknown) from the autograd graph it saw. Chosen over a ``CPUAllocator`` hook:
no native code, and the labels come for free. Its cost is time (the step runs 2-5x slower
while recorded), never memory accounting: the bytes are the allocator's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch.profiler import ProfilerActivity, profile, record_function

#: torch's categories in its own column order, under edgetl's names
CATEGORIES: tuple[str, ...] = (
    "weights",  # parameters
    "optimizer state",
    "input",
    "temporaries",
    "stored for backward",  # activations autograd keeps
    "gradients",
    "autograd detail",
    "other",  # unlabelled: buffers, no-grad intermediates (the frozen bottom's working set)
)
_PHASE_PREFIX = "edgetl.phase/"


@dataclass(frozen=True)
class Recording:
    """Live bytes by category at each allocation event, and the phases' spans. Times in µs."""

    times_us: tuple[int, ...]
    live: tuple[tuple[int, ...], ...]  # per time: bytes per CATEGORIES entry
    phases: tuple[tuple[str, int, int], ...]  # (name, start, end)


class Recorder:
    """Record live bytes while phases run: ``with rec.phase("backward"): loss.backward()``."""

    def __init__(self) -> None:
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with record_function(_PHASE_PREFIX + name):
            yield

    def run(self, body: Callable[[Recorder], None]) -> Recording:
        """Call ``body(self)`` under the profiler and return what it recorded."""
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with self._prof:
            body(self)
        start_ns = self._prof.profiler.kineto_results.trace_start_ns()
        phases = tuple(
            (e.name.removeprefix(_PHASE_PREFIX), int(start_ns // 1000 + e.time_range.start), int(start_ns // 1000 + e.time_range.end))
            for e in self._prof.events()
            if e.name.startswith(_PHASE_PREFIX)
        )
        times, sizes = MemoryProfileTimeline(self._prof._memory_profile())._coalesce_timeline("cpu")
        # column 0 is unused by torch; 1.. follow its category order, the last is "unknown"
        live = tuple(tuple(int(v) for v in row[1:]) for row in sizes)
        if times and times[0] == -1:  # tensors that existed before recording: at the first event's time
            times = [times[1] if len(times) > 1 else 0, *times[1:]]
        return Recording(tuple(int(t) for t in times), live, tuple(sorted(phases, key=lambda p: p[1])))
