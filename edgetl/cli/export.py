"""``edgetl export``: a fine-tuning run (or weights file) to a bundle of ExecuTorch programs.

Wired into ``edgetl``'s command line by :func:`add_export_parser`::

    edgetl export --checkpoint runs/flowers --out dist/flowers --training --batch-size 8
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import replace

from edgetl.cli.common import given, non_negative_int, positive_int
from edgetl.exporter.config import OBSERVERS, QUANTIZE, ExportConfig
from edgetl.exporter.errors import ExportError
from edgetl.train.config import FinetuneConfig
from edgetl.train.optim import DEVICE_OPTIMIZERS
from edgetl.train.policy import METHODS


def _betas(value: str) -> tuple[float, float]:
    """``B1,B2`` (checked against [0, 1) by :class:`ExportConfig`)."""
    try:
        b1, b2 = (float(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers B1,B2, got {value!r}") from None
    return b1, b2


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``edgetl export`` (handler in ``set_defaults(handler=...)``)."""
    p = subparsers.add_parser(
        "export",
        help="export a fine-tuned model as ExecuTorch programs (XNNPACK classifier, optional on-device trainer)",
        description="Write a bundle: model.pte (XNNPACK) and, with --training, bottom.pte + train.pte/.ptd for on-device "
        "fine-tuning, plus manifest.json. Every program is checked against eager PyTorch first.",
    )
    p.add_argument("--checkpoint", required=True, help="run directory from 'edgetl finetune', or a weights file (model.pt)")
    p.add_argument(
        "--out",
        required=True,
        help="bundle directory to create (must be new or empty, or an earlier bundle with --force); checked before any work",
    )
    p.add_argument("--training", action="store_true", help="also export the trainable program for on-device fine-tuning")
    p.add_argument(
        "--batch-size", type=positive_int, help=f"training batch size on the device (default: the run's, else {ExportConfig.batch_size})"
    )
    p.add_argument("--image-size", type=positive_int, help=f"input size in pixels (default: the run's, else {ExportConfig.image_size})")
    p.add_argument("--model", help="architecture, for a weights file that does not name it")
    p.add_argument(
        "--blocks",
        type=non_negative_int,
        help=f"K, blocks trained on the device (default: the run's policy, else {FinetuneConfig().policy.blocks})",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        help="how the device trains those blocks (default: the run's policy); vanilla exports the paper's "
        "FT-BLKs baseline of the same K, to measure MobileTL's saving on the device",
    )
    p.add_argument(
        "--optimizer",
        choices=DEVICE_OPTIMIZERS,
        default=ExportConfig.optimizer,
        help="the device's optimizer, named in the manifest and verified against torch.optim's (default: %(default)s)",
    )
    p.add_argument("--lr", type=float, default=ExportConfig.lr, help="on-device learning rate (default: %(default)s)")
    p.add_argument("--momentum", type=float, default=ExportConfig.momentum, help="on-device SGD momentum (default: %(default)s)")
    p.add_argument(
        "--weight-decay",
        type=float,
        default=ExportConfig.weight_decay,
        help="of the on-device optimizer, on conv and linear weights only (default: %(default)s)",
    )
    p.add_argument(
        "--betas",
        type=_betas,
        default=ExportConfig.betas,
        metavar="B1,B2",
        help=f"AdamW's moment decays (default: {','.join(map(str, ExportConfig.betas))})",
    )
    p.add_argument("--eps", type=float, default=ExportConfig.eps, help="AdamW's denominator term (default: %(default)s)")
    p.add_argument(
        "--label-smoothing", type=float, default=ExportConfig.label_smoothing, help="of the on-device loss (default: %(default)s)"
    )
    p.add_argument(
        "--spare-classes",
        type=int,
        default=ExportConfig.spare_classes,
        help="with --training: classifier outputs beyond the run's classes, inert until the device assigns them "
        "classes it learns from its own photos (edgetl-device finetune with new class folders) (default: %(default)s)",
    )
    p.add_argument(
        "--verify-steps",
        type=positive_int,
        default=ExportConfig.verify_steps,
        help="SGD steps checked against eager (default: %(default)s)",
    )
    p.add_argument(
        "--quantize",
        choices=QUANTIZE,
        default=ExportConfig.quantize,
        help="int8: model.pte (and bottom.pte with --training) as PT2E-quantized XNNPACK programs (per-channel symmetric int8 "
        "weights, static int8 activations); the training program stays float32. Needs a run directory: int8 is calibrated "
        "on its training images and refused when it loses more than --max-accuracy-drop on its validation images "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--calibration-data",
        metavar="DIR",
        help="int8: calibrate on images under DIR (any depth, labels ignored) instead of the run's training images; "
        "--spare-classes: centre imprinting on them",
    )
    p.add_argument(
        "--calibration-images",
        type=positive_int,
        default=ExportConfig.calibration_images,
        help="int8: how many images calibrate (--spare-classes: centre imprinting), a subset drawn by --seed (default: %(default)s)",
    )
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=ExportConfig.max_accuracy_drop,
        help="int8: refuse (nothing written) when int8 accuracy on the run's validation images is lower than float32's by "
        "more than this many percentage points (default: %(default)s)",
    )
    p.add_argument(
        "--observer",
        choices=OBSERVERS,
        default=ExportConfig.observer,
        help="int8: how activation ranges are read off the calibration images: their extremes (minmax), extremes averaged "
        "over batches (moving_average), or the range of least quantization error (histogram) (default: %(default)s)",
    )
    p.add_argument(
        "--no-mixed-precision",
        dest="mixed_precision",
        action="store_false",
        help="int8: refuse at once when int8 loses too much, instead of keeping the layers int8 costs most in float32 "
        "(the fewest that bring the drop within --max-accuracy-drop) (default: mixed precision on)",
    )
    p.add_argument(
        "--report",
        metavar="FILE",
        help="int8: write each layer's int8 sensitivity (accuracy, agreement and logits SQNR with that layer alone int8) "
        "and the calibration's activation ranges to FILE (JSON)",
    )
    p.add_argument(
        "--replay-per-class",
        type=non_negative_int,
        default=ExportConfig.replay_per_class,
        metavar="M",
        help="with --training: put a replay set in the bundle, bottom features (int8) of M of the run's training images per "
        "class drawn by --seed (all of a class with fewer), which 'edgetl-device finetune' mixes into its batches "
        "(--replay-ratio) against forgetting; needs a run directory; 0: none (default: %(default)s)",
    )
    p.add_argument(
        "--qat-epochs",
        type=non_negative_int,
        default=ExportConfig.qat_epochs,
        help="int8: quantization-aware fine-tuning of model.pte's int8 graph for N passes over the calibration images "
        "(distilled from the float32 model; raise --calibration-images to give it more), instead of post-training "
        "quantization and mixed precision; 0: post-training (default: %(default)s)",
    )
    p.add_argument(
        "--qat-lr", type=float, default=ExportConfig.qat_lr, help="int8: Adam learning rate of --qat-epochs (default: %(default)s)"
    )
    p.add_argument(
        "--seed",
        type=non_negative_int,
        default=ExportConfig.seed,
        help="of the calibration subset, the replay set and the checks (default: %(default)s)",
    )
    p.add_argument(
        "--device-weights",
        metavar="STATE_DIR|PTD",
        help="export with weights trained on the device: an 'edgetl-device finetune --state' directory (its last epoch) or "
        "a .ptd in one; its state.json must name the checkpoint's model and its classes, then any the device added from "
        "spare outputs (they become classes of the bundle); a device trained from a bundle with other classes is refused. "
        "A bare .ptd with no state.json beside it is checked only for tensor names "
        "and sizes, which cannot tell a class order apart",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the bundle in --out: refused when --out holds anything else than that bundle's files "
        "(manifest.json and the files it lists), which are never deleted; the old bundle stays in place until the "
        "new one is complete, and the two are exchanged atomically",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also show third-party warnings and log lines (PyTorch, ExecuTorch, torchao), which are hidden by default",
    )
    p.set_defaults(handler=run_export)
    return p


