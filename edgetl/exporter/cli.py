"""``edgetl export``: a fine-tuning run (or weights file) to a bundle of ExecuTorch programs.

Wired into ``edgetl``'s command line by :func:`add_export_parser`::

    edgetl export --checkpoint runs/flowers --out dist/flowers --training --batch-size 8
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetl.errors import EdgetlError

CONFIG = "config.json"
FINAL_WEIGHTS = "model.pt"
TRAINER_CHECKPOINT = "checkpoint.pt"


@dataclass
class Checkpoint:
    """What an export needs from a run directory or weights file."""

    model_name: str
    state_dict: dict[str, Any]
    classes: list[str] | None
    policy: dict[str, Any] | None
    config: dict[str, Any]
    source: str


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EdgetlError(f"cannot read {path}: {exc}") from None
    if not isinstance(value, dict):
        raise EdgetlError(f"{path} does not hold a JSON object")
    return value


def read_checkpoint(path: str | Path, *, model: str | None = None) -> Checkpoint:
    """Read a run directory from ``edgetl finetune`` (config.json + model.pt, or its last
    checkpoint.pt while the run is unfinished) or a weights file (edgetl's model.pt / checkpoint.pt,
    or a plain state dict with ``model`` naming the architecture)."""
    from edgetl.train.checkpoint import load_torch

    path = Path(path)
    config: dict[str, Any] = {}
    if path.is_dir():
        if not (path / CONFIG).is_file():
            raise EdgetlError(f"{path} is not an edgetl run directory (no {CONFIG})")
        config = _read_json(path / CONFIG)
        weights = path / FINAL_WEIGHTS if (path / FINAL_WEIGHTS).is_file() else path / TRAINER_CHECKPOINT
        if not weights.is_file():
            raise EdgetlError(f"{path} holds no weights ({FINAL_WEIGHTS} or {TRAINER_CHECKPOINT}); has the run finished an epoch?")
    elif path.is_file():
        weights = path
        if (path.parent / CONFIG).is_file():
            config = _read_json(path.parent / CONFIG)
    else:
        raise EdgetlError(f"checkpoint {path} does not exist")
    try:
        data = load_torch(weights)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is an unreadable file to the user
        first = (str(exc).splitlines() or [""])[0]
        raise EdgetlError(f"cannot read weights from {weights}: {type(exc).__name__}: {first}") from None
    if not isinstance(data, dict):
        raise EdgetlError(f"{weights} does not hold a state dict")
    if isinstance(data.get("config"), str):  # the trainer's checkpoint.pt
        config = {**json.loads(data["config"]), **config}
    state = data.get("model") if isinstance(data.get("model"), dict) else data
    names = [n for n in (model, data.get("model_name"), config.get("model")) if n]
    if not names:
        raise EdgetlError(f"{weights} does not say which architecture it is; pass --model")
    if len(set(names)) > 1:
        raise EdgetlError(
            f"checkpoint from another model: {weights} holds {data.get('model_name') or config.get('model')} "
            f"weights but {'--model says ' + model if model else CONFIG + ' says ' + str(config.get('model'))}"
        )
    policy = data.get("policy")
    policy = json.loads(policy) if isinstance(policy, str) else (policy or config.get("policy"))
    classes = data.get("classes") or config.get("classes")
    return Checkpoint(names[0], state, list(classes) if classes else None, policy, config, str(weights))


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``edgetl export`` (handler in ``set_defaults(handler=...)``)."""
    p = subparsers.add_parser(
        "export",
        help="export a fine-tuned model as ExecuTorch programs (XNNPACK classifier, optional on-device trainer)",
        description="Write a bundle: model.pte (XNNPACK) and, with --training, bottom.pte + train.pte/.ptd for on-device "
        "fine-tuning, plus manifest.json. Every program is checked against eager PyTorch first.",
    )
    p.add_argument("--checkpoint", required=True, help="run directory from 'edgetl finetune', or a weights file (model.pt)")
    p.add_argument("--out", required=True, help="bundle directory to create (must be new or empty)")
    p.add_argument("--training", action="store_true", help="also export the trainable program for on-device fine-tuning")
    p.add_argument("--batch-size", type=int, help="training batch size on the device (default: the run's, else 8)")
    p.add_argument("--image-size", type=int, help="input size in pixels (default: the run's, else 224)")
    p.add_argument("--model", help="architecture, for a weights file that does not name it")
    p.add_argument("--blocks", type=int, help="K, blocks trained on the device (default: the run's policy)")
    p.add_argument(
        "--method",
        choices=("mobiletl", "vanilla"),
        help="how the device trains those blocks (default: the run's policy); vanilla exports the paper's "
        "FT-BLKs baseline of the same K, to measure MobileTL's saving on the device",
    )
    p.add_argument("--lr", type=float, default=0.01, help="on-device SGD learning rate (default 0.01)")
    p.add_argument("--momentum", type=float, default=0.9, help="on-device SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="on-device SGD weight decay (default 0)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="of the on-device loss (default 0)")
    p.add_argument("--verify-steps", type=int, default=3, help="SGD steps checked against eager PyTorch (default 3)")
    p.add_argument("--device-weights", help="a .ptd written by on-device fine-tuning (trained.ptd): export with those weights")
    p.add_argument("--force", action="store_true", help="replace an existing bundle in --out")
    p.set_defaults(handler=run_export)
    return p


