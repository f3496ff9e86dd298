"""The fine-tuning loop behind ``edgetl finetune``.

Reproducibility: every epoch reseeds torch's global generator and the data loader's shuffling from
``(seed, epoch)``, so an epoch's randomness does not depend on what ran before it. A run killed
mid-epoch and resumed from its last end-of-epoch checkpoint therefore ends with the same weights,
bit for bit, as an uninterrupted run.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from edgetl.data.folder import FASHION_MNIST, build_datasets
from edgetl.errors import EdgetlError
from edgetl.models.zoo import load_model, transforms_for
from edgetl.profiler.process import peak_rss_bytes
from edgetl.train.cache import FeatureCache, cache_features
from edgetl.train.checkpoint import atomic_write_json, atomic_write_text, load_torch, save_torch
from edgetl.train.policy import TrainPolicy
from edgetl.train.prepare import TransferModel, prepare

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant")
CHECKPOINT = "checkpoint.pt"
FINAL_WEIGHTS = "model.pt"
CONFIG = "config.json"
METRICS = "metrics.csv"
# fields that may differ between a run and its resumption
_RESUME_FREE = frozenset({"epochs", "workers", "out"})


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that defines a fine-tuning run (saved as ``config.json`` in the run directory).

    ``data`` is an ``ImageFolder`` directory or ``"fashion-mnist"``. ``cache_features`` computes
    the frozen bottom's output once per image (``cache_views`` augmented views, or one
    un-augmented view when ``augment`` is off) and trains the top from that cache.
    """

    model: str = "mobilenet_v2"
    weights: str | None = None
    data: str = FASHION_MNIST
    val_data: str | None = None
    val_fraction: float = 0.1
    train_limit: int | None = None
    val_limit: int | None = None
    out: str = "runs/finetune"
    blocks: int = 2
    method: str = "mobiletl"
    activation_grad: str = "sign"
    activation_mask: str = "reuse"
    epochs: int = 5
    batch_size: int = 8
    lr: float = 3e-4
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.1
    image_size: int = 224
    augment: bool = True
    cache_features: bool = False
    cache_views: int = 1
    seed: int = 0
    workers: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"learning rate must be > 0, got {self.lr}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; expected one of {', '.join(SCHEDULES)}"),
            (0.0 <= self.label_smoothing < 1.0, f"label smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.warmup_epochs >= 0, f"warmup epochs must be >= 0, got {self.warmup_epochs}"),
            (self.cache_views >= 1, f"cache views must be >= 1, got {self.cache_views}"),
            (self.workers >= 0, f"workers must be >= 0, got {self.workers}"),
        ]
        for ok, message in checks:
            if not ok:
                raise EdgetlError(message)
        self.policy()  # validates blocks / method / activation options

    def policy(self) -> TrainPolicy:
        return TrainPolicy(self.blocks, self.method, self.activation_grad, self.activation_mask)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise EdgetlError(f"unknown config key(s): {', '.join(unknown)}")
        return cls(**values)


@dataclass
class FinetuneResult:
    """What a run produced."""

    run_dir: Path
    model: TransferModel
    classes: list[str]
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


class _Progress:
    """A one-line progress bar on stderr, drawn only on a terminal (logs get the epoch line)."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.on = total, label, sys.stderr.isatty()

    def update(self, done: int, loss: float) -> None:
        if self.on:
            width = 30
            filled = int(width * done / max(self.total, 1))
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} loss {loss:.4f}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.on:
            sys.stderr.write("\r" + " " * 79 + "\r")
            sys.stderr.flush()


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


def _optimizer(config: FinetuneConfig, model: nn.Module) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in model.trainable_parameters():
        (no_decay if p.dim() <= 1 else decay).append(p)  # no weight decay on norms and biases
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.Adam(groups, lr=config.lr)


def _schedule(config: FinetuneConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    total = config.epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def evaluate(model: TransferModel, loader: DataLoader, *, from_features: bool = False) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``loader``."""
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            logits = model.forward_top(x) if from_features else model(x)
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def _write_metrics(path: Path, history: list[dict[str, float]]) -> None:
    if not history:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buf.getvalue())


def _epoch_line(row: dict[str, float], epochs: int) -> str:
    return (
        f"epoch {int(row['epoch'])}/{epochs} train_loss {row['train_loss']:.4f} train_acc {100 * row['train_acc']:.2f}% "
        f"val_loss {row['val_loss']:.4f} val_acc {100 * row['val_acc']:.2f}% lr {row['lr']:.3g} "
        f"images/s {row['images_per_s']:.1f} peak_rss {row['peak_rss_bytes'] / 2**20:.1f}MiB"
    )


def _check_resumable(saved: dict[str, Any], config: FinetuneConfig) -> None:
    diff = [k for k, v in config.to_dict().items() if k not in _RESUME_FREE and saved.get(k) != v]
    if diff:
        raise EdgetlError(f"cannot resume: the run was made with different {', '.join(diff)}")


