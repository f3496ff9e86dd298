"""The trainable program: the top K MobileTL blocks, head and loss as one ExecuTorch training program.

``train.pte`` holds two methods over the frozen bottom's NCHW features:

* ``forward(features, labels) -> (loss, logits, running statistics..., gradients...,
  parameters...)``: one training step's forward and backward (``torch.export`` -> ``_export_forward_backward`` -> ``to_edge`` ->
  ``to_executorch``), the optimizer being the caller's (the device's SGD or AdamW);
* ``predict(features) -> logits``: the same top in eval mode (running statistics), for
  classification with the weights training produced.

``train.ptd`` holds what training changes: the policy's trainable parameters and the running
statistics of the train-mode batch norms (each block's last norm and the final conv stage's).
Both methods read them by name, so writing a new ``.ptd`` (on the device) is how trained weights
are saved, resumed and used for inference.

The program runs the channels-last form of the top (:mod:`edgetl.exporter.nhwc`) on ExecuTorch's
portable CPU kernels; MobileTL's custom backward formulas (1-bit masks, shift-only norms) are
recorded by ``_export_forward_backward`` before the custom operators are decomposed to ATen.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.export.graph_signature import OutputKind
from torch.nn import functional as F
from torchvision.ops import StochasticDepth

from edgetl.exporter import _executorch as et
from edgetl.exporter import device_ops, inference, memory, nhwc
from edgetl.exporter.device_optim import AdamW
from edgetl.exporter.errors import ExportError, UnsupportedModelError, VerificationError
from edgetl.exporter.inference import locate_operator
from edgetl.exporter.manifest import TrainingCheck
from edgetl.nn import ops
from edgetl.nn.layers import MaskedActivation
from edgetl.nn.spare import cross_entropy, spare_head
from edgetl.train.optim import ADAMW_BETAS, ADAMW_EPS, build_optimizer, decayed_names
from edgetl.train.prepare import TransferModel

#: verification tolerances: |loss_et - loss_eager| per step and |w_et - w_eager| per element after
#: the steps, both relative to max(1, |reference|) (float32 summation order differs between the
#: portable kernels, MKL and the decomposed ops)
LOSS_TOLERANCE = 1e-4
WEIGHT_TOLERANCE = 1e-4
#: ... or within this fraction of the largest update eager SGD made to that tensor: a network whose
#: backward amplifies rounding (vanilla batch norm over near-constant channels of the random
#: verification features) differs by more than 1e-4 in absolute terms while its updates agree to
#: 0.1%; a wrong backward formula is off by the size of the update itself
UPDATE_TOLERANCE = 1e-2
#: ... for all but this fraction of a tensor's elements (see _weights_disagree)
OUTLIER_FRACTION = 0.01


def without_dropout(net: TransferModel) -> TransferModel:
    """A copy of ``net`` with dropout and stochastic depth off: the program's semantics in eager."""
    net = copy.deepcopy(net)
    for m in net.modules():
        if isinstance(m, (nn.Dropout, StochasticDepth)):
            m.p = 0.0
    return net


def check_policy(policy) -> None:
    """Raise :class:`ExportError` (one line) for a policy the training program cannot carry."""
    if policy.saved_precision != "fp32":
        raise ExportError(
            f"the training program keeps conv inputs in fp32 only: TrainPolicy.saved_precision={policy.saved_precision!r} "
            "is eager-only (export with saved_precision='fp32', or without the training program)"
        )


def drop_aliases(ep: torch.export.ExportedProgram) -> int:
    """Remove ``aten.alias`` nodes (uses read the aliased tensor itself); returns how many.

    Autograd saves a custom operator's *output* for backward (MobileTL's masks are read off the
    activation's output) as ``alias(output)``. The graph is functional, so the alias is the same
    values, but ExecuTorch has no views: it emits ``alias_copy``, a full copy of every saved
    activation, kept alive from forward to backward. That doubled what MobileTL saves in the
    program's memory plan.
    """
    graph = ep.graph_module.graph
    outputs = set(graph.output_node().all_input_nodes)
    dropped = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.alias.default and node not in outputs:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            dropped += 1
    ep.graph_module.recompile()
    return dropped


