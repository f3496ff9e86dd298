"""MobileTL against vanilla fine-tuning on the same K, model and batch: one training step's time,
bytes stored for backward, and process peak memory, measured side by side in one run.

    .venv/bin/python benchmarks/train_step.py [--model mobilenet_v3_large] [--blocks 5] [--batch-size 8] [--image-size 224] [--recompute]

Step time: both methods in one process, interleaved (A B A B ...) so machine noise hits both, median
of --repeats steps after a warm-up. Stored for backward: autograd's saved-tensor hooks. Peak RSS:
a fresh child process per method (peaks only grow within a process), interleaved, median of --runs.
--recompute: also time each method with TrainPolicy.recompute (interleaved with the others) and
report its step time and stored bytes beside the plain policy's (the RSS children run the plain policy).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from edgetl.models.zoo import load_model
from edgetl.profiler.measure import measure_saved_bytes
from edgetl.profiler.process_peak import measure_process_peak
from edgetl.profiler.report import METHOD_ORDER
from edgetl.train.optim import build_optimizer
from edgetl.train.policy import TrainPolicy
from edgetl.train.prepare import prepare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenet_v3_large")
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--recompute", action="store_true", help="also time TrainPolicy.recompute against the plain policy")
    args = p.parse_args()

    torch.manual_seed(0)
    base = load_model(args.model, num_classes=10)
    variants = list(METHOD_ORDER) + ([f"{m}+recompute" for m in METHOD_ORDER] if args.recompute else [])
    policies = {v: TrainPolicy(args.blocks, v.split("+")[0], recompute=v.endswith("+recompute")) for v in variants}
    nets = {v: prepare(base, policies[v]).train() for v in variants}
    opts = {v: build_optimizer("adam", nets[v].trainable_parameters(), lr=1e-4) for v in variants}
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.batch_size,))

    def step(method: str) -> float:
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(nets[method](x), y)
        opts[method].zero_grad(set_to_none=True)
        loss.backward()
        opts[method].step()
        return time.perf_counter() - t0

    for v in variants:  # warm-up: allocator, kernels, optimizer state
        step(v)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            times[v].append(step(v))

    saved = {}
    for v in variants:
        units = {n: nets[v].get_submodule(n) for n in nets[v].top_names}
        saved[v] = sum(u.nbytes for u in measure_saved_bytes(nets[v], units, x).values())

    peaks: dict[str, list] = {m: [] for m in METHOD_ORDER}
    for _ in range(args.runs):
        for m in METHOD_ORDER:
            peaks[m].append(
                measure_process_peak(
                    args.model, TrainPolicy(args.blocks, m), batch_size=args.batch_size, image_size=args.image_size, num_classes=10
                )
            )

    def med(values):
        return statistics.median(values)

    mib = 2**20
    print(
        f"{args.model}, K={args.blocks}, batch {args.batch_size}, {args.image_size} px, Adam; "
        f"{args.repeats} interleaved steps, {args.runs} child processes per method (medians)\n"
    )
    print(f"{'':34}{'vanilla':>12}{'mobiletl':>12}{'mobiletl/vanilla':>18}")
    rows = [
        ("step time (ms)", med(times["vanilla"]) * 1e3, med(times["mobiletl"]) * 1e3),
        ("stored for backward (MiB, exact)", saved["vanilla"] / mib, saved["mobiletl"] / mib),
        ("process peak RSS (MiB)", med([r.peak_rss for r in peaks["vanilla"]]) / mib, med([r.peak_rss for r in peaks["mobiletl"]]) / mib),
        (
            "peak RSS over loaded model (MiB)",
            med([r.step_delta for r in peaks["vanilla"]]) / mib,
            med([r.step_delta for r in peaks["mobiletl"]]) / mib,
        ),
    ]
    for label, v, m in rows:
        print(f"{label:34}{v:12.1f}{m:12.1f}{m / v:18.3f}")
    if args.recompute:
        print(f"\nwith TrainPolicy.recompute (same interleaved steps)\n{'':34}{'vanilla':>12}{'mobiletl':>12}")
        rc = {m: f"{m}+recompute" for m in METHOD_ORDER}
        for label, value in (
            ("step time (ms)", lambda m: med(times[rc[m]]) * 1e3),
            ("step time / without recompute", lambda m: med(times[rc[m]]) / med(times[m])),
            ("stored for backward (MiB, exact)", lambda m: saved[rc[m]] / mib),
            ("stored / without recompute", lambda m: saved[rc[m]] / saved[m]),
        ):
            print(f"{label:34}{value('vanilla'):12.3f}{value('mobiletl'):12.3f}")


if __name__ == "__main__":
    main()
