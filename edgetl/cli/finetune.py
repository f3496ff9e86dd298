"""``edgetl finetune``: flags over :class:`~edgetl.train.config.FinetuneConfig`, then :func:`~edgetl.finetune`.

Precedence: the run's own ``config.json`` (with ``--resume``) < ``--config FILE`` < flags. Flags
left out are not defaults: they leave the lower layers' values in place; ``--help`` shows the
defaults of :class:`FinetuneConfig` that apply when no layer sets a value.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from edgetl._allocator import ALLOCATORS
from edgetl._allocator import DEFAULT as DEFAULT_ALLOCATOR
from edgetl.cli.common import blocks_arg
from edgetl.models.zoo import MODELS
from edgetl.train.config import SCHEDULES, FinetuneConfig
from edgetl.train.optim import OPTIMIZERS
from edgetl.train.policy import ACTIVATION_GRADS, ACTIVATION_MASKS, METHODS, SAVED_PRECISIONS, TrainPolicy

MODEL_NAMES = sorted(MODELS)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(FinetuneConfig) if f.default is not dataclasses.MISSING}
_DEFAULTS.update({f.name: f.default for f in dataclasses.fields(TrainPolicy) if f.default is not dataclasses.MISSING})
_DEFAULTS["blocks"] = FinetuneConfig().policy.blocks


def _default(name: str, text: str = "") -> str:
    return f"{text} (default: {_DEFAULTS[name]})".strip()


def add_finetune_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("finetune", help="fine-tune the top K blocks of a pretrained model", argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="TOML or JSON file of settings; flags override it")
    p.add_argument("--model", help=_default("model", "architecture: " + ", ".join(MODEL_NAMES) + ", or timm:NAME (edgetl[timm])"))
    p.add_argument("--weights", help="DEFAULT (pretrained) or a local state-dict file (default: random initialisation)")
    p.add_argument("--data", help=_default("data", "ImageFolder directory (one subfolder per class) or 'fashion-mnist'"))
    p.add_argument("--val-data", help="separate ImageFolder for validation (default: hold out --val-fraction)")
    p.add_argument("--val-fraction", type=float, help=_default("val_fraction"))
    p.add_argument("--train-limit", type=int, help="train on a seeded random subset of this many images (default: all)")
    p.add_argument("--val-limit", type=int, help="validate on a seeded random subset of this many images (default: all)")
    p.add_argument("--out", help=_default("out", "run directory (config.json, metrics.csv, checkpoint.pt, model.pt)"))
    p.add_argument("--blocks", type=blocks_arg, help=_default("blocks", "K: inverted-residual blocks trained from the top, or 'all'"))
    p.add_argument("--method", choices=METHODS, help=_default("method"))
    p.add_argument("--activation-grad", choices=ACTIVATION_GRADS, help=_default("activation_grad"))
    p.add_argument("--activation-mask", choices=ACTIVATION_MASKS, help=_default("activation_mask"))
    p.add_argument("--bottom-chunk", type=int, help="run the frozen bottom in micro-batches of this many images (default: the whole batch)")
    p.add_argument("--saved-precision", choices=SAVED_PRECISIONS, help=_default("saved_precision", "conv inputs kept for backward"))
    p.add_argument(
        "--recompute", action="store_true", help="keep only each trained block's input, recompute the block in backward (default: off)"
    )
    p.add_argument("--epochs", type=int, help=_default("epochs"))
    p.add_argument("--batch-size", type=int, help=_default("batch_size"))
    p.add_argument("--lr", type=float, help=_default("lr"))
    p.add_argument("--optimizer", choices=OPTIMIZERS, help=_default("optimizer"))
    p.add_argument("--momentum", type=float, help=_default("momentum", "of SGD"))
    p.add_argument("--weight-decay", type=float, help=_default("weight_decay", "not on norms and biases"))
    p.add_argument("--schedule", choices=SCHEDULES, help=_default("schedule"))
    p.add_argument("--warmup-epochs", type=float, help=_default("warmup_epochs"))
    p.add_argument("--label-smoothing", type=float, help=_default("label_smoothing"))
    p.add_argument("--image-size", type=int, help=_default("image_size"))
    p.add_argument("--no-augment", dest="augment", action="store_false", help="train on centre crops (default: augment)")
    p.add_argument("--cache-features", action="store_true", help="compute the frozen bottom once per image and view (default: off)")
    p.add_argument("--cache-views", type=int, help=_default("cache_views", "augmented views cached per image"))
    p.add_argument("--seed", type=int, help=_default("seed"))
    p.add_argument("--workers", type=int, help=_default("workers", "data-loading worker processes"))
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        default=DEFAULT_ALLOCATOR,
        help="the process's malloc: jemalloc lowers the peak RSS ~5-10%% for ~10%% more time, jemalloc-eager ~20%% for 1.3-1.8x; "
        f"auto: jemalloc where installed, else glibc; not part of the run's settings (default: {DEFAULT_ALLOCATOR})",
    )
    p.set_defaults(handler=run_finetune)
    return p


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The three layers merged (see the module docstring)."""
    from edgetl.train.config import load_config_file
    from edgetl.train.run import Run

    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", "resume", "debug", "verbose", "handler", "allocator")}
    values: dict[str, Any] = {}
    source = "command line"
    if getattr(args, "resume", False) and "out" in given and Run(given["out"]).is_run():
        values.update(Run(given["out"]).saved_values())
    if getattr(args, "config", None):
        file_values = load_config_file(args.config)
        values.update(file_values)
        source = args.config
    values.update(given)
    from edgetl.errors import ConfigError

    try:
        return FinetuneConfig.from_dict(values)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}" if source != "command line" else str(exc)) from None


def run_finetune(args: argparse.Namespace) -> int:
    from edgetl._allocator import active, resolve
    from edgetl.train.run import FINAL_WEIGHTS
    from edgetl.train.trainer import finetune

    config = config_from_args(args)
    p = config.policy
    note = resolve(getattr(args, "allocator", DEFAULT_ALLOCATOR)).note  # auto's fallback to glibc, logged with the run
    malloc = active() + (f"; {note}" if note else "")
    print(f"edgetl finetune: {config.model} K={p.blocks} {p.method} on {config.data} -> {config.out} (malloc: {malloc})", flush=True)
    result = finetune(config, resume=getattr(args, "resume", False), log=lambda line: print(line, flush=True))
    final = result.final
    print(
        f"final val_acc {100 * final['val_acc']:.2f}% val_loss {final['val_loss']:.4f} ({len(result.classes)} classes); "
        f"weights in {result.run_dir / FINAL_WEIGHTS}"
    )
    return 0