@dataclass
class TrainingExport:
    """The emitted training program and what the export learned about it."""

    program: et.TrainingProgram
    parameter_names: list[str]
    buffer_names: list[str]
    feature_shape: tuple[int, ...]  # N x C x H x W
    num_classes: int
    saved: list[memory.SavedTensor]
    seconds: float
    label_smoothing: float = 0.0
    #: edgetl's kernel library the program's depthwise, 1x1 and activation operators run on
    #: (``deploy/native/kernels``), or None: those operators decomposed into ATen
    kernel_library: str | None = None
    #: with ``record_activations``: the masked activations whose inputs ``forward`` returns
    activation_names: list[str] = field(default_factory=list)
    #: outputs beyond the known classes (:mod:`edgetl.nn.spare`); ``num_classes`` counts them
    spare_classes: int = 0

    @property
    def known_classes(self) -> int:
        return self.num_classes - self.spare_classes

    @property
    def custom_operators(self) -> list[str]:
        """The operators only edgetl's kernel library implements (``edgetl_export::*.out``)."""
        return sorted({op for ops in self.program.operators.values() for op in ops if op.startswith("edgetl_export::")})


def export_training(
    net: TransferModel,
    *,
    feature_shape: tuple[int, ...],
    num_classes: int,
    label_smoothing: float = 0.0,
    native_kernels: bool | None = None,
    record_activations: bool = False,
) -> TrainingExport:
    """Export ``net``'s top (trained per its policy) with a cross-entropy loss as a training program.

    ``feature_shape`` is the bottom's output for one batch (N x C x H x W). ``native_kernels``:
    keep depthwise and 1x1 convolutions and masked activations as edgetl's operators, run by
    ``deploy/native``'s kernels (default: when that kernel library is built, see
    :func:`et.load_native_kernels`), else decompose them into ATen operators any ExecuTorch
    runtime has (a device step several times slower: ``benchmarks/device_step.py``). ``record_activations``: the verification's
    replay program (:class:`~edgetl.exporter.nhwc.TrainableTop`'s option; no ``predict`` method).
    Raises :class:`UnsupportedModelError` when a layer has no exportable form or an operator no
    kernel.
    """
    check_policy(net.policy)
    library = None if native_kernels is False else et.load_native_kernels()
    if native_kernels and library is None:
        raise UnsupportedModelError("edgetl's kernel library is not built (deploy/native/build.sh)")
    native_kernels = library is not None
    t0 = time.perf_counter()
    top = nhwc.trainable_top(net, label_smoothing=label_smoothing, record_activations=record_activations)
    spare = spare_head(net)
    features = torch.zeros(feature_shape)
    labels = torch.arange(feature_shape[0]) % num_classes
    decomps = device_ops.decompositions(native_kernels)
    methods = {}
    if not record_activations:
        # eval first: the train-mode trace records running-statistic updates but must not see them
        top.eval()
        with torch.no_grad():
            methods["predict"] = torch.export.export(top, (features,), strict=False).run_decompositions(decomps)
            if spare is not None:  # what weight imprinting averages, under the same tensor names
                top.output = "embedding"
                methods["embed"] = torch.export.export(top, (features,), strict=False).run_decompositions(decomps)
                top.output = "logits"
    top.train()
    forward = torch.export.export(top, (features, labels), strict=False)
    joint = et.export_forward_backward(forward).run_decompositions(decomps)
    drop_aliases(joint)
    methods["forward"] = joint
    activations = top.activation_order(features) if record_activations else []

    specs = joint.graph_signature.output_specs
    grads = [s.target for s in specs if s.kind == OutputKind.GRADIENT_TO_PARAMETER]
    expected = [name for name, _ in net.trainable_parameters()]
    if sorted(grads) != sorted(expected):
        raise UnsupportedModelError(
            f"the exported backward computes gradients for {sorted(set(grads) ^ set(expected))} unlike the policy's trainable parameters"
        )
    mutated = [name for name, _ in top.updated_buffers()]
    if sorted(mutated) != sorted(s.target for s in specs if s.kind == OutputKind.BUFFER_MUTATION):
        raise UnsupportedModelError("the exported step updates buffers other than the batch-norm running statistics")
    saved = memory.saved_for_backward(joint)
    part_of = lambda path: nhwc.describe_part(net, path)  # noqa: E731
    graphs = [forward.graph, joint.graph]
    try:
        program = et.emit_training_program(methods, external=set(grads) | set(mutated) | ({f"{spare[0]}.active"} if spare else set()))
    except et.MissingKernelError as exc:
        raise UnsupportedModelError(
            "; ".join(f"operator {op} has no ExecuTorch out-variant, used in {locate_operator(op, graphs, part_of)}" for op in exc.ops)
        ) from None
    kernels = et.registered_operators()
    missing = sorted({op for ops in program.operators.values() for op in ops if op not in kernels})
    if missing:
        raise UnsupportedModelError(
            "; ".join(
                f"operator {op} has no kernel in this ExecuTorch runtime, used in {locate_operator(op, graphs, part_of)}" for op in missing
            )
        )
    seconds = time.perf_counter() - t0
    return TrainingExport(
        program,
        grads,
        mutated,
        tuple(feature_shape),
        num_classes,
        saved,
        seconds,
        label_smoothing,
        library and str(library),
        activations,
        spare[1].out_features - spare[1].known if spare is not None else 0,
    )


