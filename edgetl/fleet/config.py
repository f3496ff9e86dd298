"""The fleet's settings: :class:`FleetConfig`, checked field by field.

The server owns the training recipe (model, weights, K, epochs, optimizer, ...) and sends it to
every client in each round's message as a flat record (:meth:`FleetConfig.to_record`); a client
owns only what is its own: its data and its device profile (Flower's node config). So a fleet is
reconfigured in one place, and a device never trains with a recipe the server did not send.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from edgetl.errors import ConfigError
from edgetl.train.optim import OPTIMIZERS
from edgetl.train.policy import METHODS

FASHION_MNIST = "fashion-mnist"


@dataclass(frozen=True)
class FleetConfig:
    """Everything that defines a fleet run.

    Attributes:
        model, weights: the architecture and its pretrained weights (as ``edgetl finetune``); every
            client loads the same weights, so only trained tensors need to travel.
        data: the simulated clients' data, split over them: ``"fashion-mnist"`` or an
            ``ImageFolder`` directory. A deployed client reads its own (node config ``data``).
        test_data: the server's held-out set for evaluating the global model after each round
            (``"fashion-mnist"``: its test split; a folder; None: no server-side evaluation).
        clients: simulated clients (the simulation engine's SuperNodes).
        alpha: Dirichlet concentration of the non-IID label split (None: IID, equal shares).
        fraction: share of the connected clients asked to train in a round (at least ``min_clients``).
        min_clients: a round starts when this many clients are connected (waiting up to
            ``round_timeout``) and asks at least this many.
        min_replies: a round changes the global model only with at least this many valid replies;
            with fewer it is logged and the model stays as it was (the next round still runs).
        rounds: federated rounds.
        round_timeout: seconds the server waits for replies; a client that has not answered by
            then (killed, disconnected, too slow) is left out of the round.
        blocks: the top K blocks a client trains when it has no device profile, and the most any
            client trains (a device's planned K is capped at it): the server broadcasts exactly the
            tensors a K = ``blocks`` client trains.
        devices: device-profile TOML files given to simulated clients in turn (client i gets
            ``devices[i % len(devices)]``); a client's K is the planner's choice for its device.
        method: ``"mobiletl"`` or ``"vanilla"``.
        fedbn: keep the trained norms' running statistics on each client (FedBN): they are
            neither sent nor averaged, and each client evaluates with its own.
        federated_eval: after each round the sampled clients also evaluate the global model on
            their own held-out images (always on under FedBN, whose global model has no one set
            of statistics to evaluate centrally).
        epochs: local epochs per round; ``batch_size``, ``lr``, ``optimizer``: the local training.
            The optimizer starts afresh each round (its state never travels).
        image_size: training resolution.
        train_limit, test_limit: seeded subsets of ``data`` (before the split) and ``test_data``.
        max_examples: a reply claiming more training examples than this is absurd and rejected
            (it would dominate the weighted average).
        seed: partition, classifier initialisation, shuffling and client sampling.
        out: the server's directory (global model after each round, history); resumable.
    """

    model: str = "mobilenet_v2"
    weights: str | None = None
    data: str = FASHION_MNIST
    test_data: str | None = FASHION_MNIST
    clients: int = 10
    alpha: float | None = 0.5
    fraction: float = 1.0
    min_clients: int = 2
    min_replies: int = 1
    rounds: int = 5
    round_timeout: float = 600.0
    blocks: int = 4
    devices: tuple[str, ...] = ()
    method: str = "mobiletl"
    fedbn: bool = False
    federated_eval: bool = False
    epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "adam"
    image_size: int = 96
    train_limit: int | None = None
    test_limit: int | None = None
    max_examples: int = 1_000_000
    seed: int = 0
    out: str = "runs/fleet"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        checks = [
            (self.clients >= 1, f"clients must be >= 1, got {self.clients}"),
            (
                self.alpha is None or (math.isfinite(self.alpha) and self.alpha > 0),
                f"alpha must be a finite number > 0 (or None for IID), got {self.alpha}",
            ),
            (0.0 < self.fraction <= 1.0, f"fraction must be in (0, 1], got {self.fraction}"),
            (self.min_clients >= 1, f"min_clients must be >= 1, got {self.min_clients}"),
            (1 <= self.min_replies <= self.min_clients, f"min_replies must be in 1..min_clients, got {self.min_replies}"),
            (self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}"),
            (self.round_timeout > 0, f"round_timeout must be > 0 seconds, got {self.round_timeout}"),
            (self.blocks >= 0, f"blocks must be >= 0, got {self.blocks}"),
            (self.method in METHODS, f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 2, f"batch_size must be >= 2 (train-mode batch norm), got {self.batch_size}"),
            (0 < self.lr < float("inf"), f"lr must be a finite number > 0, got {self.lr}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}"),
            (self.image_size >= 8, f"image_size must be >= 8, got {self.image_size}"),
            (self.train_limit is None or self.train_limit >= 1, f"train_limit must be >= 1, got {self.train_limit}"),
            (self.test_limit is None or self.test_limit >= 1, f"test_limit must be >= 1, got {self.test_limit}"),
            (self.max_examples >= 1, f"max_examples must be >= 1, got {self.max_examples}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_record(self) -> dict[str, Any]:
        """Flat scalars for a Flower ``ConfigRecord`` (None is left out; ``devices`` is a list)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> FleetConfig:
        """Inverse of :meth:`to_record`; unknown keys are an error (a server of another version).

        An optional setting that is absent is None (``to_record`` leaves None out), not its
        default: ``alpha`` absent means IID. ``devices`` may also be one comma-separated string
        (Flower's run config holds scalars only).
        """
        fields = dataclasses.fields(cls)
        unknown = sorted(set(record) - {f.name for f in fields})
        if unknown:
            raise ConfigError(f"unknown fleet settings: {', '.join(unknown)}")
        values = {f.name: None for f in fields if "None" in str(f.type)} | dict(record)
        if "devices" in values:
            devices = values["devices"]
            values["devices"] = tuple(d for d in devices.split(",") if d) if isinstance(devices, str) else tuple(devices)
        return cls(**{k: (float(v) if k in _FLOATS and isinstance(v, int) and not isinstance(v, bool) else v) for k, v in values.items()})


_FLOATS = {"alpha", "fraction", "round_timeout", "lr"}


def _check_type(name: str, value: Any, annotation: str) -> None:
    optional = "None" in annotation
    if value is None:
        if not optional:
            raise ConfigError(f"{name} must not be empty")
        return
    if annotation.startswith("tuple"):
        if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a list of paths, got {value!r}")
        return
    base = annotation.split("|")[0].strip()
    expected = {"str": str, "int": int, "float": (int, float), "bool": bool}[base]
    if isinstance(value, bool) and base != "bool" or not isinstance(value, expected):
        raise ConfigError(f"{name} must be {base}, got {value!r}")
