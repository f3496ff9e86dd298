"""Per-unit predictions for a whole network under a policy (structure read, nothing run)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from edgetl.models.blocks import block_spec, feature_units, first_trained_unit, is_irb, layer_specs
from edgetl.profiler.analytic import Saved, Shape, saved_for_backward, total_bytes
from edgetl.profiler.measure import HEAD
from edgetl.train.policy import TrainPolicy


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
    blocks = [name for name, unit in units if is_irb(unit)]
    policy.check_blocks(len(blocks))
    trained_from = first_trained_unit(units, policy.blocks)
    shape: Shape = (batch_size, 3, image_size, image_size)
    rows: list[UnitPrediction] = []
    for i, (name, unit) in enumerate(units):
        layers = block_spec(name, unit).layers if is_irb(unit) else layer_specs(unit)
        mobiletl = policy.method == "mobiletl" and is_irb(unit)
        saved, out = saved_for_backward(layers, shape, mobiletl=mobiletl, activation_mask=policy.activation_mask)
        if i < trained_from:
            rows.append(UnitPrediction(name, "frozen", shape, out, ()))
        else:
            rows.append(UnitPrediction(name, "block" if is_irb(unit) else "stage", shape, out, tuple(saved)))
        shape = out
    head = layer_specs(nn.Sequential(nn.AdaptiveAvgPool2d(1), model.classifier))
    saved, out = saved_for_backward(head, shape)
    rows.append(UnitPrediction(HEAD, "head", shape, out, tuple(saved)))
    return rows
