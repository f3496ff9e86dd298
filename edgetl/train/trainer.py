"""The fine-tuning loop behind ``edgetl finetune``.

Reproducibility: every epoch seeds the augmentation (torch's global generator, forked for the run
so the caller's state is untouched) and the data loader's shuffling from ``(seed, epoch)``, so an
epoch's randomness does not depend on what ran before it. A run killed
mid-epoch and resumed from its last end-of-epoch checkpoint therefore ends with the same weights,
bit for bit, as an uninterrupted run.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from edgetl._format import format_size
from edgetl._rss import available_memory_bytes, peak_rss_bytes
from edgetl.data.folder import build_datasets
from edgetl.errors import ConfigError, DataError, DivergedError
from edgetl.models.zoo import load_model, transforms_for
from edgetl.train.cache import FeatureCache, cache_features
from edgetl.train.config import FinetuneConfig
from edgetl.train.optim import build_optimizer
from edgetl.train.prepare import TransferModel, prepare
from edgetl.train.run import Run
from edgetl.train.step import train_step


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
    """Progress within an epoch: a bar redrawn on stderr when it is a terminal; otherwise (a log
    file, a pipe) a ``log`` line at every quarter of the epoch, so a long epoch is never silent."""

    QUARTERS = 4

    def __init__(self, total: int, label: str, log: Callable[[str], None]) -> None:
        self.total, self.label, self.log, self.on = total, label, log, sys.stderr.isatty()
        self.every = max(1, total // self.QUARTERS)

    def update(self, done: int, loss: float) -> None:
        if self.on:
            width = 30
            filled = int(width * done / max(self.total, 1))
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} loss {loss:.4f}")
            sys.stderr.flush()
        elif done % self.every == 0 and done < self.total:  # the epoch line reports the end
            self.log(f"{self.label} step {done}/{self.total} loss {loss:.4f}")

    def close(self) -> None:
        if self.on:
            sys.stderr.write("\r" + " " * 79 + "\r")
            sys.stderr.flush()


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


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


def _diverged(what: str, epoch: int, run: Run) -> DivergedError:
    """Nothing of a diverged epoch is saved: the checkpoint on disk is the last good one."""
    kept = f"the checkpoint of epoch {epoch} in {run.path} is kept" if epoch > 0 else "nothing was saved"
    return DivergedError(f"training diverged: {what}; {kept}. Start again with a lower --lr (or --warmup-epochs) and another --out")


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


def _epoch_line(row: dict[str, float], epochs: int) -> str:
    return (
        f"epoch {int(row['epoch'])}/{epochs} train_loss {row['train_loss']:.4f} train_acc {100 * row['train_acc']:.2f}% "
        f"val_loss {row['val_loss']:.4f} val_acc {100 * row['val_acc']:.2f}% lr {row['lr']:.3g} "
        f"images/s {row['images_per_s']:.1f} peak_rss {row['peak_rss_bytes'] / 2**20:.1f}MiB"
    )


def finetune(
    config: FinetuneConfig,
    *,
    resume: bool = False,
    on_step: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = print,
) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``config.data`` under ``config.policy``.

    Writes the run directory ``config.out`` (:mod:`edgetl.train.run`): ``config.json``,
    ``metrics.csv`` and ``checkpoint.pt`` after every epoch, ``model.pt`` at the end (loadable
    with :func:`edgetl.load_model`).

    Randomness (the new classifier's initialisation, augmentation, shuffling) comes from
    ``config.seed`` and the epoch only; torch's global generator is forked, not reseeded, so the
    caller's random state is left as it was.

    Args:
        config: the run.
        resume: continue the run in ``config.out`` from its last checkpoint (at most the
            interrupted epoch is lost). Without it ``config.out`` must not hold another run.
        on_step: called as ``on_step(epoch, step)`` after every optimizer step.
        log: where progress lines go.
    """
    with torch.random.fork_rng(devices=[]), Run(config.out) as run:  # the run's lock is released on the way out
        return _finetune(config, run, resume=resume, on_step=on_step, log=log)


