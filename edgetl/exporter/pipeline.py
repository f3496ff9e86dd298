"""``edgetl.export``: from a (fine-tuned) model to a verified bundle of ExecuTorch programs."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgetl.errors import EdgetlError
from edgetl.exporter import _executorch as et
from edgetl.exporter import bundle as bundle_mod
from edgetl.exporter import inference, memory, qat, quantize, sensitivity, training
from edgetl.exporter import replay as replay_mod
from edgetl.exporter.bundle import BOTTOM_PTE, MANIFEST, MODEL_PTE, TRAIN_PTD, TRAIN_PTE, BundleWriter, ExportBundle
from edgetl.exporter.calibration import ImageSet
from edgetl.exporter.config import ExportConfig
from edgetl.exporter.errors import ExecutorchMissingError, ExportError, VerificationError
from edgetl.exporter.manifest import (
    Created,
    InputInfo,
    Loss,
    Manifest,
    MemoryFigures,
    Method,
    ModelInfo,
    Optimizer,
    Programs,
    Quantization,
    ReplaySet,
    RuntimeInfo,
    SpareClasses,
    TensorSpec,
    TrainingProgram,
    Verification,
    XnnpackProgram,
)
from edgetl.exporter.weights import check_architecture, load_weights
from edgetl.models.zoo import classifier_linear, identify_model, model_spec
from edgetl.nn.spare import SpareClassLinear, spare_head
from edgetl.profiler.native import NATIVE_RUNTIME_BYTES
from edgetl.profiler.predict import predict_units
from edgetl.train.optim import decayed_names
from edgetl.train.policy import TrainPolicy
from edgetl.train.prepare import TransferModel, prepare

#: |ExecuTorch - eager| allowed for the XNNPACK programs, relative to max(1, |eager|)
INFERENCE_TOLERANCE = 1e-3
DIFFERENCES = (
    "dropout and stochastic depth are off in the training program (deterministic steps, verified against eager)",
    "the optimizer's state is the runtime's: edgetl-device saves it with each epoch's weights (SGD's momentum-epochNNNN.bin, "
    "AdamW's adamw_moments-epochNNNN.bin and step count) and resumes from it; the verification keeps it in memory only",
)


def _edgetl_version() -> str:
    # the installed distribution's version, read without importing the package face ``edgetl``
    # (nothing inside the package imports it); a source tree that is not installed has none
    try:
        return importlib.metadata.version("edgetl")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def _as_export_error() -> Iterator[None]:
    """Input errors from the stages below (an unknown architecture, a policy that does not fit) as
    :class:`ExportError`, the one error family :func:`export` raises for its input."""
    try:
        yield
    except ExportError:
        raise
    except EdgetlError as exc:
        raise ExportError(str(exc)) from None


@contextlib.contextmanager
def _in_eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode, every submodule's training flag restored after: the caller's
    network is exported as it is (not copied) and left as it was."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def _networks(model: nn.Module, policy: TrainPolicy, name: str, num_classes: int) -> tuple[nn.Module, TransferModel]:
    """The plain network the inference programs are lowered from, and the prepared one the
    training program trains: ``model`` itself where it is one of them."""
    if isinstance(model, TransferModel):
        # MobileTL's layers (masked activations, shift-only norms) are training forms with no
        # XNNPACK lowering: the inference programs run the architecture itself with these weights
        plain = load_weights(name, model.state_dict(), num_classes, source="the prepared model")
        return plain, model if model.policy == policy else prepare(plain, policy)
    return model, prepare(model, policy)


def _memory_figures(plain: nn.Module, policy: TrainPolicy, ex: training.TrainingExport, batch_size: int, image_size: int) -> MemoryFigures:
    """The training program's memory against :func:`~edgetl.profiler.predict.predict_units`."""
    rows = predict_units(plain, policy, batch_size=batch_size, image_size=image_size)
    # the program runs without dropout / stochastic depth, whose noise the profiler counts
    noise = sum(s.nbytes for r in rows for s in r.saved if "noise" in s.what)
    predicted = sum(r.nbytes for r in rows) - noise
    exported = memory.total_bytes(ex.saved)
    return MemoryFigures(
        saved_for_backward_bytes_exported=exported,
        saved_for_backward_bytes_predicted=predicted,
        saved_for_backward_ratio=exported / predicted if predicted else None,
        saved_uint8_masks=sum(1 for s in ex.saved if s.dtype == "uint8"),
        saved_uint8_bytes=sum(s.nbytes for s in ex.saved if s.dtype == "uint8"),
        predicted_per_unit={r.name: r.nbytes for r in rows if r.nbytes},
        note="saved = tensors the exported joint graph keeps from forward to backward (weights excluded); "
        "predicted = edgetl.profiler.predict.predict_units without dropout noise",
        planned_arena_bytes={m: sum(v) for m, v in ex.program.planned_bytes.items()},
        trainable_parameter_bytes=sum(s.nbytes for k, s in ex.program.layout.items() if k in ex.parameter_names),
        native_runtime_bytes=NATIVE_RUNTIME_BYTES,
    )


