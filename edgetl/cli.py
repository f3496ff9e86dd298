"""``edgetl`` command line: a thin layer over the Python API.

Errors caused by the user's input are printed as one ``edgetl: error: ...`` line with exit code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

from edgetl.errors import EdgetlError
from edgetl.exporter.cli import add_export_parser
from edgetl.profiler.cli import add_plan_parser, add_profile_parser


def _load_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise EdgetlError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        values = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise EdgetlError(f"config file {path} is not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {exc}") from None
    if not isinstance(values, dict):
        raise EdgetlError(f"config file {path} must hold a table of settings")
    return {k.replace("-", "_"): v for k, v in values.items()}


def _blocks(value: str) -> int | str:
    return "all" if value == "all" else int(value)


def _add_finetune(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("finetune", help="fine-tune the top K blocks of a pretrained model", argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="TOML or JSON file of settings; flags override it")
    p.add_argument("--model", help="architecture (mobilenet_v2, mobilenet_v3_small, mobilenet_v3_large, efficientnet_b0, ...)")
    p.add_argument("--weights", help="DEFAULT (pretrained) or a local state-dict file; omit for random init")
    p.add_argument("--data", help="ImageFolder directory (one subfolder per class) or 'fashion-mnist'")
    p.add_argument("--val-data", help="separate ImageFolder for validation (else --val-fraction is held out)")
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--train-limit", type=int, help="train on a seeded random subset of this many images")
    p.add_argument("--val-limit", type=int, help="validate on a seeded random subset of this many images")
    p.add_argument("--out", help="run directory (config.json, metrics.csv, checkpoint.pt, model.pt)")
    p.add_argument("--blocks", type=_blocks, help="K: inverted-residual blocks trained from the top, or 'all'")
    p.add_argument("--method", choices=["mobiletl", "vanilla"])
    p.add_argument("--activation-grad", choices=["sign", "exact"])
    p.add_argument("--activation-mask", choices=["reuse", "packed"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"])
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", choices=["cosine", "constant"])
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--image-size", type=int)
    p.add_argument("--no-augment", dest="augment", action="store_false", help="train on centre crops, no augmentation")
    p.add_argument("--cache-features", action="store_true", help="compute the frozen bottom once per image and view")
    p.add_argument("--cache-views", type=int, help="augmented views cached per image (with augmentation on)")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="data-loading worker processes")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    return p


def _finetune(args: argparse.Namespace) -> int:
    from edgetl.models.zoo import load_model
    from edgetl.train.trainer import CONFIG, FinetuneConfig, finetune

    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", "resume", "debug", "handler")}
    resume = getattr(args, "resume", False)
    values: dict[str, Any] = {}
    if resume and "out" in given and (Path(given["out"]) / CONFIG).is_file():
        saved = json.loads((Path(given["out"]) / CONFIG).read_text())
        names = {f.name for f in dataclasses.fields(FinetuneConfig)}
        values.update({k: v for k, v in saved.items() if k in names})
    if getattr(args, "config", None):
        values.update(_load_config_file(args.config))
    values.update(given)
    if values.get("blocks") == "all":
        from edgetl.models.blocks import find_blocks

        values["blocks"] = len(find_blocks(load_model(values.get("model", FinetuneConfig.model), num_classes=2)))
    config = FinetuneConfig.from_dict(values)
    print(f"edgetl finetune: {config.model} K={config.blocks} {config.method} on {config.data} -> {config.out}", flush=True)
    result = finetune(config, resume=resume, log=lambda line: print(line, flush=True))
    final = result.final
    print(
        f"final val_acc {100 * final['val_acc']:.2f}% val_loss {final['val_loss']:.4f} ({len(result.classes)} classes); "
        f"weights in {result.run_dir / 'model.pt'}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgetl", description="On-device transfer learning with inverted residual blocks (MobileTL)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_finetune(sub).set_defaults(handler=_finetune)
    add_profile_parser(sub)
    add_plan_parser(sub)
    add_export_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (EdgetlError, ValueError, TypeError) as exc:
        if args.debug:
            raise
        print(f"edgetl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgetl: interrupted (the last completed epoch is saved; continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
