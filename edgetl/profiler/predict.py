"""Per-unit predictions for a whole network under a policy (structure read, nothing run)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from edgetl.models.blocks import feature_units, first_trained_unit, is_irb
from edgetl.profiler.analytic import Saved, saved_for_backward, total_bytes
from edgetl.profiler.shapes import Shape
from edgetl.profiler.units import HEAD, head_layers, unit_layers
from edgetl.train.policy import TrainPolicy, uses_mobiletl


@dataclass(frozen=True)
class UnitPrediction:
    """Predicted storage for backward of one unit of a network."""

    name: str
    role: str  # "frozen", "block" (a trained IRB) or "stage" (a trained non-IRB unit), "head"
    in_shape: Shape
    out_shape: Shape
    saved: tuple[Saved, ...]

    @property
    def nbytes(self) -> int:
        return total_bytes(self.saved)


def predict_units(model: nn.Module, policy: TrainPolicy, *, batch_size: int, image_size: int) -> list[UnitPrediction]:
    """Predict what training ``model`` under ``policy`` stores for backward, unit by unit.

    ``model`` is the original torchvision network or its prepared form; for either the policy
    decides which units train and how. Units below the top K blocks run without autograd and store
    nothing. The last row is the head (pooling and classifier).
    """
    units = feature_units(model)
    policy.check_blocks(sum(is_irb(unit) for _, unit in units))
    trained_from = first_trained_unit(units, policy.blocks)
    shape: Shape = (batch_size, 3, image_size, image_size)
    rows: list[UnitPrediction] = []
    for i, (name, unit) in enumerate(units):
        saved, out = saved_for_backward(
            unit_layers(name, unit),
            shape,
            mobiletl=uses_mobiletl(policy, unit),
            activation_mask=policy.activation_mask,
            saved_precision=policy.saved_precision,
        )
        if i < trained_from:
            rows.append(UnitPrediction(name, "frozen", shape, out, ()))
        else:
            rows.append(UnitPrediction(name, "block" if is_irb(unit) else "stage", shape, out, tuple(saved)))
        shape = out
    saved, out = saved_for_backward(head_layers(model), shape)
    rows.append(UnitPrediction(HEAD, "head", shape, out, tuple(saved)))
    return rows
