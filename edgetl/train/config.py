"""The fine-tuning stage's settings: :class:`FinetuneConfig`, checked key by key.

A config is data: ``to_dict`` / ``from_dict`` are its only (de)serialisation, used for
``config.json`` in a run directory (:mod:`edgetl.train.run`), for ``--config`` files and for the
command line. The policy is nested (``policy = {blocks = 4, method = "mobiletl"}`` or a
``[policy]`` table); for convenience its four fields may also be given flat (``blocks = 4``), which
is how the command-line flags arrive.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetl.data.limits import MAX_IMAGE_SIDE
from edgetl.errors import ConfigError
from edgetl.train.optim import OPTIMIZERS
from edgetl.train.policy import TrainPolicy

FASHION_MNIST = "fashion-mnist"
SCHEDULES: tuple[str, ...] = ("cosine", "constant")
#: policy fields that may be given flat, beside the config's own fields
POLICY_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainPolicy))
#: ``seed`` and ``seed + 1`` (the validation subset's) must fit torch's 64-bit seeds
MAX_SEED = 2**63 - 2


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
    policy: TrainPolicy = field(default_factory=lambda: TrainPolicy(blocks=2))
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
        for f in dataclasses.fields(self):
            if f.name != "policy":
                _check_type(f.name, getattr(self, f.name), f.type)
        if not isinstance(self.policy, TrainPolicy):
            raise ConfigError(f"policy must be a TrainPolicy, got {type(self.policy).__name__}")
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and self.lr != float("inf"), f"lr must be a finite number > 0, got {self.lr}"),
            (self.momentum >= 0, f"momentum must be >= 0, got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; expected one of {', '.join(SCHEDULES)}"),
            (0.0 <= self.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (0.0 < self.val_fraction < 1.0, f"val_fraction must be in (0, 1), got {self.val_fraction}"),
            (self.image_size >= 8, f"image_size must be >= 8, got {self.image_size}"),
            (self.image_size <= MAX_IMAGE_SIDE, f"image_size must be <= {MAX_IMAGE_SIDE} (the largest image side), got {self.image_size}"),
            (0 <= self.seed <= MAX_SEED, f"seed must be in [0, {MAX_SEED}], got {self.seed}"),
            (self.cache_views >= 1, f"cache_views must be >= 1, got {self.cache_views}"),
            (self.workers >= 0, f"workers must be >= 0, got {self.workers}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        for f in dataclasses.fields(self):  # inf warmup epochs, inf momentum: no range above catches them all
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values, the policy as a nested dict."""
        return {**dataclasses.asdict(self), "policy": self.policy.to_dict()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneConfig:
        """Build from plain values: ``policy`` nested (dict) and/or its fields flat; unknown keys
        and values of the wrong type are errors naming the key. ``blocks = "all"`` is every
        block of ``model``."""
        values = {k.replace("-", "_"): v for k, v in values.items()}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names - set(POLICY_KEYS))
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        nested = values.pop("policy", {})
        if isinstance(nested, TrainPolicy):
            nested = nested.to_dict()
        if not isinstance(nested, dict):
            raise ConfigError(f"policy must be a table of {', '.join(POLICY_KEYS)}, got {nested!r}")
        bad = sorted(set(nested) - set(POLICY_KEYS))
        if bad:
            raise ConfigError(f"unknown policy setting(s): {', '.join(bad)}")
        policy = {**nested, **{k: values.pop(k) for k in POLICY_KEYS if k in values}}
        if policy.get("blocks") == "all":
            from edgetl.models.zoo import num_blocks

            policy["blocks"] = num_blocks(values.get("model", cls.model))
        return cls(**values, policy=TrainPolicy(**policy) if policy else cls().policy)


_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_type(key: str, value: Any, annotation: Any) -> None:
    """Refuse ``augment = "no"``, ``epochs = "one"``, ``batch_size = 4.5``: name the key."""
    text = str(annotation).replace(" ", "")
    optional = text.endswith("|None")
    base = text.removesuffix("|None")
    if value is None and optional:
        return
    allowed = _TYPES[base]
    ok = isinstance(value, allowed) and (base == "bool" or not isinstance(value, bool))
    if not ok:
        expected = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}[base]
        raise ConfigError(f"{key} must be {expected}{' (or unset)' if optional else ''}, got {value!r}")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a TOML or JSON file, as plain values (checked by :meth:`FinetuneConfig.from_dict`)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {exc.start})") from None
    kind = "TOML" if p.suffix == ".toml" else "JSON"
    try:
        values = tomllib.loads(text) if kind == "TOML" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {p} is not valid {kind}: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {p} must hold a table of settings")
    return values


def config_from_file(path: str | Path, **overrides: Any) -> FinetuneConfig:
    """A :class:`FinetuneConfig` from a TOML/JSON file, ``overrides`` on top; errors name the file."""
    values = {**load_config_file(path), **overrides}
    try:
        return FinetuneConfig.from_dict(values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
