"""``edgetl profile`` and ``edgetl plan``: sub-commands registered on the main parser.

``add_profile_parser(subparsers)`` and ``add_plan_parser(subparsers)`` each add one sub-command and
set ``handler`` (``args.handler(args) -> int``). Handlers print their result, return an exit code
and raise :class:`edgetl.errors.EdgetlError` for user errors (the main CLI prints one line, exit 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgetl.errors import EdgetlError
from edgetl.profiler.peak import OPTIMIZER_STATE_FLOATS
from edgetl.profiler.planner import DEFAULT_BATCH_SIZES
from edgetl.train.policy import ACTIVATION_MASKS, METHODS


def _blocks(value: str) -> int | str:
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'all', got {value!r}") from None


def _batch_sizes(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4,8, got {value!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {value!r}")
    return sizes


def _write(path: str, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise EdgetlError(f"cannot write {path}: {exc.strerror}") from None


def add_profile_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``edgetl profile``."""
    p = subparsers.add_parser(
        "profile",
        help="per-block memory of training the top K blocks, vanilla against MobileTL",
        description="Bytes stored for backward per block, predicted (analytic) and measured (autograd hooks), for both "
        "vanilla fine-tuning and MobileTL, with parameter, gradient and optimizer-state bytes, a predicted "
        "step peak, and optionally the peak RSS of a real training step in a fresh process.",
    )
    p.add_argument("--model", required=True, help="architecture (mobilenet_v2, mobilenet_v3_small, ...)")
    p.add_argument("--blocks", "-K", required=True, type=_blocks, help="K: blocks trained from the top, or 'all'")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument(
        "--optimizer",
        choices=list(OPTIMIZER_STATE_FLOATS),
        default="adam",
        help="whose state to count (adam/adamw: 2 floats per trained parameter, sgd with momentum: 1)",
    )
    p.add_argument("--activation-mask", choices=list(ACTIVATION_MASKS), default="reuse", help="MobileTL's mask storage")
    p.add_argument("--json", metavar="F", help="also write the report as JSON to F")
    p.add_argument("--plot", metavar="F.png", help="write a per-block bar chart, vanilla against MobileTL (needs matplotlib)")
    p.add_argument("--process", action="store_true", help="also measure peak RSS of a real training step in a fresh process (slow)")
    p.add_argument("--all-rows", action="store_true", help="print every frozen unit instead of one line for the frozen bottom")
    p.set_defaults(handler=profile_command)
    return p


def profile_command(args: argparse.Namespace) -> int:
    """Handler of ``edgetl profile``."""
    from edgetl.models.blocks import find_blocks
    from edgetl.models.zoo import load_model
    from edgetl.profiler.report import plot_report, profile
    from edgetl.train.policy import TrainPolicy

    blocks = args.blocks
    if blocks == "all":
        blocks = len(find_blocks(load_model(args.model, num_classes=args.num_classes)))
    if blocks < 0:
        raise EdgetlError(f"--blocks must be >= 0 or 'all', got {blocks}")
    policy = TrainPolicy(blocks, "mobiletl", activation_mask=args.activation_mask)
    report = profile(
        args.model,
        policy,
        batch_size=args.batch_size,
        image_size=args.image_size,
        num_classes=args.num_classes,
        optimizer=args.optimizer,
        measure_process=args.process,
    )
    print(report.render(collapse_frozen=not args.all_rows))
    if args.json:
        _write(args.json, report.to_json() + "\n")
        print(f"JSON report written to {args.json}")
    if args.plot:
        plot_report(report, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def add_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``edgetl plan``."""
    p = subparsers.add_parser(
        "plan",
        help="the largest K, then batch size, whose predicted peak fits a device",
        description="Choose the largest number of trained blocks K, then the largest batch size, whose predicted training "
        "peak (runtime included) fits the device's memory budget minus its safety margin.",
    )
    p.add_argument("--device", required=True, metavar="device_profiles/NAME.toml", help="device profile (TOML)")
    p.add_argument("--model", required=True)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--method", choices=list(METHODS), default="mobiletl")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument(
        "--optimizer", choices=list(OPTIMIZER_STATE_FLOATS), help="optimizer (default: adam for eager, sgd with momentum for native)"
    )
    p.add_argument(
        "--runtime",
        choices=("eager", "native"),
        default="eager",
        help="what trains on the device: PyTorch (eager) or deploy/native's edgetl-device (native; emits the training "
        "program per K to read its memory plan, a minute each)",
    )
    p.add_argument("--images", type=int, default=1000, help="native runtime: training images on the device (their features are cached)")
    p.add_argument(
        "--batch-sizes",
        type=_batch_sizes,
        default=DEFAULT_BATCH_SIZES,
        help=f"candidate batch sizes (default {','.join(map(str, DEFAULT_BATCH_SIZES))})",
    )
    p.add_argument("--runner-ups", type=int, default=4, help="how many next-best configurations to show")
    p.add_argument("--json", metavar="F", help="also write the plan as JSON to F")
    p.set_defaults(handler=plan_command)
    return p


def plan_command(args: argparse.Namespace) -> int:
    """Handler of ``edgetl plan``."""
    import json

    from edgetl.profiler.planner import plan

    program_memory = None
    if args.runtime == "native":
        from edgetl.exporter.training import program_memory as emit_memory
        from edgetl.models.zoo import load_model

        model = load_model(args.model, num_classes=args.num_classes)

        def program_memory(policy, batch_size):
            print(f"  emitting the training program for K={policy.blocks} batch {batch_size} (its memory plan) ...", flush=True)
            return emit_memory(model, policy, batch_size=batch_size, image_size=args.image_size, num_classes=args.num_classes)

    optimizer = args.optimizer or ("sgd" if args.runtime == "native" else "adam")
    result = plan(
        args.device,
        args.model,
        image_size=args.image_size,
        method=args.method,
        batch_sizes=args.batch_sizes,
        num_classes=args.num_classes,
        optimizer=optimizer,
        runner_ups=args.runner_ups,
        runtime=args.runtime,
        program_memory=program_memory,
        images=args.images,
    )
    print(result.render())
    if args.json:
        _write(args.json, json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"JSON plan written to {args.json}")
    return 0