#: a lower bound on a training step's bytes per input pixel of a batch: the float32 image (3
#: channels) and the stem's output (every supported network's stem has at least 16 channels at
#: half resolution: 4 values per input pixel)
_STEP_BYTES_PER_PIXEL = 4 * (3 + 4)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_resources(config: FinetuneConfig) -> None:
    """Refuse, before any work, settings this machine cannot run: more data-loading workers than
    the CPUs this process may use (each is a process of its own), or a batch whose images and
    first layer alone exceed the memory available to this process (its ``ulimit -v`` and cgroup
    limit included)."""
    cpus = usable_cpus()
    if config.workers > cpus:
        raise ConfigError(f"workers = {config.workers} is more than the {cpus} CPU(s) this process may use")
    batch = max(config.batch_size, 32) if config.cache_features else config.batch_size  # the cache's batches
    need = batch * config.image_size**2 * _STEP_BYTES_PER_PIXEL
    available = available_memory_bytes()
    if need > available:
        raise ConfigError(
            f"a batch of {batch} at {config.image_size} px needs at least {format_size(need)} (the images and the first layer's "
            f"output) but {format_size(available)} is available to this process; lower --batch-size or --image-size"
        )


def _check_cache_memory(model: TransferModel, data, *, views: int) -> None:
    """Refuse a feature cache larger than the memory available to this process, before it is
    built: one image's features (an evaluation view through the frozen bottom) times the images
    cached (``views`` per training image, one per validation image)."""
    model.eval()
    per_image = model.forward_bottom(data.train_eval[0][0].unsqueeze(0)).numel() * 4  # float32
    images = views * len(data.train_eval) + len(data.val)
    need, available = per_image * images, available_memory_bytes()
    if need > available:
        raise ConfigError(
            f"caching {views} view(s) of the bottom's features needs {format_size(need)} ({images} images) but "
            f"{format_size(available)} is available to this process; lower --cache-views or train without --cache-features"
        )


def _finetune(config: FinetuneConfig, run: Run, *, resume: bool, on_step, log) -> FinetuneResult:
    check_resources(config)
    policy = config.policy
    data = build_datasets(
        config.data,
        train_transform=transforms_for(config.model, image_size=config.image_size, train=config.augment),
        eval_transform=transforms_for(config.model, image_size=config.image_size, train=False),
        val_data=config.val_data,
        val_fraction=config.val_fraction,
        train_limit=config.train_limit,
        val_limit=config.val_limit,
        seed=config.seed,
        log=log,  # unreadable images: one warning line in the run's log
    )
    if len(data.train) < config.batch_size:
        raise DataError(f"{len(data.train)} training images is fewer than one batch of {config.batch_size}")
    torch.manual_seed(config.seed)  # the new classifier's initialisation (inside the forked generator)
    model = prepare(load_model(config.model, weights=config.weights, num_classes=len(data.classes)), policy)
    if config.cache_features:
        _check_cache_memory(model, data, views=config.cache_views if config.augment else 1)
    state = run.start(config, data.classes, resume=resume, log=log)  # after the model loads: a failed start leaves no run
    optimizer = build_optimizer(
        config.optimizer, model.trainable_parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    steps_per_epoch = len(data.train) // config.batch_size  # drop_last: train-mode BN needs > 1 sample
    scheduler = _schedule(config, optimizer, steps_per_epoch)
    history: list[dict[str, float]] = []
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, start_epoch = list(state["history"]), int(state["epoch"])
        log(f"resuming {run.path} after epoch {start_epoch}")
    elif resume:
        log(f"resuming {run.path}: it holds no checkpoint (no epoch had ended), so training starts at epoch 1")

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
    val_loader = DataLoader(val_source, batch_size=config.batch_size, num_workers=0 if cache else config.workers)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    for epoch in range(start_epoch, config.epochs):
        torch.manual_seed(_epoch_seed(config.seed, epoch))  # augmentation draws from the (forked) global generator
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
        progress = _Progress(len(loader), f"epoch {epoch + 1}/{config.epochs}", log)
        loss_sum, correct, seen = 0.0, 0, 0
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(loader):
            loss, logits = train_step(model, x, y, loss_fn, optimizer, from_features=cache is not None)
            if not torch.isfinite(loss):
                raise _diverged(f"loss {loss.item()} at epoch {epoch + 1} step {step + 1}", epoch, run)
            scheduler.step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
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
        bad = [name for name, p in model.trainable_parameters() if not bool(torch.isfinite(p).all())]
        if bad or not math.isfinite(val_loss):
            raise _diverged(f"non-finite {'weights (' + bad[0] + ')' if bad else 'validation loss'} after epoch {epoch + 1}", epoch, run)
        history.append(row)
        run.save_checkpoint(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "history": history,
            },
            config,
        )
        run.write_metrics(history)
        log(_epoch_line(row, config.epochs))

    run.save_final(model.state_dict(), model_name=config.model, classes=data.classes, policy=policy)
    return FinetuneResult(run.path, model, data.classes, history)
