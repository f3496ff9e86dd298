"""``edgetl.export``: from a (fine-tuned) model to a verified bundle of ExecuTorch programs."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetl.errors import WeightsError
from edgetl.exporter import _executorch as et
from edgetl.exporter import bundle as bundle_mod
from edgetl.exporter import inference, memory, training
from edgetl.exporter.bundle import BOTTOM_PTE, MANIFEST, MODEL_PTE, TRAIN_PTD, TRAIN_PTE, BundleWriter, ExportBundle
from edgetl.exporter.config import ExportConfig
from edgetl.exporter.errors import ExecutorchMissingError, ExportError, VerificationError
from edgetl.models.zoo import MODELS, classifier_linear, model_spec
from edgetl.profiler.predict import predict_units
from edgetl.train.policy import TrainPolicy
from edgetl.train.prepare import TransferModel, prepare

#: |ExecuTorch - eager| allowed for the XNNPACK programs, relative to max(1, |eager|)
INFERENCE_TOLERANCE = 1e-3
DIFFERENCES = (
    "dropout and stochastic depth are off in the training program (deterministic steps, verified against eager)",
    "ExecuTorch's SGD keeps its momentum buffers in memory: they restart at zero when training resumes",
)


def _state_and_classes(model: nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _, _, linear = classifier_linear(model)
    return state, linear.out_features


def identify_model(state: dict[str, torch.Tensor], num_classes: int) -> str:
    """The zoo architecture whose state-dict keys and shapes ``state`` fits."""
    fits = []
    for name in MODELS:
        try:
            inference.plain_model(name, state, num_classes)
        except (RuntimeError, WeightsError):
            continue
        fits.append(name)
    if not fits:
        raise ExportError(f"the weights fit none of edgetl's architectures ({', '.join(MODELS)})")
    return fits[0]


def load_weights(name: str, state: dict[str, torch.Tensor], num_classes: int, *, source: str = "the model") -> nn.Module:
    """Architecture ``name`` holding ``state``; a clear error when ``state`` is from another model."""
    model_spec(name)  # unknown names: one clear line
    try:
        return inference.plain_model(name, state, num_classes)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = " ".join(lines[1:3])[:300]
        others = [n for n in MODELS if n != name and _fits(n, state, num_classes)]
        hint = f"; it looks like {others[0]}" if others else ""
        raise ExportError(f"{source} does not hold {name} weights ({detail}){hint}") from None


def apply_device_weights(state: dict[str, Any], ptd: str | Path) -> dict[str, Any]:
    """``state`` with the tensors of a device-written ``.ptd`` (trained parameters, running
    statistics) put in place; names and shapes must match."""
    path = Path(ptd)
    try:
        tensors = et.read_ptd(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read device weights {path}: {exc}") from None
    state = dict(state)
    for name, value in tensors.items():
        if name not in state:
            raise ExportError(f"device weights {path} hold {name}, which the checkpoint does not have (another model?)")
        if value.size != state[name].numel():
            raise ExportError(f"device weights {path}: {name} has {value.size} values, the checkpoint {state[name].numel()}")
        state[name] = torch.from_numpy(value.copy()).reshape(state[name].shape).to(state[name].dtype)
    return state


def _fits(name: str, state: dict[str, torch.Tensor], num_classes: int) -> bool:
    try:
        inference.plain_model(name, state, num_classes)
    except (RuntimeError, WeightsError):
        return False
    return True


def _saved_comparison(
    plain: nn.Module, policy: TrainPolicy, saved: list[memory.SavedTensor], batch_size: int, image_size: int
) -> dict[str, Any]:
    rows = predict_units(plain, policy, batch_size=batch_size, image_size=image_size)
    # the program runs without dropout / stochastic depth, whose noise the profiler counts
    noise = sum(s.nbytes for r in rows for s in r.saved if "noise" in s.what)
    predicted = sum(r.nbytes for r in rows) - noise
    exported = memory.total_bytes(saved)
    return {
        "saved_for_backward_bytes_exported": exported,
        "saved_for_backward_bytes_predicted": predicted,
        "saved_for_backward_ratio": exported / predicted if predicted else None,
        "saved_uint8_masks": sum(1 for s in saved if s.dtype == "uint8"),
        "saved_uint8_bytes": sum(s.nbytes for s in saved if s.dtype == "uint8"),
        "predicted_per_unit": {r.name: r.nbytes for r in rows if r.nbytes},
        "note": "saved = tensors the exported joint graph keeps from forward to backward (weights excluded); "
        "predicted = edgetl.profiler.predict.predict_units without dropout noise",
    }


def export(
    model: nn.Module,
    policy: TrainPolicy,
    out_dir: str | Path,
    config: ExportConfig | None = None,
    *,
    model_name: str | None = None,
    classes: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> ExportBundle:
    """Export ``model`` as ExecuTorch programs for a device, verify them, and write a bundle.

    Args:
        model: the torchvision network (its weights are exported) or a prepared
            :class:`~edgetl.TransferModel` (its state dict is used; the policy is ``policy``).
        policy: what the trainable program trains (:class:`~edgetl.TrainPolicy`).
        out_dir: bundle directory; must not exist with other content (an earlier bundle is
            replaced with ``config.overwrite``).
        config: sizes, the on-device optimizer and the checks (:class:`ExportConfig`; its
            defaults when None).
        model_name: zoo architecture (normalisation, manifest); found from the weights if None.
        classes: class names (default ``"0"``, ``"1"``, ...).
        log: progress lines.

    Returns:
        The written :class:`ExportBundle`. Raises :class:`~edgetl.exporter.ExportError` (an
        :class:`~edgetl.EdgetlError`) for bad input, unsupported layers or operators, a missing
        ExecuTorch, or programs that do not reproduce eager PyTorch.
    """
    config = config or ExportConfig()
    image_size = config.image_size
    try:
        et_version = et.require_executorch()
    except et.ExecutorchUnavailable as exc:
        raise ExecutorchMissingError(str(exc)) from None
    if not isinstance(policy, TrainPolicy):
        raise ExportError(f"policy must be a TrainPolicy, got {type(policy).__name__}")
    out = Path(out_dir)
    bundle_mod.check_output_dir(out.absolute(), overwrite=config.overwrite)

    state, num_classes = _state_and_classes(model)
    name = model_name or identify_model(state, num_classes)
    plain = load_weights(name, state, num_classes)
    net = prepare(plain, policy)
    if classes is None:
        classes = [str(i) for i in range(num_classes)]
    if len(classes) != num_classes:
        raise ExportError(f"{len(classes)} class names for a classifier with {num_classes} outputs")
    spec = model_spec(name)
    part_of = inference.part_namer(net)
    gen = torch.Generator().manual_seed(config.seed)
    manifest: dict[str, Any] = {
        "created": {
            "edgetl": _edgetl_version(),
            "executorch": et_version,
            "torch": torch.__version__,
            "utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
        "model": {"name": name, "num_classes": num_classes, "classes": list(classes), "policy": policy.to_dict()},
        "input": {
            "image_size": image_size,
            "layout": "NCHW",
            "dtype": "float32",
            "channels": "RGB",
            "pixel_scale": "0..1",
            "mean": list(spec.mean),
            "std": list(spec.std),
            "resize_short_side": round(image_size / spec.crop_ratio),
            "crop": "center",
            "interpolation": spec.interpolation.value,
        },
        "runtime": {"executorch_series": et.SUPPORTED_SERIES},
        "programs": {},
        "verification": {},
    }

    with BundleWriter(out, overwrite=config.overwrite) as writer:
        log(f"edgetl export: {name} ({num_classes} classes) K={policy.blocks} {policy.method}, {image_size}px -> {out}")

        x1 = torch.randn(1, 3, image_size, image_size, generator=gen)
        res, diff = _write_checked_inference(writer, MODEL_PTE, plain, x1, part_of)
        log(
            f"  {MODEL_PTE}: XNNPACK ({', '.join(res.program.delegates) or 'no delegate'}), lowered in {res.seconds:.1f}s, "
            f"max |ExecuTorch - eager| = {diff:.3g}"
        )
        manifest["programs"]["inference"] = {
            "file": MODEL_PTE,
            "method": "forward",
            "backend": res.program.delegates,
            "undelegated_ops": res.program.undelegated,
            "inputs": [{"name": "image", "shape": list(res.input_shape), "dtype": "float32"}],
            "outputs": [{"name": "logits", "shape": list(res.output_shape), "dtype": "float32"}],
        }
        manifest["verification"]["inference_max_abs_diff"] = diff

        if config.training:
            _export_training_part(writer, manifest, net, plain, policy, config, num_classes=num_classes, gen=gen, part_of=part_of, log=log)
        bundle = writer.commit(manifest)
    log(f"  verified and written: {', '.join(sorted(bundle.manifest['files']))}, {MANIFEST}")
    return bundle


def _edgetl_version() -> str:
    import edgetl

    return str(getattr(edgetl, "__version__", "unknown"))


def _write_checked_inference(writer: BundleWriter, name: str, module: nn.Module, x: torch.Tensor, part_of):
    """Lower ``module`` to XNNPACK, write it as ``name``, and check it against eager on ``x``."""
    res = inference.export_inference(module, x, part_of=part_of)
    path = writer.write(name, res.program.buffer)
    diff = inference.max_abs_diff(path, module, x)
    with torch.no_grad():
        scale = max(1.0, float(module.eval()(x).abs().max()))
    if not diff <= INFERENCE_TOLERANCE * scale:
        raise VerificationError(f"{name} differs from eager PyTorch by {diff:.3g} (tolerance {INFERENCE_TOLERANCE * scale:.3g})")
    return res, diff


def _export_training_part(
    writer: BundleWriter,
    manifest: dict[str, Any],
    net: TransferModel,
    plain: nn.Module,
    policy: TrainPolicy,
    config: ExportConfig,
    *,
    num_classes: int,
    gen: torch.Generator,
    part_of,
    log: Callable[[str], None],
) -> None:
    batch_size, image_size = config.batch_size, config.image_size
    lr, momentum, weight_decay, label_smoothing = config.lr, config.momentum, config.weight_decay, config.label_smoothing
    xb = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    bottom = inference.Bottom(training.without_dropout(net))
    res, diff = _write_checked_inference(writer, BOTTOM_PTE, bottom, xb, part_of)
    log(
        f"  {BOTTOM_PTE}: frozen bottom ({len(net.bottom_names)} units), XNNPACK, lowered in {res.seconds:.1f}s, "
        f"max |ExecuTorch - eager| = {diff:.3g}"
    )
    feature_shape = res.output_shape

    ex = training.export_training(net, feature_shape=feature_shape, num_classes=num_classes, label_smoothing=label_smoothing)
    pte = writer.write(TRAIN_PTE, ex.program.pte)
    ptd = writer.write(TRAIN_PTD, ex.program.ptd)
    log(
        f"  {TRAIN_PTE} + {TRAIN_PTD}: top {len(net.top_names)} units + head, {len(ex.parameter_names)} trainable tensors, "
        f"{len(ex.buffer_names)} running statistics, exported in {ex.seconds:.1f}s"
    )
    check = training.verify_training(net, ex, pte, ptd, steps=config.verify_steps, lr=lr, momentum=momentum, weight_decay=weight_decay)
    log(
        f"  {config.verify_steps} SGD steps, ExecuTorch vs eager: loss max diff {check.loss_max_abs_diff:.3g}, "
        f"weights {check.weight_max_abs_diff:.3g}, "
        f"running stats {check.running_stats_max_abs_diff:.3g} (moved {check.running_stats_moved:.3g}), "
        f"predict with written weights {check.predict_max_abs_diff:.3g}; tolerance {training.WEIGHT_TOLERANCE:g}"
    )
    mem = _saved_comparison(plain, policy, ex.saved, batch_size, image_size)
    mem["planned_arena_bytes"] = {m: sum(v) for m, v in ex.program.planned_bytes.items()}
    mem["trainable_parameter_bytes"] = sum(s.nbytes for k, s in ex.program.layout.items() if k in ex.parameter_names)
    log(
        f"  memory: saved for backward {mem['saved_for_backward_bytes_exported'] / 2**20:.2f} MiB exported vs "
        f"{mem['saved_for_backward_bytes_predicted'] / 2**20:.2f} MiB predicted by the eager profiler "
        f"({mem['saved_uint8_masks']} uint8 masks); planned arena {mem['planned_arena_bytes']['forward'] / 2**20:.2f} MiB"
    )
    manifest["programs"]["bottom"] = {
        "file": BOTTOM_PTE,
        "method": "forward",
        "backend": res.program.delegates,
        "undelegated_ops": res.program.undelegated,
        "inputs": [{"name": "image", "shape": list(res.input_shape), "dtype": "float32"}],
        "outputs": [{"name": "features", "shape": list(feature_shape), "dtype": "float32"}],
    }
    features = {"name": "features", "shape": list(feature_shape), "dtype": "float32", "layout": "NCHW"}
    manifest["programs"]["training"] = {
        "file": TRAIN_PTE,
        "data": TRAIN_PTD,
        "batch_size": batch_size,
        "methods": {
            "forward": {
                "inputs": [features, {"name": "labels", "shape": [batch_size], "dtype": "int64"}],
                "outputs": [
                    {"name": "loss", "shape": [], "dtype": "float32"},
                    {"name": "logits", "shape": [batch_size, num_classes], "dtype": "float32"},
                ]
                + [{"name": n, "shape": list(ex.program.layout[n].shape), "dtype": ex.program.layout[n].dtype} for n in ex.buffer_names],
                "then": "one gradient per trainable parameter, then the parameters (ExecuTorch training layout; "
                "__et_training_gradients_index_forward says where the gradients start)",
            },
            "predict": {"inputs": [features], "outputs": [{"name": "logits", "shape": [batch_size, num_classes], "dtype": "float32"}]},
        },
        "trainable_parameters": ex.parameter_names,
        "buffers": ex.buffer_names,
        "weights_layout": {k: v.to_dict() for k, v in sorted(ex.program.layout.items())},
        "optimizer": {"name": "sgd", "lr": lr, "momentum": momentum, "dampening": 0.0, "weight_decay": weight_decay, "nesterov": False},
        "loss": {"name": "cross_entropy", "label_smoothing": label_smoothing},
        # operators only deploy/native's kernel library implements (edgetl-device links it)
        "custom_operators": sorted({op for ops in ex.program.operators.values() for op in ops if op.startswith("edgetl_export::")}),
        "operators": ex.program.operators,
        "differences_from_eager": list(DIFFERENCES),
    }
    manifest["verification"]["bottom_max_abs_diff"] = diff
    manifest["verification"]["training"] = check.to_dict()
    manifest["memory"] = mem