def run_export(args: argparse.Namespace) -> int:
    """Handler of ``edgetl export``; returns the exit code, raises EdgetlError for user errors."""
    from pathlib import Path

    from edgetl.exporter.bundle import check_output_dir

    check_output_dir(Path(args.out), overwrite=args.force)  # before any work: a bad --out costs nothing
    with third_party_output(verbose=args.verbose):
        return _run_export(args)


def _run_export(args: argparse.Namespace) -> int:
    from edgetl.exporter.pipeline import export
    from edgetl.exporter.weights import apply_device_weights, device_weights_file, load_weights
    from edgetl.train.run import read_weights

    trained = read_weights(args.checkpoint, model=args.model)
    state, classes = trained.state_dict, trained.classes
    if args.device_weights:
        ptd, device_classes = device_weights_file(args.device_weights, model_name=trained.model_name, classes=trained.classes)
        state = apply_device_weights(state, ptd)
        classes = device_classes or classes  # with the classes the device added (spare outputs)
    num_classes = len(classes) if classes else trained.num_classes
    model = load_weights(trained.model_name, state, num_classes, source=trained.source)
    # the run's policy with the flags given replacing fields: its memory options reach the exporter's refusal
    policy = replace(trained.policy or FinetuneConfig().policy, **given(blocks=args.blocks, method=args.method))
    if (
        args.quantize == "none"
        and not args.spare_classes
        and (args.calibration_data or args.calibration_images != ExportConfig.calibration_images)
    ):
        raise ExportError(
            "--calibration-data and --calibration-images calibrate an int8 export (or centre --spare-classes): add --quantize int8"
        )
    if args.quantize == "none" and (args.report or args.observer != ExportConfig.observer):
        raise ExportError("--report and --observer are about an int8 export: add --quantize int8")
    if args.qat_epochs and args.report:
        raise ExportError("--report measures post-training int8, which --qat-epochs replaces: pass one of them")
    config = ExportConfig.for_run(
        trained.config,
        image_size=args.image_size,
        batch_size=args.batch_size,
        training=args.training,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        betas=args.betas,
        eps=args.eps,
        label_smoothing=args.label_smoothing,
        verify_steps=args.verify_steps,
        overwrite=args.force,
        seed=args.seed,
        quantize=args.quantize,
        calibration_images=args.calibration_images,
        max_accuracy_drop=args.max_accuracy_drop,
        observer=args.observer,
        mixed_precision=args.mixed_precision,
        spare_classes=args.spare_classes,
        replay_per_class=args.replay_per_class,
        qat_epochs=args.qat_epochs,
        qat_lr=args.qat_lr,
    )
    log = lambda line: print(line, flush=True)  # noqa: E731
    calibration = validation = replay = None
    if config.quantize == "int8":
        calibration, validation = _int8_images(args, trained, config, log)
    elif config.spare_classes and (trained.config is not None or args.calibration_data):
        calibration = _run_images(args, trained, config, log)
    if config.replay_per_class:
        replay = _replay_images(trained, config, log)
    bundle = export(
        model,
        policy,
        args.out,
        config,
        model_name=trained.model_name,
        classes=classes,
        calibration=calibration,
        validation=validation,
        replay=replay,
        report=args.report,
        log=log,
    )
    print(f"bundle: {bundle.path}")
    return 0


