"""What a profile or plan is about: :class:`StepSettings`, the one place its defaults are stated."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from edgetl.train.policy import TrainPolicy

if TYPE_CHECKING:
    from edgetl.train.config import FinetuneConfig

#: ``TrainPolicy`` fields a caller may override one by one
POLICY_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(TrainPolicy))


@dataclass(frozen=True)
class StepSettings:
    """One training step as the profiler and the planner see it.

    Attributes:
        model: architecture name (:func:`edgetl.load_model`).
        policy: K and the memory options (the profile covers both methods whatever ``policy.method``).
        batch_size, image_size: the input batch, ``batch_size x 3 x image_size x image_size``.
        num_classes: classifier outputs (ImageNet's by default).
        optimizer: whose state to count.
        spare_classes: outputs beyond ``num_classes`` (``edgetl export --spare-classes``): inert
            until a device assigns them, their rows cost what any class's row costs.
    """

    model: str
    policy: TrainPolicy
    batch_size: int
    image_size: int = 224
    num_classes: int = 1000
    optimizer: str = "adam"
    spare_classes: int = 0

    @property
    def outputs(self) -> int:
        """The classifier's rows: the classes and the spare ones."""
        return self.num_classes + self.spare_classes

    @classmethod
    def of_run(cls, config: FinetuneConfig, num_classes: int | None = None) -> StepSettings:
        """A run's (or a ``finetune`` config file's) step: its model, policy, batch, image size and
        optimizer; ``num_classes`` when known (a config file names its data, not its classes)."""
        extra = {"num_classes": num_classes} if num_classes is not None else {}
        return cls(config.model, config.policy, config.batch_size, config.image_size, optimizer=config.optimizer, **extra)

    def with_overrides(self, **overrides: Any) -> StepSettings:
        """These settings with every override that is not None replacing its field; the policy's
        fields (``blocks``, ``bottom_chunk``, ...) replace fields of the policy, the others stay."""
        given = {k: v for k, v in overrides.items() if v is not None}
        policy = replace(self.policy, **{k: given.pop(k) for k in POLICY_FIELDS if k in given})
        return replace(self, policy=policy, **given)