def apply_device_weights(state: dict[str, Any], ptd: str | Path) -> dict[str, Any]:
    """``state`` with the tensors of a device-written ``.ptd`` (trained parameters, running
    statistics) put in place; names and shapes must match."""
    import torch

    from edgetl.exporter import _executorch as et

    path = Path(ptd)
    try:
        tensors = et.read_ptd(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise EdgetlError(f"cannot read device weights {path}: {exc}") from None
    state = dict(state)
    for name, value in tensors.items():
        if name not in state:
            raise EdgetlError(f"device weights {path} hold {name}, which the checkpoint does not have (another model?)")
        if value.size != state[name].numel():
            raise EdgetlError(f"device weights {path}: {name} has {value.size} values, the checkpoint {state[name].numel()}")
        state[name] = torch.from_numpy(value.copy()).reshape(state[name].shape).to(state[name].dtype)
    return state


def run_export(args: argparse.Namespace) -> int:
    """Handler of ``edgetl export``; returns the exit code, raises EdgetlError for user errors."""
    from edgetl.exporter.pipeline import export, load_weights
    from edgetl.train.policy import TrainPolicy

    ckpt = read_checkpoint(args.checkpoint, model=args.model)
    if getattr(args, "device_weights", None):
        ckpt.state_dict = apply_device_weights(ckpt.state_dict, args.device_weights)
    shapes = [v.shape for k, v in ckpt.state_dict.items() if k.endswith("weight") and getattr(v, "dim", lambda: 0)() == 2]
    if not shapes:
        raise EdgetlError(f"{ckpt.source} holds no classifier weights")
    model = load_weights(ckpt.model_name, ckpt.state_dict, int(shapes[-1][0]), source=ckpt.source)
    policy_values = dict(ckpt.policy or {"blocks": ckpt.config.get("blocks", 2)})
    if args.blocks is not None:
        policy_values["blocks"] = args.blocks
    if getattr(args, "method", None) is not None:
        policy_values["method"] = args.method
    try:
        policy = TrainPolicy(**{k: v for k, v in policy_values.items() if k in ("blocks", "method", "activation_grad", "activation_mask")})
    except (TypeError, ValueError) as exc:
        raise EdgetlError(f"bad training policy in {ckpt.source}: {exc}") from None
    image_size = args.image_size or int(ckpt.config.get("image_size", 224))
    batch_size = args.batch_size or int(ckpt.config.get("batch_size", 8))
    bundle = export(
        model,
        policy,
        args.out,
        image_size=image_size,
        batch_size=batch_size,
        model_name=ckpt.model_name,
        classes=ckpt.classes,
        training=args.training,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        verify_steps=args.verify_steps,
        overwrite=args.force,
        log=lambda line: print(line, flush=True),
    )
    print(f"bundle: {bundle.path}")
    return 0
