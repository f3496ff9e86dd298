"""``edgetl profile`` and ``edgetl plan``: sub-commands registered on the main parser.

``add_profile_parser(subparsers)`` and ``add_plan_parser(subparsers)`` each add one sub-command and
set ``handler`` (``args.handler(args) -> int``). Handlers print their result, return an exit code
and raise :class:`edgetl.errors.EdgetlError` for user errors (the main CLI prints one line, exit 2).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from edgetl._allocator import ALLOCATORS
from edgetl._allocator import DEFAULT as DEFAULT_ALLOCATOR
from edgetl.cli.common import blocks_arg, given, non_negative_int, positive_int, write_text
from edgetl.errors import ConfigError
from edgetl.profiler.planner import DEFAULT_BATCH_SIZES, NATIVE_OPTIMIZER, RUNTIMES
from edgetl.profiler.settings import StepSettings
from edgetl.train.config import FASHION_MNIST, config_from_file
from edgetl.train.optim import OPTIMIZERS
from edgetl.train.policy import ACTIVATION_MASKS, METHODS, SAVED_PRECISIONS


def _batch_sizes(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4,8, got {value!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {value!r}")
    return sizes


def _add_source(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--run", metavar="DIR", help="take the model, K, batch, image size and classes from a run directory")
    source.add_argument("--config", metavar="FILE", help="take them from a 'finetune' TOML/JSON config file")


def _run_settings(args: argparse.Namespace) -> StepSettings | None:
    """The step of ``--run`` / ``--config`` (typed, from the run directory's owner), or None."""
    if not (args.run or args.config):
        return None
    from edgetl.data.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
    from edgetl.train.run import Run

    run = Run(args.run) if args.run else None
    config = run.config() if run else config_from_file(args.config)
    # a config file names its data, not its classes; only the embedded dataset's are known
    num_classes = len(run.classes()) if run else (len(FASHION_MNIST_CLASSES) if config.data == FASHION_MNIST else None)
    return StepSettings.of_run(config, num_classes)


def _missing(required: dict[str, object]) -> None:
    missing = [key for key, value in required.items() if value is None]
    if missing:
        raise ConfigError(f"give --{missing[0].replace('_', '-')} (or --run DIR / --config FILE)")


def _add_classes(p: argparse.ArgumentParser) -> None:
    """``--num-classes`` and ``--spare-classes``: the classifier's rows, for profile and plan alike."""
    p.add_argument(
        "--num-classes",
        type=positive_int,
        help=f"classifier outputs (default: the run's classes, else {StepSettings.num_classes})",
    )
    p.add_argument(
        "--spare-classes",
        type=non_negative_int,
        default=StepSettings.spare_classes,
        help="classifier outputs beyond the classes, as 'edgetl export --spare-classes' adds them (default: %(default)s)",
    )


def add_profile_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``edgetl profile``."""
    p = subparsers.add_parser(
        "profile",
        help="per-block memory of training the top K blocks, vanilla against MobileTL",
        description="Bytes stored for backward per block, predicted (analytic) and measured (autograd hooks), for both "
        "vanilla fine-tuning and MobileTL, with parameter, gradient and optimizer-state bytes, a predicted "
        "step peak, and optionally the peak RSS of a real training step in a fresh process.",
    )
    _add_source(p)
    p.add_argument("--model", help="architecture (mobilenet_v2, mobilenet_v3_small, ..., timm:NAME)")
    p.add_argument("--blocks", "-K", type=blocks_arg, help="K: blocks trained from the top, or 'all'")
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--image-size", type=positive_int)
    _add_classes(p)
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help="whose state to count "
        f"(adam/adamw: 2 floats per trained parameter, sgd with momentum: 1; default: the run's, else {StepSettings.optimizer})",
    )
    p.add_argument("--activation-mask", choices=ACTIVATION_MASKS, help="MobileTL's mask storage (default: the run's, else reuse)")
    p.add_argument(
        "--bottom-chunk",
        type=positive_int,
        help="memory option: the frozen bottom in micro-batches (default: the run's, else off)",
    )
    p.add_argument(
        "--saved-precision",
        choices=SAVED_PRECISIONS,
        help="memory option: conv inputs kept for backward (default: the run's, else fp32)",
    )
    p.add_argument(
        "--recompute",
        action=argparse.BooleanOptionalAction,
        help="memory option: recompute trained blocks in backward (default: the run's, else off)",
    )
    p.add_argument("--json", metavar="F", help="also write the report as JSON to F")
    p.add_argument("--plot", metavar="F.png", help="write a per-block bar chart, vanilla against MobileTL (needs matplotlib)")
    p.add_argument("--process", action="store_true", help="also measure peak RSS of a real training step in a fresh process (slow)")
    p.add_argument(
        "--timeline",
        metavar="F.png",
        help="also record one real training step per method (live bytes by phase, torch's allocation events, a child process each) "
        "and plot it",
    )
    p.add_argument("--all-rows", action="store_true", help="print every frozen unit instead of one line for the frozen bottom")
    p.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        default=DEFAULT_ALLOCATOR,
        help="the malloc of the --process and --timeline child processes, as edgetl finetune's (default: %(default)s)",
    )
    p.set_defaults(handler=profile_command)
    return p


def profile_command(args: argparse.Namespace) -> int:
    """Handler of ``edgetl profile``."""
    from edgetl.models.zoo import num_blocks
    from edgetl.profiler.plot import plot_report
    from edgetl.profiler.render import render_report
    from edgetl.profiler.report import profile
    from edgetl.train.policy import TrainPolicy

    base = _run_settings(args)
    if base is None:
        _missing({"model": args.model, "blocks": args.blocks, "batch_size": args.batch_size, "image_size": args.image_size})
        base = StepSettings(args.model, TrainPolicy(0), args.batch_size, args.image_size)
    model = args.model or base.model
    blocks = num_blocks(model) if args.blocks == "all" else args.blocks
    settings = base.with_overrides(
        model=model, blocks=blocks, batch_size=args.batch_size, image_size=args.image_size, num_classes=args.num_classes,
        spare_classes=args.spare_classes, optimizer=args.optimizer, activation_mask=args.activation_mask, bottom_chunk=args.bottom_chunk,
        saved_precision=args.saved_precision, recompute=args.recompute,
    )  # fmt: skip
    report = profile(
        settings.model,
        settings.policy,
        batch_size=settings.batch_size,
        image_size=settings.image_size,
        num_classes=settings.outputs,
        optimizer=settings.optimizer,
        measure_process=args.process,
        allocator=args.allocator,
    )
    print(render_report(report, collapse_frozen=not args.all_rows))
    if args.json:
        write_text(args.json, report.to_json() + "\n")
        print(f"JSON report written to {args.json}")
    if args.plot:
        plot_report(report, args.plot)
        print(f"plot written to {args.plot}")
    if args.timeline:
        _timeline(settings, args.allocator, args.timeline)
    return 0


def _timeline(settings: StepSettings, allocator: str, out: str) -> None:
    from edgetl.models.zoo import load_model
    from edgetl.profiler.estimate import predict_step_peak
    from edgetl.profiler.plot import plot_timelines
    from edgetl.profiler.render import render_timelines
    from edgetl.profiler.timeline import measure_step_timelines

    print("recording one training step per method (a child process each) ...", flush=True)
    sizes = {"batch_size": settings.batch_size, "image_size": settings.image_size, "optimizer": settings.optimizer}
    timelines = measure_step_timelines(settings.model, settings.policy, num_classes=settings.outputs, allocator=allocator, **sizes)
    model = load_model(settings.model, num_classes=settings.outputs)
    estimates = {m: predict_step_peak(model, replace(settings.policy, method=m), **sizes) for m in timelines}
    print(render_timelines(timelines, estimates))
    plot_timelines(timelines, estimates, out)
    print(f"timeline written to {out}")


def add_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``edgetl plan``."""
    p = subparsers.add_parser(
        "plan",
        help="the largest K, then batch size, whose predicted peak fits a device",
        description="Choose the largest number of trained blocks K, then the largest batch size, whose predicted training "
        "peak (runtime included) fits the device's memory budget minus its safety margin.",
    )
    p.add_argument("--device", required=True, metavar="device_profiles/NAME.toml", help="device profile (TOML)")
    _add_source(p)
    p.add_argument("--model", help="architecture (or take it from --run / --config)")
    p.add_argument("--image-size", type=positive_int, help=f"input side in pixels (default: the run's, else {StepSettings.image_size})")
    p.add_argument("--method", choices=METHODS, help="default: the run's, else mobiletl")
    _add_classes(p)
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help=f"optimizer (default: {StepSettings.optimizer} for eager, {NATIVE_OPTIMIZER} with momentum for native; "
        "native runs sgd or adamw: 1 or 2 floats of state per trained parameter)",
    )
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="eager",
        help="what trains on the device: PyTorch (eager) or deploy/native's edgetl-device (native; emits the training "
        "program per K to read its memory plan, a minute each; default: %(default)s)",
    )
    p.add_argument(
        "--images",
        type=positive_int,
        default=1000,
        help="native runtime: training images on the device, features cached (default: %(default)s)",
    )
    p.add_argument(
        "--batch-sizes",
        type=_batch_sizes,
        default=DEFAULT_BATCH_SIZES,
        help=f"candidate batch sizes (default {','.join(map(str, DEFAULT_BATCH_SIZES))})",
    )
    p.add_argument(
        "--runner-ups", type=non_negative_int, default=4, help="how many next-best configurations to show (default: %(default)s)"
    )
    p.add_argument(
        "--max-blocks",
        type=positive_int,
        help="the largest K considered, e.g. to bound training time or the native runtime's emissions (default: all blocks)",
    )
    p.add_argument("--json", metavar="F", help="also write the plan as JSON to F")
    p.set_defaults(handler=plan_command)
    return p