def describe_kernels(export: TrainingExport) -> str:
    """Which device kernels the program calls and where they were found, or what their absence costs."""
    if export.kernel_library is not None:
        names = ", ".join(op.split("::")[1].removesuffix(".out") for op in export.custom_operators)
        return f"device kernels: {len(export.custom_operators)} of edgetl's ({names}) from {export.kernel_library}"
    return (
        "device kernels: none of edgetl's (no kernel library: deploy/native/build.sh builds it, EDGETL_NATIVE_KERNELS names "
        "another): depthwise and 1x1 convolutions and masked activations are decomposed into ATen operators, a device "
        "step 2-3x slower than with the kernels (benchmarks/device_step.py)"
    )


def _prepared(model: nn.Module, policy, batch_size: int, image_size: int) -> tuple[TransferModel, tuple[int, ...]]:
    """``model`` prepared under ``policy``, and its frozen bottom's output shape for one batch."""
    from edgetl.train.prepare import prepare

    net = prepare(model, policy)
    with torch.no_grad():
        return net, tuple(inference.Bottom(without_dropout(net))(torch.zeros(batch_size, 3, image_size, image_size)).shape)


def program_memory(model: nn.Module, policy, *, batch_size: int, image_size: int, num_classes: int):
    """The memory an exported training program of ``model`` under ``policy`` would cost on the
    device (its planned arena, weights file, trainable bytes, one image's features): the program
    is emitted, not lowered, verified or written. Seconds to a minute: the planner's native runtime."""
    from edgetl.profiler.native import ProgramMemory

    net, feature_shape = _prepared(model, policy, batch_size, image_size)
    ex = export_training(net, feature_shape=feature_shape, num_classes=num_classes)
    trainable = sum(ex.program.layout[name].nbytes for name in ex.parameter_names)
    return ProgramMemory(sum(ex.program.planned_bytes["forward"]), len(ex.program.ptd), trainable, 4 * math.prod(feature_shape[1:]))