def export(
    model: nn.Module,
    policy: TrainPolicy,
    out_dir: str | Path,
    config: ExportConfig | None = None,
    *,
    model_name: str | None = None,
    classes: Sequence[str] | None = None,
    calibration: ImageSet | None = None,
    validation: ImageSet | None = None,
    replay: ImageSet | None = None,
    report: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> ExportBundle:
    """Export ``model`` as ExecuTorch programs for a device, verify them, and write a bundle.

    Args:
        model: a zoo architecture holding the weights to export (used as it is, left unchanged),
            or a prepared :class:`~edgetl.TransferModel` (trained by ``policy``: itself when its
            policy is ``policy``).
        policy: what the trainable program trains (:class:`~edgetl.TrainPolicy`).
        out_dir: bundle directory; must not exist with other content (an earlier bundle is
            replaced with ``config.overwrite``).
        config: sizes, the on-device optimizer and the checks (:class:`ExportConfig`; its
            defaults when None).
        model_name: zoo architecture (normalisation, manifest); found from the weights if None,
            checked against them otherwise.
        classes: class names (default ``"0"``, ``"1"``, ...).
        calibration: with ``config.quantize == "int8"``, the images that calibrate the int8
            programs (:mod:`edgetl.exporter.calibration`: a run's training images, a directory);
            with ``config.spare_classes``, the images whose mean embedding centres imprinting.
        validation: with int8, labelled images on which int8 is checked against float32 (accuracy,
            top-1 agreement); the export is refused when int8 loses more than
            ``config.max_accuracy_drop`` points.
        replay: with ``config.replay_per_class``, the labelled images whose ``bottom.pte``
            features make the replay set (:func:`edgetl.exporter.calibration.replay_from_run`
            draws them from a run).
        report: with int8, write the per-layer sensitivity of ``model.pte`` to this JSON file
            (:class:`~edgetl.exporter.sensitivity.SensitivityReport`).
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
    if policy.recompute and config.training:
        # the program's memory plan keeps what its joint graph saves; recomputation is an eager-PyTorch option
        raise ExportError(
            "TrainPolicy.recompute cannot be exported: the training program stores what it stores "
            "(recompute is an eager-PyTorch option; export with recompute=False)"
        )
    if not isinstance(model, nn.Module):
        raise ExportError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config.training:
        training.check_policy(policy)
    out = Path(out_dir)
    bundle_mod.check_output_dir(out.absolute(), overwrite=config.overwrite)
    int8 = config.quantize == "int8"
    if int8:
        _check_int8_data(calibration, validation, image_size)
    if config.replay_per_class:
        _check_replay_images(replay, image_size)

    with _as_export_error():
        try:
            num_classes = classifier_linear(model)[2].out_features
        except ValueError as exc:  # no classifier head: not one of the zoo's networks
            raise ExportError(f"cannot export {type(model).__name__}: {exc}") from None
        state = model.state_dict()
        if model_name is None:
            model_name = identify_model(state)
        else:
            check_architecture(model_name, state)
        plain, net = _networks(model, policy, model_name, num_classes)
    if classes is None:
        classes = [str(i) for i in range(num_classes)]
    if len(classes) != num_classes:
        raise ExportError(f"{len(classes)} class names for a classifier with {num_classes} outputs")
    spec = model_spec(model_name)
    part_of = inference.part_namer(net)
    gen = torch.Generator().manual_seed(config.seed)
    head = {
        "created": Created(
            edgetl=_edgetl_version(),
            executorch=et_version,
            torch=torch.__version__,
            utc=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        ),
        "model": ModelInfo(name=model_name, num_classes=num_classes, classes=list(classes), policy=policy.to_dict()),
        "input": InputInfo(
            image_size=image_size,
            layout="NCHW",
            dtype="float32",
            channels="RGB",
            pixel_scale="0..1",
            mean=list(spec.mean),
            std=list(spec.std),
            resize_short_side=round(image_size / spec.crop_ratio),
            crop="center",
            interpolation=spec.interpolation.value,
        ),
        "runtime": RuntimeInfo(executorch_series=et.SUPPORTED_SERIES),
    }

    with BundleWriter(out, overwrite=config.overwrite) as writer, _in_eval_mode(plain):
        log(f"edgetl export: {model_name} ({num_classes} classes) K={policy.blocks} {policy.method}, {image_size}px -> {out}")

        x1 = torch.randn(1, 3, image_size, image_size, generator=gen)
        checks: list[quantize.AccuracyCheck] = []
        if int8:
            fp32_logits = quantize.eager_outputs(plain, validation.images)
            res, diff, float_layers = _write_int8_model(
                writer, plain, x1, calibration, validation, fp32_logits, config, part_of, checks, report, log
            )
        else:
            log(f"  lowering {MODEL_PTE} to XNNPACK and checking it against eager PyTorch ...")
            res, diff = _write_checked_inference(writer, MODEL_PTE, plain, x1, part_of)
        log(
            f"  {MODEL_PTE}: XNNPACK ({', '.join(res.program.delegates) or 'no delegate'}), lowered in {res.seconds:.1f}s, "
            f"max |ExecuTorch - eager| = {diff:.3g}" + (" (int8 against float32)" if int8 else "")
        )
        programs = Programs(inference=_xnnpack_program(MODEL_PTE, res, "logits"))
        verification = Verification(inference_max_abs_diff=diff)
        mem = None
        if config.training:
            int8_data = (calibration, validation, fp32_logits, checks) if int8 else None
            programs, verification, mem = _export_training_part(
                writer,
                programs,
                verification,
                net,
                plain,
                policy,
                config,
                num_classes=num_classes,
                gen=gen,
                part_of=part_of,
                log=log,
                int8_data=int8_data,
                images=calibration,
            )
        replay_set = None
        if config.replay_per_class:
            feature_shape = programs.training.methods["forward"].inputs[0].shape[1:]
            replay_set = _write_replay(writer, replay, config, num_classes, feature_shape, log)
        quant = None
        if int8:
            quant = Quantization(
                scheme=dict(et.INT8_SCHEME),
                programs=[MODEL_PTE] + ([BOTTOM_PTE] if config.training else []),
                calibration=quantize.calibration_record(calibration),
                validation=validation.source,
                max_accuracy_drop=config.max_accuracy_drop,
                checks=checks,
                observer=config.observer,
                float_layers=float_layers,
                qat_epochs=config.qat_epochs,
            )
        bundle = writer.commit(
            Manifest(**head, programs=programs, verification=verification, memory=mem, quantization=quant, replay=replay_set)
        )
    log(f"  verified and written: {', '.join(sorted(bundle.manifest.files))}, {MANIFEST}")
    return bundle


def _xnnpack_program(file: str, res: inference.InferenceExport, output: str) -> XnnpackProgram:
    return XnnpackProgram(
        file=file,
        method="forward",
        backend=res.program.delegates,
        undelegated_ops=res.program.undelegated,
        inputs=[TensorSpec("image", list(res.input_shape), "float32")],
        outputs=[TensorSpec(output, list(res.output_shape), "float32")],
    )


def _check_int8_data(calibration: ImageSet | None, validation: ImageSet | None, image_size: int) -> None:
    if calibration is None or validation is None:
        raise ExportError(
            "an int8 export needs calibration images and labelled validation images "
            "(export a run directory, whose training and validation images are used, or pass calibration= and validation=)"
        )
    if validation.labels is None:
        raise ExportError(f"the validation images ({validation.source}) have no labels: int8 is checked on its accuracy")
    for images in (calibration, validation):
        if tuple(images.images.shape[2:]) != (image_size, image_size):
            raise ExportError(f"{images.source}: images of {tuple(images.images.shape[2:])} pixels for an export at {image_size} px")


def _check_replay_images(replay: ImageSet | None, image_size: int) -> None:
    if replay is None or replay.labels is None:
        raise ExportError(
            "a replay set needs labelled training images (export a run directory, whose training images are drawn, or pass replay=)"
        )
    if tuple(replay.images.shape[2:]) != (image_size, image_size):
        raise ExportError(f"{replay.source}: images of {tuple(replay.images.shape[2:])} pixels for an export at {image_size} px")


def _write_replay(
    writer: BundleWriter, images: ImageSet, config: ExportConfig, num_classes: int, feature_shape: list[int], log: Callable[[str], None]
) -> ReplaySet:
    """``bottom.pte``'s features of ``images`` (the device's own features), quantized to int8 and
    written as ``replay.bin``; the manifest section that describes it."""
    log(f"  computing the replay set: {BOTTOM_PTE} features of {len(images)} training images ...")
    features = quantize.program_outputs(writer.dir / BOTTOM_PTE, images.images, config.batch_size)
    labels = images.labels.numpy()
    if list(features.shape[1:]) != list(feature_shape):
        raise ExportError(f"{BOTTOM_PTE} gives features of {list(features.shape[1:])}, the training program takes {feature_shape}")
    rows = replay_mod.quantize_rows(features, labels)
    data = rows.to_bytes()
    writer.write(replay_mod.REPLAY_BIN, data)
    max_err, rel_err = replay_mod.quantization_error(features, rows)
    counts = np.bincount(labels, minlength=num_classes).tolist()
    log(
        f"  {replay_mod.REPLAY_BIN}: {len(rows.labels)} rows ({', '.join(map(str, counts))} per class), {len(data)} bytes "
        f"({int(np.prod(feature_shape)) + 4} per row), int8 against float32: max |error| {max_err:.3g}, relative rms {rel_err:.3g}"
    )
    return ReplaySet(
        file=replay_mod.REPLAY_BIN,
        per_class=config.replay_per_class,
        count=len(rows.labels),
        class_counts=counts,
        seed=images.seed if images.seed is not None else config.seed,
        drawn="per class, the first per_class of its training images in the order of torch.randperm(seed) over the run's "
        "training set (all of a class with fewer); bottom.pte's features of the evaluation transform's images",
        source=images.source,
        items=images.items,
        feature_shape=list(feature_shape),
        dtype="int8",
        scales="float32 per channel, symmetric: max |x| / 127",
        bytes=len(data),
        bytes_per_row=int(np.prod(feature_shape)) + 4,
        max_abs_error=max_err,
        relative_rms_error=rel_err,
    )


def _int8_model_graph(plain, x1, calibration, validation, fp32_logits, config, report, log):
    """The int8 graph of ``model.pte`` checked in eager on the validation images: pure int8, or with
    the layers that cost most kept float32 when pure int8 loses too much (``config.mixed_precision``).
    Returns ``(graph, check, float layers, the floatable layers ranked costliest first)``; refuses
    when no graph is within the limit. With
    ``report`` (a path) the per-layer sensitivity is written there (measured in any case). With
    ``config.qat_epochs`` the graph is quantization-aware fine-tuned instead (no mixed precision)."""
    if config.qat_epochs:
        return _qat_model_graph(plain, calibration, validation, fp32_logits, config, log)
    log(f"  quantizing {MODEL_PTE} to int8 (PT2E, XNNPACK, {config.observer} ranges), calibrated on {len(calibration)} images ...")
    graph = quantize.int8_graph(plain, x1, calibration.images, observer=config.observer)
    # the quantized graph in eager first: a refusal costs no lowering
    reference = quantize.graph_outputs(graph, validation.images, 1)
    early = quantize.compare(f"{MODEL_PTE} (PT2E graph, before lowering)", reference, fp32_logits, validation.labels, 0.0)
    log(f"  {quantize.describe(early)}")
    over = early.accuracy_drop > config.max_accuracy_drop
    if not (report or (over and config.mixed_precision)):
        quantize.refuse_if_worse(early, config.max_accuracy_drop)
        return graph, early, [], []
    n = min(config.sensitivity_images, len(validation))
    log(f"  measuring each layer's int8 sensitivity on {n} validation images ...")
    found = sensitivity.measure(
        plain, calibration.images, validation.images[:n], validation.labels[:n], fp32_logits[:n], observer=config.observer, log=log
    )
    log("  the layers int8 costs most (each alone int8):\n" + "\n".join("    " + line for line in found.table(5).splitlines()))
    chosen = None
    if over and config.mixed_precision:
        log(f"  choosing layers to keep float32 (accuracy drop <= {config.max_accuracy_drop:g} points on {len(validation)} images) ...")
        drop = sensitivity.int8_drop(plain, calibration.images, validation.images, validation.labels, fp32_logits, observer=config.observer)
        floatable = set(et.quantizable_layers(plain, x1, floatable=True))
        ranking = [layer for layer in found.ranking() if layer in floatable]
        chosen = sensitivity.choose_float_layers(drop, ranking, config.max_accuracy_drop, log=log)
    if report:
        found.write(report, mixed_precision=chosen)
        log(f"  sensitivity report: {report}")
    if not over:
        return graph, early, [], []
    if chosen is None:
        quantize.refuse_if_worse(early, config.max_accuracy_drop)
    log(f"  {len(chosen.float_layers)} layer(s) stay float32: {', '.join(chosen.float_layers)}")
    graph = quantize.int8_graph(plain, x1, calibration.images, observer=config.observer, float_layers=chosen.float_layers)
    reference = quantize.graph_outputs(graph, validation.images, 1)
    early = quantize.compare(f"{MODEL_PTE} (PT2E graph, mixed precision, before lowering)", reference, fp32_logits, validation.labels, 0.0)
    log(f"  {quantize.describe(early)}")
    quantize.refuse_if_worse(early, config.max_accuracy_drop)
    return graph, early, chosen.float_layers, ranking


def _qat_model_graph(plain, calibration, validation, fp32_logits, config, log):
    """The quantization-aware fine-tuned int8 graph of ``model.pte``, checked in eager; refused when
    it is not within the limit. Returns what :func:`_int8_model_graph` returns."""
    log(
        f"  quantization-aware fine-tuning of {MODEL_PTE}'s int8 graph (PT2E, XNNPACK): {config.qat_epochs} epoch(s) on "
        f"{len(calibration)} calibration images, distilled from float32, lr {config.qat_lr:g} ..."
    )
    graph = qat.finetune_int8(plain, calibration.images, epochs=config.qat_epochs, lr=config.qat_lr, seed=config.seed, log=log)
    reference = quantize.graph_outputs(graph, validation.images, 1)
    early = quantize.compare(
        f"{MODEL_PTE} (PT2E graph, quantization-aware, before lowering)", reference, fp32_logits, validation.labels, 0.0
    )
    log(f"  {quantize.describe(early)}")
    quantize.refuse_if_worse(early, config.max_accuracy_drop)
    return graph, early, [], []


def _write_int8_model(writer, plain, x1, calibration, validation, fp32_logits, config, part_of, checks, report, log):
    """Quantize, lower and write ``model.pte``; check it on the validation images (refused when
    int8 loses too much). Returns the lowered program, max |int8 - float32| of the logits and the
    layers kept float32."""
    graph, _, float_layers, ranking = _int8_model_graph(plain, x1, calibration, validation, fp32_logits, config, report, log)
    retries = 1
    while True:
        log(f"  lowering {MODEL_PTE} (int8) to XNNPACK ...")
        res = inference.export_inference(graph, x1, part_of=part_of)
        path = writer.write(MODEL_PTE, res.program.buffer)
        log(f"  checking {MODEL_PTE} against float32 eager on {len(validation)} validation images ...")
        int8_logits = quantize.program_outputs(path, validation.images, 1)
        diff = float(np.abs(int8_logits - fp32_logits).max())
        check = quantize.compare(MODEL_PTE, int8_logits, fp32_logits, validation.labels, diff)
        log(f"  {quantize.describe(check)}")
        # XNNPACK's int8 kernels round unlike the eager graph: a choice just within the limit in eager
        # can land just over it; twice the float32 layers are tried then, once (more float32 layers
        # make a program about as large as float32 and slower, with the rest of its error left in
        # the adds, pools and padded convolutions that stay int8)
        retry = bool(float_layers) and len(float_layers) < len(ranking) and retries > 0
        if check.accuracy_drop <= config.max_accuracy_drop or not retry:
            break
        retries -= 1
        float_layers = ranking[: min(2 * len(float_layers), len(ranking))]
        log(f"  {len(float_layers)} layer(s) stay float32: {', '.join(float_layers)}")
        graph = quantize.int8_graph(plain, x1, calibration.images, observer=config.observer, float_layers=float_layers)
    quantize.refuse_if_worse(check, config.max_accuracy_drop)
    checks.append(check)
    return res, diff, float_layers


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


def _write_int8_bottom(writer, net, bottom, xb, calibration, validation, fp32_logits, checks, config, part_of, log):
    """Quantize, lower and write ``bottom.pte``; check its features through the float32 top (eager)
    on the validation images. Returns the lowered program and max |int8 - float32| of the features."""
    batch = config.batch_size
    log(f"  quantizing {BOTTOM_PTE} (the frozen bottom, batch {batch}) to int8, calibrated on {len(calibration)} images ...")
    graph = quantize.int8_graph(bottom, xb, calibration.images, observer=config.observer)
    res = inference.export_inference(graph, xb, part_of=part_of)
    path = writer.write(BOTTOM_PTE, res.program.buffer)
    log(f"  checking {BOTTOM_PTE} + the float32 top against float32 eager on {len(validation)} validation images ...")
    int8_features = torch.from_numpy(quantize.program_outputs(path, validation.images, batch))
    diff = float((int8_features - torch.from_numpy(quantize.eager_outputs(bottom, validation.images))).abs().max())
    with _in_eval_mode(net):
        int8_logits = quantize.eager_outputs(net.forward_top, int8_features)
    check = quantize.compare(f"{BOTTOM_PTE} + float32 top", int8_logits, fp32_logits, validation.labels, diff)
    log(f"  {quantize.describe(check)}")
    quantize.refuse_if_worse(check, config.max_accuracy_drop)
    checks.append(check)
    return res, diff


def _with_spare_classes(net: TransferModel, spare: int) -> TransferModel:
    """A copy of ``net`` whose classifier has ``spare`` inert outputs after its own (the caller's
    network is left as it is)."""
    import copy

    net = copy.deepcopy(net)
    parent, attr, linear = classifier_linear(net)
    setattr(parent, attr, SpareClassLinear(linear, spare))
    return net


def _embedding_mean(net: TransferModel, head: nn.Module, images: torch.Tensor) -> list[float]:
    """The mean of ``head``'s input over ``images`` (eval mode): where a new class's imprinted row
    is measured from on the device."""
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].double().sum(0)))
    try:
        with _in_eval_mode(net), torch.no_grad():
            for start in range(0, len(images), 32):
                net(images[start : start + 32])
    finally:
        hook.remove()
    return (torch.stack(captured).sum(0) / len(images)).float().tolist()


def _optimizer(config: ExportConfig, net: TransferModel) -> Optimizer:
    """The manifest's optimizer: its settings and the parameters weight decay applies to."""
    adamw = config.optimizer == "adamw"
    return Optimizer(
        name=config.optimizer,
        lr=config.lr,
        momentum=0.0 if adamw else config.momentum,
        dampening=0.0,
        weight_decay=config.weight_decay,
        nesterov=False,
        betas=list(config.betas) if adamw else None,
        eps=config.eps if adamw else None,
        weight_decay_parameters=decayed_names(net.trainable_parameters()),
    )