def plan_command(args: argparse.Namespace) -> int:
    """Handler of ``edgetl plan``."""
    import json

    from edgetl.profiler.planner import plan

    base = _run_settings(args)
    known = {} if base is None else {"model": base.model, "image_size": base.image_size, "method": base.policy.method}
    if base is not None:
        known["num_classes"] = base.num_classes
    # the flags given win over the run's; what neither says takes plan()'s defaults
    settings = {
        **known,
        **given(model=args.model, image_size=args.image_size, method=args.method, num_classes=args.num_classes, optimizer=args.optimizer),
    }
    _missing({"model": settings.get("model")})
    image_size = settings.get("image_size", StepSettings.image_size)
    num_classes = settings["num_classes"] = settings.get("num_classes", StepSettings.num_classes) + args.spare_classes
    program_memory = verify_program = None
    if args.runtime == "native":
        from edgetl.exporter.config import ExportConfig
        from edgetl.exporter.training import program_memory as emit_memory
        from edgetl.exporter.training import verify_program as export_and_verify
        from edgetl.models.zoo import load_model

        model = load_model(settings["model"], num_classes=num_classes)

        def program_memory(policy, batch_size):
            print(f"  emitting the training program for K={policy.blocks} batch {batch_size} (its memory plan) ...", flush=True)
            return emit_memory(model, policy, batch_size=batch_size, image_size=image_size, num_classes=num_classes)

        def verify_program(policy, batch_size):
            # the exporter's default settings of the chosen optimizer, as `edgetl export --training` verifies them
            sgd = ExportConfig(optimizer=settings.get("optimizer", NATIVE_OPTIMIZER))
            print(f"  exporting and verifying the training program for K={policy.blocks} batch {batch_size} ...", flush=True)
            export_and_verify(
                model, policy, batch_size=batch_size, image_size=image_size, num_classes=num_classes,
                lr=sgd.lr, momentum=sgd.momentum, weight_decay=sgd.weight_decay, optimizer=sgd.optimizer,
            )  # fmt: skip

    result = plan(
        args.device,
        settings.pop("model"),
        **settings,
        batch_sizes=args.batch_sizes,
        runner_ups=args.runner_ups,
        runtime=args.runtime,
        program_memory=program_memory,
        verify_program=verify_program,
        images=args.images,
        max_blocks=args.max_blocks,
    )
    print(result.render())
    if args.json:
        write_text(args.json, json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"JSON plan written to {args.json}")
    return 0