def _run_images(args: argparse.Namespace, trained, config: ExportConfig, log):
    """The run's seeded subset of training images (or ``--calibration-data``'s): the centre a
    spare-class bundle's imprinting starts from."""
    from edgetl.exporter import calibration as cal

    sizes = {"model": trained.model_name, "image_size": config.image_size, "count": config.calibration_images, "seed": config.seed}
    if args.calibration_data:
        return cal.from_directory(args.calibration_data, log=log, **sizes)
    log(f"edgetl export: reading the run's images for the spare classes ({trained.config.data}) ...")
    return cal.from_run(trained.config, log=log, **sizes)[0]


def _int8_images(args: argparse.Namespace, trained, config: ExportConfig, log):
    """The run's calibration subset (or ``--calibration-data``'s) and its validation images."""
    from edgetl.exporter import calibration as cal

    if trained.config is None:
        raise ExportError(
            f"--quantize int8 needs a run directory ({trained.source} is a bare weights file): int8 is checked against "
            "float32 on the run's validation images"
        )
    sizes = {"model": trained.model_name, "image_size": config.image_size, "count": config.calibration_images, "seed": config.seed}
    log(f"edgetl export: reading the run's images for int8 ({trained.config.data}) ...")
    calibration, validation = cal.from_run(trained.config, log=log, **sizes)
    if args.calibration_data:
        calibration = cal.from_directory(args.calibration_data, log=log, **sizes)
    return calibration, validation


def _replay_images(trained, config: ExportConfig, log):
    """The run's training images the replay set is made of (``config.replay_per_class`` per class)."""
    from edgetl.exporter import calibration as cal

    if trained.config is None:
        raise ExportError(f"--replay-per-class needs a run directory ({trained.source} is a bare weights file): it draws the run's images")
    log(f"edgetl export: drawing the replay set's images ({config.replay_per_class} per class of {trained.config.data}) ...")
    return cal.replay_from_run(
        trained.config,
        model=trained.model_name,
        image_size=config.image_size,
        num_classes=trained.num_classes,
        per_class=config.replay_per_class,
        seed=config.seed,
        log=log,
    )


#: loggers of the libraries an export drives; their INFO/WARNING lines are hidden without --verbose
THIRD_PARTY_LOGGERS = ("torch", "executorch", "torchao", "torch._export", "torch.export", "torch._dynamo", "root")


@contextlib.contextmanager
def third_party_output(*, verbose: bool) -> Iterator[None]:
    """Hide what the libraries under the export print (Python warnings, their loggers below ERROR,
    and what native code writes to file descriptor 2: cpuinfo, ExecuTorch's C++ logging); edgetl's
    own lines go to stdout and stay. With ``verbose`` nothing is hidden. The hidden native stderr is
    shown after all if the export fails with something else than an edgetl error (a bug or crash
    report needs it)."""
    if verbose:
        yield
        return
    from edgetl.errors import EdgetlError

    levels = {name: logging.getLogger(None if name == "root" else name).level for name in THIRD_PARTY_LOGGERS}
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(None if name == "root" else name).setLevel(logging.ERROR)
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (a daemon): nothing native can print anyway
        saved = None
    captured = tempfile.TemporaryFile()
    if saved is not None:
        os.dup2(captured.fileno(), 2)
    failed = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except EdgetlError:
        raise
    except BaseException:
        failed = True
        raise
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)
        for name, level in levels.items():
            logging.getLogger(None if name == "root" else name).setLevel(level)
        if failed:
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            sys.stderr.flush()
        captured.close()
