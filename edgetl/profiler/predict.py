"""Per-unit predictions for a whole network under a policy (structure read, nothing run)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from edgetl.models.blocks import feature_units, first_trained_unit, is_irb
from edgetl.profiler.analytic import Saved, keeps_output, saved_for_backward, total_bytes
from edgetl.profiler.shapes import Shape, float_bytes
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
    #: ``policy.recompute``: what the unit stores again while backward recomputes it (its saved
    #: tensors without recompute, less its input, which ``saved`` already holds); () otherwise
    recomputed: tuple[Saved, ...] = ()

    @property
    def nbytes(self) -> int:
        return total_bytes(self.saved)


def recompute_transient(rows: list[UnitPrediction]) -> int:
    """Bytes stored for backward only while one unit is recomputed (``policy.recompute``): the
    largest unit's :attr:`UnitPrediction.recomputed`. Backward recomputes one unit at a time and
    frees what it stored as that unit's backward runs, so this adds to the step's peak once, on
    top of every row's ``saved``. 0 without recompute."""
    return max((total_bytes(r.recomputed) for r in rows), default=0)


def predict_units(model: nn.Module, policy: TrainPolicy, *, batch_size: int, image_size: int) -> list[UnitPrediction]:
    """Predict what training ``model`` under ``policy`` stores for backward, unit by unit.

    ``model`` is the original torchvision network or its prepared form; for either the policy
    decides which units train and how. Units below the top K blocks run without autograd and store
    nothing. The last row is the head (pooling and classifier).

    With ``policy.recompute`` every trained unit of ``features`` stores its input alone, and
    ``recomputed`` lists what it stores again during its recomputation in backward
    (:func:`recompute_transient`). Each input is its own storage, counted once: the unit before a
    recomputed unit is frozen (keeps nothing) or recomputed (keeps only its own input), never one
    whose saved tensors include its output. Beside what autograd stores, a recomputed unit that draws random
    numbers (EfficientNet's stochastic depth) keeps the CPU generator's state from forward to
    backward: 5056 bytes (``torch.get_rng_state()``), counted nowhere here.
    """
    units = feature_units(model)
    policy.check_blocks(sum(is_irb(unit) for _, unit in units))
    trained_from = first_trained_unit(units, policy.blocks)
    shape: Shape = (batch_size, 3, image_size, image_size)
    rows: list[UnitPrediction] = []
    input_saved = False  # the unit before keeps its output, this unit's input (a ReLU ending a stage)
    for i, (name, unit) in enumerate(units):
        layers, mobiletl = unit_layers(name, unit), uses_mobiletl(policy, unit)
        saved, out = saved_for_backward(
            layers,
            shape,
            mobiletl=mobiletl,
            activation_mask=policy.activation_mask,
            saved_precision=policy.saved_precision,
            input_saved=input_saved,
        )
        role = "frozen" if i < trained_from else "block" if is_irb(unit) else "stage"
        kept = keeps_output(layers, mobiletl=mobiletl, activation_mask=policy.activation_mask)
        input_saved = role != "frozen" and not policy.recompute and kept
        if role == "frozen":
            rows.append(UnitPrediction(name, role, shape, out, ()))
        elif policy.recompute:
            # the input is what a checkpoint keeps; the unit's own first layer saves that same storage again when recomputed
            again = tuple(s for s in saved if not (s.layer == 0 and s.shape == shape))
            stored = Saved(0, "unit input (the unit is recomputed in backward)", shape, float_bytes(shape))
            rows.append(UnitPrediction(name, role, shape, out, (stored,), again))
        else:
            rows.append(UnitPrediction(name, role, shape, out, tuple(saved)))
        shape = out
    saved, out = saved_for_backward(head_layers(model), shape)
    rows.append(UnitPrediction(HEAD, "head", shape, out, tuple(saved)))
    return rows