def verify_program(
    model: nn.Module,
    policy,
    *,
    batch_size: int,
    image_size: int,
    num_classes: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    optimizer: str = "sgd",
) -> TrainingCheck:
    """Export the training program of ``model`` under ``policy`` and verify it against eager, as
    ``edgetl export --training`` does, without writing a bundle (the native planner's check of
    its choice). Raises :class:`ExportError` (one line) for a program that cannot be made or is refused."""
    net, feature_shape = _prepared(model, policy, batch_size, image_size)
    ex = export_training(net, feature_shape=feature_shape, num_classes=num_classes)
    with tempfile.TemporaryDirectory() as tmp:
        pte, ptd = Path(tmp) / "train.pte", Path(tmp) / "train.ptd"
        pte.write_bytes(ex.program.pte)
        ptd.write_bytes(ex.program.ptd)
        return verify_training(net, ex, pte, ptd, lr=lr, momentum=momentum, weight_decay=weight_decay, optimizer=optimizer)


def _weights_disagree(got: np.ndarray, want: np.ndarray, initial: np.ndarray) -> bool:
    """More than OUTLIER_FRACTION of the elements differ beyond both tolerances (weights and update).

    A few elements may: a clamp or ReLU6 whose input sits at 0 or 6 flips its mask between two
    float summation orders, and the pixels it gates change the gradient of the few weights that
    see them. A wrong backward formula moves most elements."""
    allowed = max(WEIGHT_TOLERANCE * max(1.0, float(np.abs(want).max())), UPDATE_TOLERANCE * float(np.abs(want - initial).max()))
    outliers = int((np.abs(got - want) > allowed).sum())
    return outliers > OUTLIER_FRACTION * want.size


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max()))) if a.size else 0.0


