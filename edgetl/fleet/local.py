"""One client's share of a round: build the network, load the global tensors, fine-tune, report.

The same machinery as ``edgetl finetune``: :func:`~edgetl.train.prepare.prepare` applies the
:class:`~edgetl.train.policy.TrainPolicy`, :func:`~edgetl.train.step.train_step` is the step and
:func:`~edgetl.train.optim.build_optimizer` the optimizer. What differs is the loop's frame: a
round is a few local epochs from the global weights, the optimizer starts afresh (its state never
travels) and no run directory is written (the server keeps the model).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from edgetl._rss import peak_rss_bytes
from edgetl.data.fashion_mnist import FashionMNIST
from edgetl.data.folder import FASHION_MNIST, TransformedView, build_datasets
from edgetl.errors import DataError, DivergedError
from edgetl.fleet.config import FleetConfig
from edgetl.fleet.payload import RoundResult, to_arrays
from edgetl.models.zoo import load_model, transforms_for
from edgetl.train.optim import build_optimizer
from edgetl.train.policy import TrainPolicy
from edgetl.train.prepare import TransferModel, prepare
from edgetl.train.step import train_step
from edgetl.train.trainer import evaluate


def build_network(config: FleetConfig, *, num_classes: int, blocks: int) -> TransferModel:
    """``config.model`` with its pretrained weights, prepared to train the top ``blocks`` blocks.

    The new classifier is initialised from ``config.seed`` (the server's copy is the one that
    counts: it is broadcast in every round).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = load_model(config.model, weights=config.weights, num_classes=num_classes)
    return prepare(model, TrainPolicy(blocks=blocks, method=config.method))


def labels_of(dataset: Dataset) -> list[int]:
    """Class labels of a dataset built by :func:`~edgetl.data.folder.build_datasets`, without decoding images."""
    if isinstance(dataset, Subset):
        inner = labels_of(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    if isinstance(dataset, TransformedView):
        return labels_of(dataset.base)
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise DataError(f"cannot read the labels of {type(dataset).__name__}")
    return [int(t) for t in targets]


def training_pool(config: FleetConfig, data: str | None = None) -> tuple[Dataset, Dataset, list[str]]:
    """The training images (augmented view and eval view, same order) of ``data`` and the classes:
    every image of a folder (:func:`client_data` holds out the client's own tenth)."""
    data = config.data if data is None else data
    sets = build_datasets(
        data,
        val_fraction=0.0,
        train_transform=transforms_for(config.model, image_size=config.image_size, train=True),
        eval_transform=transforms_for(config.model, image_size=config.image_size, train=False),
        train_limit=config.train_limit,
        seed=config.seed,
    )
    return sets.train, sets.train_eval, sets.classes


def test_set(config: FleetConfig) -> tuple[Dataset, list[str]] | None:
    """``config.test_data`` with eval transforms (seeded ``test_limit`` subset), or None."""
    if config.test_data is None:
        return None
    tf = transforms_for(config.model, image_size=config.image_size, train=False)
    if config.test_data == FASHION_MNIST:
        base: Dataset = FashionMNIST(split="test", transform=tf)
        classes = list(FashionMNIST.classes)
    else:  # a folder validates in full: it is its own validation set
        sets = build_datasets(config.test_data, train_transform=tf, eval_transform=tf, val_data=config.test_data, seed=config.seed)
        base, classes = sets.val, sets.classes
    if config.test_limit is not None and config.test_limit < len(base):
        keep = torch.randperm(len(base), generator=torch.Generator().manual_seed(config.seed + 1))[: config.test_limit]
        base = Subset(base, sorted(keep.tolist()))
    return base, classes


def classes_for(config: FleetConfig) -> list[str]:
    """The fleet's class names: the test set's, else the training data's."""
    found = test_set(config)
    return found[1] if found is not None else training_pool(config)[2]


def local_finetune(net: TransferModel, data: Dataset, *, config: FleetConfig, keys: Sequence[str], seed: int) -> RoundResult:
    """Train ``net`` on ``data`` for ``config.epochs`` epochs; return the tensors named ``keys``.

    Randomness (augmentation, shuffling) comes from ``seed`` in a forked generator. A non-finite
    loss or weight raises :class:`~edgetl.errors.DivergedError` (the client then sends nothing).
    """
    if len(data) < 2:
        raise DataError(f"{len(data)} training image(s): a client needs at least 2 (train-mode batch norm)")
    batch = min(config.batch_size, len(data))
    loss_fn = nn.CrossEntropyLoss()
    optimizer = build_optimizer(config.optimizer, net.trainable_parameters(), lr=config.lr)
    loss_sum, correct, seen = 0.0, 0, 0
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for epoch in range(config.epochs):
            loader = DataLoader(
                data, batch_size=batch, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed * 1009 + epoch)
            )
            net.train()
            for x, y in loader:
                loss, logits = train_step(net, x, y, loss_fn, optimizer)
                if not torch.isfinite(loss):
                    raise DivergedError(f"local training diverged: loss {loss.item()} in epoch {epoch + 1}")
                loss_sum += loss.item() * len(y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
    bad = [name for name, p in net.trainable_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise DivergedError(f"local training diverged: non-finite weights in {bad[0]}")
    return RoundResult(
        arrays=to_arrays(net.state_dict(), keys),
        num_examples=len(data),
        train_loss=loss_sum / max(seen, 1),
        train_acc=correct / max(seen, 1),
        seconds=time.perf_counter() - t0,
        peak_rss_bytes=peak_rss_bytes(),
    )


def accuracy(net: TransferModel, data: Dataset, *, batch_size: int = 64) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``net`` (eval mode) on ``data``."""
    loss, acc = evaluate(net, DataLoader(data, batch_size=batch_size))
    if not math.isfinite(loss):
        return float("inf"), acc
    return loss, acc


def client_data(
    config: FleetConfig, *, partition: int | None = None, partitions: int | None = None, data: str | None = None
) -> tuple[Dataset, Dataset, list[str]]:
    """A client's training set, its local validation set and the classes.

    ``data``: the client's own ``ImageFolder`` (a real device); otherwise the client holds share
    ``partition`` of ``partitions`` of ``config.data`` (a simulated one), split IID or by
    Dirichlet(``config.alpha``) with ``config.seed``, so every client computes the same split.
    A seeded tenth of the client's images (at least one) is its local validation set, used for
    federated evaluation; the rest trains.
    """
    from edgetl.fleet.partition import dirichlet_partition, iid_partition

    train_view, eval_view, classes = training_pool(config, data)
    if data is None:
        if partition is None or partitions is None or not 0 <= partition < partitions:
            raise DataError(f"a simulated client needs a partition id in 0..{partitions}, got {partition}")
        if config.alpha is None:
            shares = iid_partition(len(train_view), partitions, seed=config.seed)
        else:
            shares = dirichlet_partition(labels_of(train_view), partitions, alpha=config.alpha, seed=config.seed, min_size=4)
        share = shares[partition]
    else:
        share = list(range(len(train_view)))
    order = np.random.default_rng(config.seed + 7919 * (partition or 0)).permutation(share).tolist()
    held = max(1, len(order) // 10)
    return Subset(train_view, sorted(order[held:])), Subset(eval_view, sorted(order[:held])), classes