def _export_training_part(
    writer: BundleWriter,
    programs: Programs,
    verification: Verification,
    net: TransferModel,
    plain: nn.Module,
    policy: TrainPolicy,
    config: ExportConfig,
    *,
    num_classes: int,
    gen: torch.Generator,
    part_of,
    log: Callable[[str], None],
    int8_data=None,
    images: ImageSet | None = None,
) -> tuple[Programs, Verification, MemoryFigures]:
    """Export, write and verify ``bottom.pte`` and ``train.pte``/``.ptd``; the manifest sections they add.

    ``int8_data`` (calibration, validation, float32 logits on it, the list of checks to extend)
    makes ``bottom.pte`` int8; the training program stays float32 either way."""
    batch_size, image_size = config.batch_size, config.image_size
    lr, momentum, weight_decay, label_smoothing = config.lr, config.momentum, config.weight_decay, config.label_smoothing
    xb = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    bottom = inference.Bottom(training.without_dropout(net))
    if int8_data is not None:
        res, diff = _write_int8_bottom(writer, net, bottom, xb, *int8_data, config, part_of, log)
    else:
        log(f"  lowering {BOTTOM_PTE} (the frozen bottom, batch {batch_size}) to XNNPACK and checking it ...")
        res, diff = _write_checked_inference(writer, BOTTOM_PTE, bottom, xb, part_of)
    log(
        f"  {BOTTOM_PTE}: frozen bottom ({len(net.bottom_names)} units), XNNPACK{' int8' if int8_data else ''}, "
        f"lowered in {res.seconds:.1f}s, max |ExecuTorch - eager| = {diff:.3g}" + (" (int8 against float32 features)" if int8_data else "")
    )
    feature_shape = res.output_shape
    spare = None
    if config.spare_classes:
        net = _with_spare_classes(net, config.spare_classes)
        spare_name, head = spare_head(net)
        centre = None if images is None else _embedding_mean(net, head, images.images)
        spare = SpareClasses(
            count=config.spare_classes,
            weight=f"{spare_name}.weight",
            bias=f"{spare_name}.bias" if head.bias is not None else None,
            active=f"{spare_name}.active",
            embedding_size=head.in_features,
            embedding_mean=centre,
            embedding_mean_images=None if images is None else len(images),
        )
        log(
            f"  {config.spare_classes} spare classes: {spare.weight} has {head.out_features} rows, {num_classes} of them active; "
            + (f"imprinting centre from {len(images)} images ({images.source})" if images else "no images: imprinting from 0")
        )

    log(f"  exporting the training program ({TRAIN_PTE} + {TRAIN_PTD}) ...")
    outputs = num_classes + config.spare_classes
    ex = training.export_training(net, feature_shape=feature_shape, num_classes=outputs, label_smoothing=label_smoothing)
    pte = writer.write(TRAIN_PTE, ex.program.pte)
    ptd = writer.write(TRAIN_PTD, ex.program.ptd)
    log(
        f"  {TRAIN_PTE} + {TRAIN_PTD}: top {len(net.top_names)} units + head, {len(ex.parameter_names)} trainable tensors, "
        f"{len(ex.buffer_names)} running statistics, exported in {ex.seconds:.1f}s"
    )
    log(f"  {training.describe_kernels(ex)}")
    adamw = config.optimizer == "adamw"
    log(
        f"  verifying {config.verify_steps} SGD steps of ExecuTorch against eager PyTorch"
        + (" (the program's gradients) and the device's AdamW against torch.optim.AdamW ..." if adamw else " ...")
    )
    check = training.verify_training(
        net, ex, pte, ptd, steps=config.verify_steps, lr=lr, momentum=momentum, weight_decay=weight_decay,
        optimizer=config.optimizer, betas=config.betas, eps=config.eps,
    )  # fmt: skip
    log(
        f"  {config.verify_steps} SGD steps, ExecuTorch vs eager: loss max diff {check.loss_max_abs_diff:.3g}, "
        f"weights {check.weight_max_abs_diff:.3g}, "
        f"running stats {check.running_stats_max_abs_diff:.3g} (moved {check.running_stats_moved:.3g}), "
        f"predict with written weights {check.predict_max_abs_diff:.3g}; tolerance {training.WEIGHT_TOLERANCE:g}"
        + (
            ""
            if check.mask_flips is None
            else f"; the program's masks replayed in eager ({check.mask_flips} mask elements fell on the other side of "
            f"their threshold, each within {check.mask_flip_max_abs_diff:.2g} of it)"
        )
        + (
            f"; AdamW over the program's gradients, device rule vs torch.optim.AdamW: {check.adamw_rule_max_abs_diff:.3g} "
            f"(tolerance {training.ADAMW_RULE_TOLERANCE:g})"
            if adamw
            else ""
        )
    )
    log("  measuring the training program's memory against the profiler's prediction ...")
    mem = _memory_figures(plain, policy, ex, batch_size, image_size)
    log(
        f"  memory: saved for backward {mem.saved_for_backward_bytes_exported / 2**20:.2f} MiB exported vs "
        f"{mem.saved_for_backward_bytes_predicted / 2**20:.2f} MiB predicted by the eager profiler "
        f"({mem.saved_uint8_masks} uint8 masks); planned arena {mem.planned_arena_bytes['forward'] / 2**20:.2f} MiB"
    )
    features = TensorSpec("features", list(feature_shape), "float32", layout="NCHW")
    logits = TensorSpec("logits", [batch_size, outputs], "float32")
    methods = {
        "forward": Method(
            inputs=[features, TensorSpec("labels", [batch_size], "int64")],
            outputs=[TensorSpec("loss", [], "float32"), logits]
            + [TensorSpec(n, list(ex.program.layout[n].shape), ex.program.layout[n].dtype) for n in ex.buffer_names],
            then="one gradient per trainable parameter, then the parameters (ExecuTorch training layout; "
            "__et_training_gradients_index_forward says where the gradients start)",
        ),
        "predict": Method(inputs=[features], outputs=[logits]),
    }
    if spare is not None:
        methods["embed"] = Method(inputs=[features], outputs=[TensorSpec("embedding", [batch_size, spare.embedding_size], "float32")])
    train = TrainingProgram(
        file=TRAIN_PTE,
        data=TRAIN_PTD,
        batch_size=batch_size,
        methods=methods,
        trainable_parameters=ex.parameter_names,
        buffers=ex.buffer_names,
        weights_layout=dict(sorted(ex.program.layout.items())),
        optimizer=_optimizer(config, net),
        loss=Loss(name="cross_entropy", label_smoothing=label_smoothing),
        custom_operators=ex.custom_operators,
        operators=ex.program.operators,
        differences_from_eager=list(DIFFERENCES),
        spare_classes=spare,
    )
    programs = Programs(inference=programs.inference, bottom=_xnnpack_program(BOTTOM_PTE, res, "features"), training=train)
    verification = Verification(inference_max_abs_diff=verification.inference_max_abs_diff, bottom_max_abs_diff=diff, training=check)
    return programs, verification, mem