class _ReplayedMask(torch.autograd.Function):
    """An activation's exact forward with a backward through a given mask (over ``divisor``: 6
    for Hard-Sigmoid, whose slope is 1/6, as :mod:`edgetl.nn.ops` computes it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kind: str, mask: torch.Tensor, divisor: float) -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.divisor = divisor
        return ops.activation_forward(x, kind)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        g = torch.where(mask, grad, 0.0)
        return (g if ctx.divisor == 1.0 else g / ctx.divisor), None, None, None


class _Replayed(nn.Module):
    """A :class:`MaskedActivation` of the eager reference that back-propagates through the mask the
    ExecuTorch program computed (``replay``), and keeps eager's own input to compare."""

    def __init__(self, act: MaskedActivation) -> None:
        super().__init__()
        self.act = act
        self.seen: torch.Tensor | None = None
        self.program_input: torch.Tensor | None = None

    def _mask(self, x: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        kind = self.act.kind
        if kind == "sigmoid":
            return None  # a continuous derivative: nothing to replay
        if kind == "hardsigmoid":
            y = F.hardsigmoid(x)
            return (y > 0) & (y < 1), 6.0
        return ops.mask_from_input(x, kind, self.act.rule), 1.0

    def replay(self, program_input: torch.Tensor) -> None:
        self.program_input = program_input

    def flips(self) -> tuple[int, float]:
        """Elements whose mask differs between eager's input and the program's, and the largest
        input difference at one of them, relative to max(1, largest eager input)."""
        mine, theirs = self._mask(self.seen), self._mask(self.program_input)
        if mine is None:
            return 0, 0.0
        flipped = mine[0] != theirs[0]
        if not flipped.any():
            return 0, 0.0
        gap = (self.program_input - self.seen)[flipped].abs().max() / max(1.0, float(self.seen.abs().max()))
        return int(flipped.sum()), float(gap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x.detach()
        mask = None if self.program_input is None else self._mask(self.program_input)
        if mask is None:
            return self.act(x)
        if mask[0].shape != x.shape:
            raise RuntimeError(f"the program's activation input has shape {tuple(mask[0].shape)}, eager's {tuple(x.shape)}")
        return _ReplayedMask.apply(x, self.act.kind, mask[0], mask[1])


def _replaying(eager: TransferModel, names: list[str]) -> dict[str, _Replayed]:
    """Swap ``eager``'s masked activations ``names`` for :class:`_Replayed` ones (in place)."""
    replayed = {}
    for name in names:
        parent, _, attr = name.rpartition(".")
        act = eager.get_submodule(name)
        if not isinstance(act, MaskedActivation):
            raise RuntimeError(f"{name} is not a masked activation in eager")
        replayed[name] = _Replayed(act)
        setattr(eager.get_submodule(parent), attr, replayed[name])
    return replayed


def _nchw(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(x).copy())
    return t.permute(0, 3, 1, 2) if t.dim() == 4 else t  # the program's maps are channels-last


@dataclass
class _Comparison:
    """One run of the verification steps: the figures and what disagreed."""

    check: TrainingCheck
    failures: list[str]


def verify_training(
    net: TransferModel,
    export: TrainingExport,
    pte: Path,
    ptd: Path,
    *,
    steps: int = 3,
    lr: float,
    momentum: float,
    weight_decay: float,
    optimizer: str = "sgd",
    betas: tuple[float, float] = ADAMW_BETAS,
    eps: float = ADAMW_EPS,
    seed: int = 0,
    batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> TrainingCheck:
    """Run ``steps`` steps of ``optimizer`` (``"sgd"``: ``momentum``; ``"adamw"``: ``betas``,
    ``eps``) in the ExecuTorch program and in eager PyTorch from the same weights on the same
    batches (random features, or ``batches`` of features and labels, e.g. a device's epoch);
    raise :class:`VerificationError` when they disagree beyond tolerance. Weight decay applies to
    conv and linear weights alone on both sides (``edgetl.train.optim.decays``).

    Eager side: ``net`` (dropout off) with ``torch.optim.SGD``. ExecuTorch side: the program and
    ExecuTorch's SGD over the same parameter groups. An AdamW bundle is verified in two parts: its
    program's gradients so, through SGD steps (momentum 0) at its learning rate and weight decay,
    and the device's AdamW rule (:mod:`edgetl.exporter.device_optim`, the arithmetic of
    ``edgetl-device``) against ``torch.optim.AdamW`` stepping the program's own gradients
    (:func:`_check_adamw_rule`). AdamW divides each gradient by its running magnitude, so an
    element whose gradient is float32 rounding noise (a channel the batch barely reaches) moves by
    up to the learning rate in one implementation and not in the other: a trajectory of eager's
    AdamW against the program's cannot agree at the weight tolerance however exact the gradients.
    Also checks the running statistics (updated on the ExecuTorch side, equal to
    eager's) and that a ``.ptd`` written from the session feeds ``predict`` the trained weights.

    MobileTL's sign mask is a step function of the activation input, so an input within float32
    rounding of 0 is kept by one implementation and dropped by the other (ExecuTorch's portable
    kernels and PyTorch's sum in different orders): one such element in a 6 x 6 map moves its
    channel's gradient by ~1/300, and every layer below it, and a deep top has a few per step. When
    the plain comparison disagrees, it is repeated with the program's own masks replayed in eager:
    a replay program (the same export, also returning every masked activation's input) runs in
    lockstep with ``pte`` and must match it bit for bit; eager back-propagates through its masks;
    and where a mask bit differs, the program's and eager's inputs must agree within the weight
    tolerance (relative to the layer's largest input), so a mask differs only within that distance
    of its threshold. That repeat also starts every step from the program's state (weights and
    running statistics loaded into eager) and compares that step's result: some tops amplify
    rounding step over step (MobileNetV2 with every block trained, at random initialisation, moves
    its third loss by 2% in eager PyTorch alone when its weights change by 1e-7), so a trajectory
    of several steps cannot agree in float32 between any two implementations, while each step
    does. Its eager side computes in float64, the exact step: from such a state eager float32's
    own gradients can be tens of percent from it while the program's are within 1e-4
    (``benchmarks/training_precision.py``), so the program is held to the step it
    implements, not to another float32 rounding of it. The tolerances are the plain comparison's,
    the update they allow being that step's.
    """
    if batches is None:
        gen = torch.Generator().manual_seed(seed)
        n = export.feature_shape[0]
        batches = [
            (torch.randn(export.feature_shape, generator=gen).abs(), torch.randint(0, export.known_classes, (n,), generator=gen))
            for _ in range(steps)
        ]
    steps = len(batches)
    # the gradients are checked through SGD steps (an AdamW bundle: momentum 0; see above)
    settings = {"lr": lr, "momentum": momentum if optimizer == "sgd" else 0.0, "weight_decay": weight_decay}
    result = _compare(net, export, pte, ptd, batches, **settings)
    if result.failures and _has_masks(net):
        replay = export_training(
            net,
            feature_shape=export.feature_shape,
            num_classes=export.num_classes,
            label_smoothing=export.label_smoothing,
            native_kernels=export.kernel_library is not None,
            record_activations=True,
        )
        result = _compare(net, export, pte, ptd, batches, replay=replay, **settings)
    if result.failures:
        raise VerificationError(
            f"training program does not match eager PyTorch over {steps} SGD steps: "
            + "; ".join(result.failures)
            + " (a defect of edgetl's training export: a bundle without --training is unaffected)"
        )
    if optimizer == "adamw":
        diff = _check_adamw_rule(net, export, pte, ptd, batches, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
        return dataclasses.replace(result.check, adamw_rule_max_abs_diff=diff)
    return result.check


#: the device's AdamW against torch.optim.AdamW on the same gradients: float32 rounding alone
#: (torch fuses its moment update), relative to max(1, |weight|)
ADAMW_RULE_TOLERANCE = 1e-6


def _check_adamw_rule(
    net: TransferModel,
    export: TrainingExport,
    pte: Path,
    ptd: Path,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
) -> float:
    """Step the program with the device's AdamW over ``batches`` and ``torch.optim.AdamW`` over
    copies of its weights fed the same gradients (eager's parameter groups: the same decayed
    parameters); the largest relative weight difference, or :class:`VerificationError`."""
    shapes = {k: p.shape for k, p in net.trainable_parameters()}
    decay = decayed_names(net.trainable_parameters())
    session = et.TrainingSession(pte, ptd, buffer_names=export.buffer_names)
    device = reference = named = None
    worst = 0.0
    for x, y in batches:
        session.forward_backward(x.numpy(), y.numpy())
        if device is None:
            params = session.parameter_arrays()
            named = [(k, nn.Parameter(torch.from_numpy(params[k].copy()).reshape(shapes[k]))) for k in export.parameter_names]
            reference = build_optimizer("adamw", named, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
            device = AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decay=decay)
        grads = session.gradient_arrays()
        for k, p in named:
            p.grad = torch.from_numpy(np.asarray(grads[k]).copy()).reshape(p.shape)
        reference.step()
        device.step(grads)
        for k, p in named:
            worst = max(worst, _max_rel(device.params[k].reshape(p.shape), p.detach().numpy()))
    if not worst <= ADAMW_RULE_TOLERANCE:
        raise VerificationError(
            f"the device's AdamW differs from torch.optim.AdamW by {worst:.3g} over the program's gradients "
            f"(tolerance {ADAMW_RULE_TOLERANCE:g}; a defect of edgetl's AdamW)"
        )
    return worst


def _has_masks(net: TransferModel) -> bool:
    return any(isinstance(m, MaskedActivation) for m in net.modules())


def _compare(
    net: TransferModel,
    export: TrainingExport,
    pte: Path,
    ptd: Path,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    replay: TrainingExport | None = None,
) -> _Comparison:
    """The verification's steps, eager against ``pte`` (and, with ``replay``, its masks replayed)."""
    steps = len(batches)
    eager = without_dropout(net).train()
    # the replayed comparison's reference is the exact step: eager in float64 (see verify_training)
    reference = torch.float64 if replay is not None else torch.float32
    eager = eager.to(reference)
    replayed = _replaying(eager, replay.activation_names) if replay else {}
    initial_params = {k: p.detach().clone().numpy() for k, p in eager.trainable_parameters()}
    decay = decayed_names(eager.trainable_parameters())
    opt = build_optimizer("sgd", eager.trainable_parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    def device_optimizer(s: et.TrainingSession):  # ExecuTorch's SGD over the same parameter groups
        return s.sgd(lr, momentum=momentum, weight_decay=weight_decay, decay=decay).step

    head = spare_head(eager)
    active = head[1].active if head else None
    session = et.TrainingSession(pte, ptd, buffer_names=export.buffer_names)
    failures: list[str] = []
    with tempfile.TemporaryDirectory(dir=ptd.parent) as tmp:
        twin = None
        if replay is not None:
            (Path(tmp) / "replay.pte").write_bytes(replay.program.pte)
            (Path(tmp) / "replay.ptd").write_bytes(replay.program.ptd)
            twin = et.TrainingSession(Path(tmp) / "replay.pte", Path(tmp) / "replay.ptd", buffer_names=export.buffer_names)
        losses_eager, losses_et = [], []
        sgd = twin_sgd = None
        weights_file = ptd.read_bytes()
        initial_buffers = {k: et.read_ptd_tensor(weights_file, export.program.layout[k]).copy() for k in export.buffer_names}
        off_weights: dict[str, tuple[int, float]] = {}  # tensor -> first step it disagreed, by how much
        flips, flip_gap = 0, 0.0
        for step, (x, y) in enumerate(batches, 1):
            if replay is not None and step > 1:
                _take_state(eager, session.state())
            before = {k: p.detach().clone().numpy() for k, p in eager.trainable_parameters()} if replay else initial_params
            out = session.forward_backward(x.numpy(), y.numpy())
            if twin is not None:
                twin_out = twin.forward_backward(x.numpy(), y.numpy())
                if not _identical(session, out, twin, twin_out):
                    failures.append(f"the replay program does not reproduce the training program bit for bit at step {step}")
                    break
                for name, value in zip(replay.activation_names, twin_out[2 : 2 + len(replay.activation_names)], strict=True):
                    replayed[name].replay(_nchw(value))
            loss = cross_entropy(eager.forward_top(x.to(reference)), y, label_smoothing=export.label_smoothing, active=active)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for act in replayed.values():
                count, gap = act.flips()
                flips, flip_gap = flips + count, max(flip_gap, gap)
            losses_eager.append(loss.item())
            losses_et.append(float(out[0]))
            sgd = sgd or device_optimizer(session)
            sgd()
            if twin is not None:
                twin_sgd = twin_sgd or device_optimizer(twin)
                twin_sgd()
            state = {k: np.asarray(v) for k, v in session.named_parameters().items()}
            for k, p in eager.trainable_parameters():
                want = p.detach().numpy()
                if k not in off_weights and _weights_disagree(state[k].reshape(want.shape), want, before[k]):
                    off_weights[k] = (step, _max_rel(state[k].reshape(want.shape), want))
    state = session.state()
    eager_state = {k: v.detach().numpy() for k, v in eager.state_dict().items()}
    weight_diff = max(_max_rel(state[k], eager_state[k]) for k in export.parameter_names)
    float_buffers = [k for k in export.buffer_names if state[k].dtype.kind == "f"]
    stats_diff = max((_max_rel(state[k], eager_state[k]) for k in float_buffers), default=0.0)
    moved = max((float(np.abs(state[k] - initial_buffers[k]).max()) for k in float_buffers), default=0.0)
    predict_diff = _predict_readback(eager, export, pte, ptd, state, batches[0][0])
    check = TrainingCheck(
        steps,
        losses_eager,
        losses_et,
        max((abs(a - b) / max(1.0, abs(b)) for a, b in zip(losses_et, losses_eager, strict=True)), default=0.0),
        weight_diff,
        stats_diff,
        moved,
        predict_diff,
        {"loss": LOSS_TOLERANCE, "weights": WEIGHT_TOLERANCE, "running_stats": WEIGHT_TOLERANCE, "predict": WEIGHT_TOLERANCE},
        mask_flips=flips if replay else None,
        mask_flip_max_abs_diff=flip_gap if replay else None,
    )
    pairs = zip(losses_et, losses_eager, strict=True)
    loss_steps = [i for i, (a, b) in enumerate(pairs, 1) if not abs(a - b) / max(1.0, abs(b)) <= LOSS_TOLERANCE]
    if loss_steps:
        failures.append(f"the loss differs by {check.loss_max_abs_diff:.3g} from step {loss_steps[0]} (tolerance {LOSS_TOLERANCE:g})")
    failures += [
        f"{what} differs by {value:.3g} (tolerance {tol:g})"
        for what, value, tol in (
            ("running statistics", check.running_stats_max_abs_diff, WEIGHT_TOLERANCE),
            ("predict logits with the written weights", check.predict_max_abs_diff, WEIGHT_TOLERANCE),
            ("an activation input where the program's mask and eager's differ", check.mask_flip_max_abs_diff or 0.0, WEIGHT_TOLERANCE),
        )
        if not value <= tol
    ]
    if off_weights:
        first = sorted(off_weights.items(), key=lambda kv: kv[1][0])[:3]
        failures.append(
            f"updated weights differ (tolerance {WEIGHT_TOLERANCE:g}, or {UPDATE_TOLERANCE:g} of the update): "
            + ", ".join(f"{k} by {diff:.3g} at step {step}" for k, (step, diff) in first)
            + (f" and {len(off_weights) - 3} more tensors" if len(off_weights) > 3 else "")
        )
    if float_buffers and not moved > 0:
        failures.append("the running statistics did not change on the ExecuTorch side")
    return _Comparison(check, failures)


def _take_state(eager: TransferModel, state: dict[str, np.ndarray]) -> None:
    """Load the program's weights and running statistics into ``eager`` in place (its optimizer
    keeps its own momentum, which differs from the program's by rounding alone)."""
    with torch.no_grad():
        for k, t in eager.state_dict().items():
            if k in state:
                t.copy_(torch.from_numpy(np.asarray(state[k]).copy()).reshape(t.shape))


def _identical(session: et.TrainingSession, out: list, twin: et.TrainingSession, twin_out: list) -> bool:
    """The replay program's loss, logits, gradients and running statistics equal the training program's, bit for bit."""
    n = len(session.buffer_names)
    mine = [out[0], out[1], *out[len(out) - n :]] if n else [out[0], out[1]]
    theirs = [twin_out[0], twin_out[1], *twin_out[len(twin_out) - n :]] if n else [twin_out[0], twin_out[1]]
    grads, twin_grads = session.named_gradients(), twin.named_gradients()
    mine += [np.asarray(grads[k]) for k in sorted(grads)]
    theirs += [np.asarray(twin_grads[k]) for k in sorted(grads)]
    return all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(mine, theirs, strict=True))


def _predict_readback(eager: TransferModel, export: TrainingExport, pte: Path, ptd: Path, state: dict, features: torch.Tensor) -> float:
    """``predict`` over a ``.ptd`` written from the session's state (the device's write-back path)
    against eager eval with those same weights."""
    with tempfile.TemporaryDirectory(dir=ptd.parent) as tmp:
        trained = Path(tmp) / "trained.ptd"
        trained.write_bytes(et.write_ptd(ptd.read_bytes(), export.program.layout, state))
        got = et.Program(pte, trained).run("predict", features.numpy())[0]
    # the reference is eager eval over the *ExecuTorch session's* weights: what is checked is that
    # predict reads back the written weights, not the SGD agreement checked above, which a network
    # with near-dead channels (running variance ~1e-8, so a shift-only norm scales by ~300)
    # amplifies from 1e-6 in the weights to 1e-3 in the logits
    readback = copy.deepcopy(eager).float()
    readback.load_state_dict(
        {
            k: torch.from_numpy(np.asarray(state[k]).copy()).reshape(v.shape).to(v.dtype) if k in state else v
            for k, v in eager.state_dict().items()
        }
    )
    with torch.no_grad():
        want = readback.eval().forward_top(features).numpy()
    return _max_rel(got, want)
