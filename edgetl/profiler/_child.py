"""The child process of :func:`edgetl.profiler.process_peak.measure_process_peak`.

    python -m edgetl.profiler._child --model NAME --policy JSON --batch-size N --image-size S [--timeline] [...]

Loads and prepares the model, runs real training steps in the trainer's order and prints one JSON
object on stdout (the fields of :class:`~edgetl.profiler.process_peak.ProcessPeak`; with
``--timeline``, a :class:`~edgetl.profiler.timeline.StepTimeline` instead). Everything is
imported before the runtime baseline is read, so the baseline includes the package.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict

import torch
from torch import nn

from edgetl._allocator import active as active_allocator
from edgetl._rss import current_rss_bytes, peak_rss_bytes, reset_peak
from edgetl.models.zoo import classifier_linear, load_model
from edgetl.profiler.process_peak import ProcessPeak
from edgetl.train.optim import OPTIMIZERS, build_optimizer
from edgetl.train.policy import TrainPolicy
from edgetl.train.prepare import prepare
from edgetl.train.step import train_step

#: learning rate of the measured steps; memory does not depend on it
LR = 1e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The child's arguments (the parent builds them; see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m edgetl.profiler._child", description="training steps, RSS as JSON")
    p.add_argument("--model", required=True, help="model name for edgetl.load_model")
    p.add_argument("--weights", help="state-dict file (default: random weights; memory does not depend on them)")
    p.add_argument("--policy", required=True, help="the TrainPolicy as JSON (TrainPolicy.to_dict())")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--timeline", action="store_true", help="record one step's live bytes instead (StepTimeline as JSON)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the steps and print the RSS figures as JSON; returns the exit code."""
    runtime_rss = current_rss_bytes()
    args = parse_args(argv)
    policy = TrainPolicy(**json.loads(args.policy))
    if args.timeline:
        from edgetl.profiler.timeline import measure_step_timeline

        timeline = measure_step_timeline(
            args.model, policy, batch_size=args.batch_size, image_size=args.image_size, num_classes=args.num_classes,
            optimizer=args.optimizer, weights=args.weights, runtime_rss=runtime_rss,
        )  # fmt: skip
        print(json.dumps(timeline.to_dict()))
        return 0
    torch.manual_seed(0)
    original = load_model(args.model, weights=args.weights, num_classes=args.num_classes)
    net = prepare(original, policy)
    del original  # prepare deep-copies; the device would not keep the unprepared model
    opt = build_optimizer(args.optimizer, net.trainable_parameters(), lr=LR)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    classes = classifier_linear(net)[2].out_features  # a saved module keeps its own head
    y = torch.randint(0, classes, (args.batch_size,))
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    gc.collect()
    loaded_rss = current_rss_bytes()
    # the warm-up: a forward and backward of two images, nothing kept (no optimizer step, gradients
    # dropped). It faults in what any first step faults in whatever the policy (kernel code pages,
    # thread pools, oneDNN's primitives), so ``warm_rss`` is the runtime a step's tensors add to.
    warm = min(2, args.batch_size)
    loss_fn(net(x[:warm]), y[:warm]).backward()
    net.zero_grad(set_to_none=True)
    gc.collect()
    warm_rss, loaded_peak = current_rss_bytes(), peak_rss_bytes()
    reset = reset_peak()
    seconds = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        train_step(net, x, y, loss_fn, opt)
        seconds.append(time.perf_counter() - t0)
    result = ProcessPeak(
        method=policy.method,
        runtime_rss=runtime_rss,
        loaded_rss=loaded_rss,
        warm_rss=warm_rss,
        loaded_peak_rss=loaded_peak,
        step_peak_rss=peak_rss_bytes(),
        hwm_reset=reset,
        steps=args.steps,
        optimizer=args.optimizer,
        torch_version=torch.__version__,
        platform=f"{platform.system()} {platform.machine()}",
        step_seconds=statistics.median(seconds[1:] or seconds),
        allocator=active_allocator(),
    )
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