def finetune(
    config: FinetuneConfig,
    *,
    resume: bool = False,
    on_step: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = print,
) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``config.data`` under ``config.policy()``.

    Writes to ``config.out``: ``config.json`` (the resolved config), ``metrics.csv`` (one row an
    epoch), ``checkpoint.pt`` (after every epoch, atomically: model, optimizer, schedule,
    history) and ``model.pt`` (final weights, loadable with :func:`edgetl.load_model`).

    Args:
        config: the run.
        resume: continue the run in ``config.out`` from its last checkpoint (at most the
            interrupted epoch is lost). Without it ``config.out`` must not hold another run.
        on_step: called as ``on_step(epoch, step)`` after every optimizer step.
        log: where progress lines go.
    """
    out = Path(config.out)
    ckpt_path = out / CHECKPOINT
    state = None
    if resume and ckpt_path.is_file():
        state = load_torch(ckpt_path)
        _check_resumable(json.loads(state["config"]), config)
    elif not resume and out.exists() and any(out.iterdir()):
        raise EdgetlError(f"run directory {out} already holds files; pass --resume to continue it or choose another --out")

    policy = config.policy()
    data = build_datasets(
        config.data,
        train_transform=transforms_for(config.model, image_size=config.image_size, train=config.augment),
        eval_transform=transforms_for(config.model, image_size=config.image_size, train=False),
        val_data=config.val_data,
        val_fraction=config.val_fraction,
        train_limit=config.train_limit,
        val_limit=config.val_limit,
        seed=config.seed,
    )
    if len(data.train) < config.batch_size:
        raise EdgetlError(f"{len(data.train)} training images is fewer than one batch of {config.batch_size}")
    torch.manual_seed(config.seed)
    model = prepare(load_model(config.model, weights=config.weights, num_classes=len(data.classes)), policy)
    optimizer = _optimizer(config, model)
    steps_per_epoch = len(data.train) // config.batch_size  # drop_last: train-mode BN needs > 1 sample
    scheduler = _schedule(config, optimizer, steps_per_epoch)
    history: list[dict[str, float]] = []
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, start_epoch = list(state["history"]), int(state["epoch"])
        log(f"resuming {out} after epoch {start_epoch}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CONFIG, {**config.to_dict(), "classes": data.classes, "policy": policy.to_dict()})

    train_source = data.train if config.augment else data.train_eval
    cache: FeatureCache | None = None
    val_source: Dataset = data.val
    if config.cache_features:
        views = config.cache_views if config.augment else 1
        t0 = time.perf_counter()
        cache = cache_features(
            model, train_source, views=views, seed=config.seed, batch_size=max(config.batch_size, 32), workers=config.workers
        )
        val_source = cache_features(
            model, data.val, views=1, seed=config.seed, batch_size=max(config.batch_size, 32), workers=config.workers
        ).view(0)
        log(f"cached bottom features: {cache.nbytes / 2**20:.1f}MiB for {views} view(s) in {time.perf_counter() - t0:.1f}s")
    val_loader = DataLoader(val_source, batch_size=2 * config.batch_size, num_workers=0 if cache else config.workers)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    for epoch in range(start_epoch, config.epochs):
        torch.manual_seed(_epoch_seed(config.seed, epoch))
        epoch_data = cache.view(epoch % cache.views) if cache else train_source
        loader = DataLoader(
            epoch_data,
            batch_size=config.batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(_epoch_seed(config.seed, epoch)),
            num_workers=0 if cache else config.workers,
        )
        model.train()
        progress = _Progress(len(loader), f"epoch {epoch + 1}/{config.epochs}")
        loss_sum, correct, seen = 0.0, 0, 0
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(loader):
            logits = model.forward_top(x) if cache else model(x)
            loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += len(y)
            progress.update(step + 1, loss_sum / seen)
            if on_step is not None:
                on_step(epoch, step)
        progress.close()
        seconds = time.perf_counter() - t0
        val_loss, val_acc = evaluate(model, val_loader, from_features=cache is not None)
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": scheduler.get_last_lr()[0],
            "images_per_s": seen / seconds,
            "epoch_seconds": seconds,
            "peak_rss_bytes": peak_rss_bytes(),
        }
        history.append(row)
        save_torch(
            ckpt_path,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "history": history,
                "config": json.dumps(config.to_dict()),
            },
        )
        _write_metrics(out / METRICS, history)
        log(_epoch_line(row, config.epochs))

    save_torch(
        out / FINAL_WEIGHTS,
        {
            "model": model.state_dict(),
            "model_name": config.model,
            "classes": data.classes,
            "policy": json.dumps(policy.to_dict()),
        },
    )
    return FinetuneResult(out, model, data.classes, history)
