"""ExecuTorch export: XNNPACK programs, the trainable program, the bundle and its errors.

The MobileNetV2 training bundle (K=2, 64 px, batch 4) is exported once per session through
``edgetl export`` by tests/conftest.py (``training_bundle``) and shared with tests/test_native.py.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import edgetl
from edgetl.cli import main
from edgetl.exporter import _executorch as et
from edgetl.exporter import bundle as bundle_mod
from edgetl.exporter import device_ops, inference, memory, nhwc, training
from edgetl.exporter.errors import ExecutorchMissingError, ExportError, UnsupportedModelError, VerificationError
from edgetl.exporter.manifest import (
    FORMAT,
    Created,
    InputInfo,
    Manifest,
    ModelInfo,
    Optimizer,
    Programs,
    RuntimeInfo,
    TensorSpec,
    Verification,
    XnnpackProgram,
)
from edgetl.exporter.weights import apply_device_weights, load_weights
from edgetl.models.zoo import architecture_mismatch, identify_model, load_model, model_spec
from edgetl.nn import ops
from edgetl.profiler.native import NATIVE_RUNTIME_BYTES
from edgetl.profiler.predict import predict_units
from edgetl.train.run import read_weights
from tests.conftest import CLASSES, EXPORT_BATCH, EXPORT_IMAGE_SIZE, calibrate, export_eager_net, export_policy

IMAGE_SIZE, BATCH = EXPORT_IMAGE_SIZE, EXPORT_BATCH
POLICY = export_policy()


def cli(argv: list[str]) -> int:
    """``edgetl`` itself, with tracebacks (``--debug``) so a failing test shows where."""
    return main(["--debug", *argv])


@pytest.fixture(scope="module")
def bundle(training_bundle) -> edgetl.ExportBundle:
    return edgetl.ExportBundle.load(training_bundle)


@pytest.fixture(scope="module")
def eager(export_run) -> edgetl.TransferModel:
    """The run's model as the bundle's training program trains it (dropout off); copy before training it."""
    return export_eager_net(export_run)


# --- the bundle ---------------------------------------------------------------------------------


def test_manifest_describes_the_programs(bundle, eager):
    m = bundle.manifest
    train = m.programs.training
    # scripts/test.sh builds the native kernels before the suite: every 1x1 and depthwise
    # convolution, masked activation and norm of the top runs on them
    assert train.custom_operators == [
        f"edgetl_export::{op}.out"
        for op in (
            "activation", "channel_affine", "channel_center", "channel_dot", "channel_scale", "channel_sum", "channel_sumsq",
            "depthwise_grad_input",
            "depthwise_grad_weight", "depthwise_nhwc", "exact_act", "exact_act_grad", "mask_grad", "pointwise_grad_input",
            "pointwise_grad_weight", "pointwise_nhwc",
        )
    ]  # fmt: skip
    assert sorted(m.files) == ["bottom.pte", "model.pte", "train.ptd", "train.pte"]
    assert m.format == FORMAT and m.created.executorch == et.executorch_version() and m.created.edgetl == edgetl.__version__
    assert m.model == ModelInfo("mobilenet_v2", len(CLASSES), list(CLASSES), POLICY.to_dict())
    spec = model_spec("mobilenet_v2")
    assert (m.input.mean, m.input.std, m.input.image_size, m.input.resize_short_side) == (list(spec.mean), list(spec.std), 64, 73)
    assert [t.shape for t in m.programs.inference.inputs] == [[1, 3, IMAGE_SIZE, IMAGE_SIZE]]
    assert [t.shape for t in m.programs.bottom.outputs] == [[BATCH, 160, 2, 2]]  # features.15's output feeds block 16
    assert set(train.methods) == {"forward", "predict"}
    assert train.methods["forward"].inputs[1].shape == [BATCH] and train.methods["forward"].inputs[1].dtype == "int64"
    # weight decay's parameters: conv and linear weights, never norms or biases (the workstation's rule)
    decayed = [n for n, p in eager.trainable_parameters() if p.dim() >= 2]
    assert decayed and len(decayed) < len(train.trainable_parameters)
    assert train.optimizer == Optimizer(
        "sgd", lr=0.005, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, weight_decay_parameters=decayed
    )
    expected = [n for n, _ in eager.trainable_parameters()]
    assert sorted(train.trainable_parameters) == sorted(expected)
    # the running statistics of the train-mode norms: blocks 16 and 17's last, the final conv stage's
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert sorted(train.buffers) == sorted(f"{n}.{s}" for n in ("features.16.conv.3", "features.17.conv.3", "features.18.1") for s in stats)
    assert set(train.weights_layout) == set(expected) | set(train.buffers)
    assert sum(train.weights_layout[n].nbytes for n in expected) == m.memory.trainable_parameter_bytes
    assert m.memory.native_runtime_bytes == NATIVE_RUNTIME_BYTES  # the runner's memory check adds it
    for name, entry in m.files.items():
        assert bundle_mod.sha256_file(bundle.path / name) == entry.sha256 and (bundle.path / name).stat().st_size == entry.bytes
    check = m.verification.training
    assert check.steps == 3 and len(check.losses_executorch) == 3
    assert check.loss_max_abs_diff <= check.tolerance["loss"] and check.running_stats_moved > 0
    # what the C++ runner reads is what the exporter writes
    assert json.loads((bundle.path / "manifest.json").read_text()) == m.to_json()
    assert Manifest.from_json(m.to_json()) == m


def test_manifest_hashes_catch_a_changed_file(bundle, tmp_path):
    copy = tmp_path / "dist"
    shutil.copytree(bundle.path, copy)
    edgetl.ExportBundle.load(copy)
    data = bytearray((copy / "train.ptd").read_bytes())
    data[-1] ^= 0xFF
    (copy / "train.ptd").write_bytes(bytes(data))
    with pytest.raises(ExportError, match="sha256"):
        edgetl.ExportBundle.load(copy)


# --- inference programs ----------------------------------------------------------------------------


def test_inference_program_matches_eager_mobilenet_v2(bundle, eager):
    model = eager
    torch.manual_seed(1)
    x = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    got = et.Program(bundle.file("model.pte")).run("forward", x.numpy())[0]
    with torch.no_grad():
        want = model.eval()(x).numpy()
    diff = float(np.abs(got - want).max())
    print(f"MobileNetV2 model.pte max |ExecuTorch - eager| = {diff:.3g} (logits up to {np.abs(want).max():.3g})")
    assert diff < 1e-4
    assert bundle.manifest.programs.inference.backend == ["XnnpackBackend"]
    assert bundle.manifest.programs.inference.undelegated_ops == []
    features = et.Program(bundle.file("bottom.pte")).run("forward", np.repeat(x.numpy(), BATCH, 0))[0]
    want = model.forward_bottom(x)[0].numpy()
    assert np.abs(features[0] - want).max() < 1e-4 * max(1.0, float(np.abs(want).max()))  # XNNPACK folds BN into conv


def test_xnnpack_export_of_mobilenet_v3_small_regression(tmp_path):
    """pytorch/executorch#1062: V2/V3 exports failed on _native_batch_norm_legit_functional."""
    torch.manual_seed(0)
    model = calibrate(load_model("mobilenet_v3_small", num_classes=5), torch.randn(16, 3, IMAGE_SIZE, IMAGE_SIZE))
    x = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    res = inference.export_inference(model, x)
    assert res.program.delegates == ["XnnpackBackend"]
    assert not any("batch_norm" in op for op in res.program.undelegated + res.program.operators)
    path = tmp_path / "v3.pte"
    path.write_bytes(res.program.buffer)
    diff = inference.max_abs_diff(path, model, x)
    print(f"MobileNetV3-Small model.pte max |ExecuTorch - eager| = {diff:.3g}")
    assert diff < 1e-4


@pytest.mark.parametrize(("name", "prepared"), [("efficientnet_b0", False), ("efficientnet_lite0", True)])
def test_efficientnet_exports_verified_against_eager(tmp_path, name, prepared):
    """K=5 trains the last two stages, the lower one opening with a stride-2 block: SiLU's
    decomposed backward and squeeze-excitation (B0), TF "SAME" zero padding as PadNHWC (Lite0).
    B0 is given as the plain network, Lite0 as a prepared TransferModel; both are identified from
    their weights and left as they were."""
    torch.manual_seed(0)
    model = calibrate(load_model(name, num_classes=3), torch.randn(8, 3, 64, 64))
    policy = edgetl.TrainPolicy(blocks=5)
    net = edgetl.prepare(model, policy)
    if name == "efficientnet_lite0":
        assert sum(isinstance(m, nhwc.PadNHWC) for m in nhwc.trainable_top(net).modules()) == 1
    given = net if prepared else model
    before = {k: v.clone() for k, v in given.state_dict().items()}
    modes = [m.training for m in given.modules()]
    config = edgetl.ExportConfig(image_size=64, batch_size=2, training=True, verify_steps=2)
    m = edgetl.export(given, policy, tmp_path / "dist", config, log=lambda line: None).manifest

    assert m.model == ModelInfo(name, 3, ["0", "1", "2"], policy.to_dict())
    assert m.programs.inference.backend == m.programs.bottom.backend == ["XnnpackBackend"]
    assert m.programs.inference.undelegated_ops == m.programs.bottom.undelegated_ops == []
    verified = m.verification
    assert verified.inference_max_abs_diff <= 1e-3 and verified.bottom_max_abs_diff <= 1e-3
    check = verified.training
    assert check.steps == 2 and len(check.losses_eager) == len(check.losses_executorch) == 2
    assert check.loss_max_abs_diff <= check.tolerance["loss"] and check.predict_max_abs_diff <= check.tolerance["predict"]
    assert check.weight_max_abs_diff <= 10 * check.tolerance["weights"]  # the rest within the update tolerance
    assert check.running_stats_max_abs_diff <= check.tolerance["running_stats"] and check.running_stats_moved > 0
    train = m.programs.training
    assert sorted(train.trainable_parameters) == sorted(n for n, _ in net.trainable_parameters())
    # train-mode norms: each of the five blocks' last (after the projection) and the final conv stage's
    last = "block.3.1" if name == "efficientnet_b0" else "block.2.1"
    norms = [f"features.6.{i}.{last}" for i in range(4)] + [f"features.7.0.{last}", "features.8.1"]
    assert sorted(train.buffers) == sorted(f"{n}.{s}" for n in norms for s in ("running_mean", "running_var", "num_batches_tracked"))
    assert [m.training for m in given.modules()] == modes
    assert all(torch.equal(v, before[k]) for k, v in given.state_dict().items())


@pytest.mark.parametrize("padding", [(0, 1, 0, 1), (1, 2, 0, 1), (2, 2, 2, 2)])
def test_channels_last_zero_padding_and_its_gradient_match_zeropad2d(padding):
    pad = nn.ZeroPad2d(padding)
    x = torch.randn(2, 5, 6, 3, dtype=torch.float64, requires_grad=True)
    ref = pad(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    got = nhwc.PadNHWC(pad)(x)
    torch.testing.assert_close(got, ref)
    dy = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(got, x, dy), torch.autograd.grad(ref, x, dy))


# --- the training program -------------------------------------------------------------------------


def test_training_steps_match_eager_and_update_running_stats(bundle, eager):
    train = bundle.manifest.programs.training
    session = et.TrainingSession(bundle.file("train.pte"), bundle.file("train.ptd"), buffer_names=train.buffers)
    assert session.layout.metadata_ok, "the program's __et_training_* metadata must match its output layout"
    net = training.without_dropout(eager).train()  # a copy: the fixture is shared
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD([p for _, p in net.trainable_parameters()], lr=0.005, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    shape = train.methods["forward"].inputs[0].shape
    sgd = None
    for _ in range(4):
        f, y = torch.randn(shape, generator=gen).relu(), torch.randint(0, 3, (BATCH,), generator=gen)
        loss = nn.functional.cross_entropy(net.forward_top(f), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        et_loss, logits, *stats = session.forward_backward(f.numpy(), y.numpy())
        assert len(stats) == len(train.buffers)
        sgd = sgd or session.sgd(0.005, momentum=0.9)
        sgd.step()
        assert abs(float(et_loss) - loss.item()) < 1e-4
        assert logits.shape == (BATCH, 3)
    state, eager = session.state(), net.state_dict()
    for name in train.trainable_parameters:
        assert np.abs(state[name] - eager[name].numpy()).max() < 1e-4, name
        assert not torch.equal(eager[name], before[name]), f"{name} did not train"
    counts = [n for n in train.buffers if n.endswith("num_batches_tracked")]
    assert [int(state[n].reshape(())) - int(before[n]) for n in counts] == [4] * 3
    for name in sorted(set(train.buffers) - set(counts)):
        assert np.abs(state[name] - eager[name].numpy()).max() < 1e-4, name
        moved_et = np.abs(state[name] - before[name].numpy()).max()
        moved_eager = (eager[name] - before[name]).abs().max().item()
        assert moved_et > 0 and moved_et == pytest.approx(moved_eager, rel=1e-2), f"{name} did not update on the ExecuTorch side"


def test_only_the_policys_parameters_get_gradients(bundle, eager):
    session = et.TrainingSession(bundle.file("train.pte"), bundle.file("train.ptd"))
    names = session.layout.parameter_names
    net = eager
    assert sorted(names) == sorted(n for n, _ in net.trainable_parameters())
    assert not any(n.startswith(tuple(f"{b}." for b in net.bottom_names)) for n in names)
    # shift-only norms train beta alone
    shift = [f"{b}.conv.0.1" for b in net.trained_block_names]
    assert all(f"{s}.bias" in names and f"{s}.weight" not in names for s in shift)


def test_executorch_training_metadata_bug_is_corrected():
    """ExecuTorch 1.5 counts buffer-mutation outputs in __et_training_gradients_index; the adapter's
    emission does not (the method's outputs don't include them)."""
    net = edgetl.prepare(load_model("mobilenet_v2", num_classes=3), edgetl.TrainPolicy(blocks=1))
    shape = tuple(net.forward_bottom(torch.zeros(2, 3, 64, 64)).shape)
    top = nhwc.trainable_top(net)
    joint = et.export_forward_backward(torch.export.export(top, (torch.zeros(shape), torch.tensor([0, 1]))))
    stock = et.training_metadata({"forward": joint}, corrected=False)
    fixed = et.training_metadata({"forward": joint})
    n_stats = 6  # running mean, var, count of block 17's last norm and of the final conv stage's
    # outputs: loss, logits, the updated running statistics, then gradients
    assert fixed["__et_training_gradients_index_forward"] == 2 + n_stats
    assert stock["__et_training_gradients_index_forward"] == 2 + 2 * n_stats  # counts the buffer writes as outputs
    assert stock["__et_training_fqn_forward"] == fixed["__et_training_fqn_forward"]


@pytest.mark.parametrize(("mask", "num_masks"), [("packed", 2), ("reuse", 0)])
def test_exported_backward_keeps_bit_packed_masks_not_float_maps(mask, num_masks):
    policy = edgetl.TrainPolicy(blocks=1, activation_mask=mask)
    model = load_model("mobilenet_v2", num_classes=3)
    net = edgetl.prepare(model, policy)
    shape = tuple(net.forward_bottom(torch.zeros(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)).shape)
    top = nhwc.trainable_top(net)
    joint = et.export_forward_backward(torch.export.export(top, (torch.zeros(shape), torch.arange(BATCH) % 3)))
    saved = memory.saved_for_backward(joint.run_decompositions(device_ops.decompositions()))
    expanded = BATCH * 960 * (IMAGE_SIZE // 32) ** 2  # features.17's expanded map
    # packed: the block's two masked activations, one bit per element; reuse: masks are read off
    # outputs the next convs keep anyway
    assert [s.nbytes for s in saved if s.dtype == "uint8"] == [expanded // 8] * num_masks
    # nothing else: the exported saved bytes are the eager profiler's, up to per-channel statistics
    rows = predict_units(model, policy, batch_size=BATCH, image_size=IMAGE_SIZE)
    predicted = sum(r.nbytes for r in rows) - sum(s.nbytes for r in rows for s in r.saved if "noise" in s.what)
    exported = memory.total_bytes(saved)
    print(f"{mask}: saved for backward exported {exported} B, predicted {predicted} B")
    assert abs(exported - predicted) <= 0.02 * predicted
    # shift-only norms keep nothing: no saved float tensor of the expanded shape besides the conv inputs
    float_maps = [s for s in saved if s.dtype == "float32" and s.nbytes == 4 * expanded]
    assert len(float_maps) == 2  # inputs of the depthwise and the projection conv


def test_channels_last_top_matches_transfer_model_with_squeeze_excitation():
    torch.manual_seed(0)
    model = calibrate(load_model("mobilenet_v3_small", num_classes=3), torch.randn(8, 3, 96, 96))
    net = training.without_dropout(edgetl.prepare(model, edgetl.TrainPolicy(blocks=3, activation_mask="packed")))
    top = nhwc.trainable_top(net)
    f = net.forward_bottom(torch.randn(4, 3, 96, 96))
    y = torch.tensor([0, 1, 2, 0])
    nn.functional.cross_entropy(net.forward_top(f), y).backward()
    loss = top(f, y)[0]
    loss.backward()
    ref = dict(net.trainable_parameters())
    for name, p in top.named_parameters():
        scale = ref[name].grad.abs().max().item()
        assert (p.grad - ref[name].grad).abs().max().item() <= 1e-4 * max(scale, 1e-3), name
    # after one train-mode step: the running statistics of the four train-mode norms (three blocks'
    # last and the final conv stage's) and the frozen scale/offset of the six shift-only norms
    buffers = dict(net.named_buffers())
    compared = {name: b for name, b in top.named_buffers() if b.dtype.is_floating_point}
    assert len(compared) == 4 * 2 + 6 * 2 and set(compared) <= set(buffers)
    for name, b in compared.items():
        torch.testing.assert_close(b, buffers[name])


@pytest.mark.parametrize("stride,kernel", [(1, 3), (2, 3), (2, 5), (1, 5)])
def test_depthwise_and_pointwise_custom_ops_match_convolution(stride, kernel):
    torch.manual_seed(stride * 10 + kernel)
    x = torch.randn(2, 9, 11, 6, dtype=torch.float64, requires_grad=True)  # NHWC
    w = torch.randn(6, 1, kernel, kernel, dtype=torch.float64, requires_grad=True)
    pad = kernel // 2
    ref = nn.functional.conv2d(x.permute(0, 3, 1, 2), w, stride=stride, padding=pad, groups=6).permute(0, 2, 3, 1)
    dy = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(ref, (x, w), dy)
    y = device_ops.depthwise_nhwc(x, w, stride, pad)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(device_ops.depthwise_forward(x, w, stride, pad), ref)  # the exported form
    torch.testing.assert_close(torch.autograd.grad(y, (x, w), dy), (gx, gw))
    v = torch.randn(4, 6, 1, 1, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().reshape(-1, 6).requires_grad_()
    out = device_ops.pointwise_nhwc(x2, v)
    torch.testing.assert_close(out, x2 @ v[:, :, 0, 0].t())
    d = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (x2, v), d), torch.autograd.grad(x2 @ v[:, :, 0, 0].t(), (x2, v), d))


class _DepthwiseOps(nn.Module):
    """The three depthwise operators as the training program calls them."""

    def __init__(self, stride: int, pad: int) -> None:
        super().__init__()
        self.stride, self.pad = stride, pad

    def forward(self, x, w, dy):
        h, wd, k = x.shape[1], x.shape[2], w.shape[-1]
        return (
            torch.ops.edgetl_export.depthwise_nhwc(x, w, self.stride, self.pad),
            torch.ops.edgetl_export.depthwise_grad_input(dy, w, h, wd, self.stride, self.pad),
            torch.ops.edgetl_export.depthwise_grad_weight(dy, x, k, self.stride, self.pad),
        )


@pytest.mark.parametrize(("stride", "kernel"), [(1, 3), (2, 3), (1, 5), (2, 5)])
def test_native_depthwise_kernels_match_convolution_and_its_gradients(tmp_path, stride, kernel):
    """deploy/native/kernels, run by ExecuTorch, against conv2d and autograd in float64; the same
    bits at 1 and 4 threads."""
    if et.load_native_kernels() is None:
        pytest.skip("the native kernel library is not built (deploy/native/build.sh)")
    torch.manual_seed(stride * 10 + kernel)
    pad = kernel // 2
    x = torch.randn(2, 9, 11, 136, dtype=torch.float64, requires_grad=True)  # two channel groups
    w = torch.randn(136, 1, kernel, kernel, dtype=torch.float64, requires_grad=True)
    ref = nn.functional.conv2d(x.permute(0, 3, 1, 2), w, stride=stride, padding=pad, groups=136).permute(0, 2, 3, 1)
    dy = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(ref, (x, w), dy)
    args = (x.detach().float(), w.detach().float(), dy.float())
    ep = torch.export.export(_DepthwiseOps(stride, pad), args)
    pte = tmp_path / "dw.pte"
    pte.write_bytes(et.portable_program(ep))
    program = et.Program(pte)
    try:
        runs = {}
        for threads in (1, 4):
            et.set_threads(threads)
            runs[threads] = program.run("forward", *(a.numpy() for a in args))
    finally:
        et.set_threads(2)
    for value, want in zip(runs[1], (ref, gx, gw), strict=True):
        np.testing.assert_allclose(value, want.detach().numpy(), rtol=1e-5, atol=1e-5)
    for a, b in zip(runs[1], runs[4], strict=True):
        assert np.array_equal(a, b), "4 threads differ from 1"


class _PointwiseOps(nn.Module):
    """The three 1x1 operators as the training program calls them."""

    def forward(self, x, w, dy):
        return (
            torch.ops.edgetl_export.pointwise_nhwc(x, w),
            torch.ops.edgetl_export.pointwise_grad_input(dy, w),
            torch.ops.edgetl_export.pointwise_grad_weight(dy, x, w.dim()),
        )


# pixels x channels in x channels out: tile edges (6 x 16 micro-tiles, 96 x 256 x 256 blocks), one
# pixel (batch 1 at 1 x 1), depths past one packed block, a V3-Large-like 7 x 7 expansion, and
# linear layers (a Cout x Cin weight: V3-Large's classifier at batch 8)
@pytest.mark.parametrize(
    ("m", "cin", "cout", "rank"), [(1, 1, 1, 4), (7, 5, 17, 4), (97, 257, 33, 4), (392, 160, 960, 4), (600, 24, 300, 2), (8, 960, 1280, 2)]
)
def test_native_pointwise_kernels_match_matrix_products_at_any_thread_count(tmp_path, m, cin, cout, rank):
    """deploy/native/kernels' 1x1 forward and both gradients, run by ExecuTorch, against float64
    matrix products; the same bits at 1, 2 and 4 threads."""
    if et.load_native_kernels() is None:
        pytest.skip("the native kernel library is not built (deploy/native/build.sh)")
    g = torch.Generator().manual_seed(m * 1000 + cin)
    x, dy = torch.randn(m, cin, generator=g), torch.randn(m, cout, generator=g)
    w = torch.randn((cout, cin, 1, 1)[:rank], generator=g)
    x64, w64, dy64 = x.double(), w.reshape(cout, cin).double(), dy.double()
    want = (x64 @ w64.t(), dy64 @ w64, (dy64.t() @ x64).reshape(w.shape))
    ep = torch.export.export(_PointwiseOps(), (x, w, dy))
    pte = tmp_path / "pw.pte"
    pte.write_bytes(et.portable_program(ep))
    program = et.Program(pte)
    runs = {}
    try:
        for threads in (1, 2, 4):
            et.set_threads(threads)
            runs[threads] = program.run("forward", x.numpy(), w.numpy(), dy.numpy())
    finally:
        et.set_threads(2)
    for value, ref in zip(runs[1], want, strict=True):
        np.testing.assert_allclose(value, ref.numpy(), rtol=1e-5, atol=1e-5 * max(cin, cout, m) ** 0.5)
    for threads in (2, 4):
        for a, b in zip(runs[1], runs[threads], strict=True):
            assert np.array_equal(a, b), f"{threads} threads differ from 1"


class _ActivationOps(nn.Module):
    """The masked activation's operators as the training program calls them."""

    def __init__(self, code: int) -> None:
        super().__init__()
        self.code = code

    def forward(self, x, dy, packed):
        e = torch.ops.edgetl_export
        y = e.activation(x, self.code)
        exact = e.exact_act(x, self.code)
        t = exact if device_ops._FROM_OUTPUT.issuperset([ops.ACTIVATION_KINDS[self.code // 2]]) else x
        return y, e.mask_grad(dy, y, self.code), e.packed_mask_grad(dy, packed), exact, e.exact_act_grad(dy, t, self.code)


@pytest.mark.parametrize("kind", ops.ACTIVATION_KINDS)
@pytest.mark.parametrize("rule", ops.GRAD_RULES)
def test_native_activation_kernels_match_the_python_operators(tmp_path, kind, rule):
    """deploy/native/kernels' masked activation (forward, mask from the output, packed mask) and
    exact activation (forward, derivative) against edgetl's Python operators for every kind and
    rule, on values at 0, +-3 and 6 and an odd element count."""
    if et.load_native_kernels() is None:
        pytest.skip("the native kernel library is not built (deploy/native/build.sh)")
    g = torch.Generator().manual_seed(len(kind) * 2 + len(rule))
    x = torch.cat([torch.randn(3, 5, 7, 11, generator=g) * 4, torch.tensor([0.0, 6.0, -3.0, 3.0, 1e-30, -1e-30]).expand(3, 5, 7, 6)], -1)
    dy = torch.randn(x.shape, generator=g)
    packed = ops.pack_bits(ops.mask_from_input(x, kind, rule))
    code = device_ops.activation_code(kind, rule)
    y = ops.activation_forward(x, kind)
    module = nhwc.ExactActivation(kind)
    xg = x.clone().requires_grad_()
    exact_grad = torch.autograd.grad(module(xg), xg, dy)[0]  # the eager operator's own backward
    want = (y, ops.mask_grad(dy, y, kind, rule), ops.packed_mask_grad(dy, packed), y, exact_grad)
    pte = tmp_path / "act.pte"
    pte.write_bytes(et.portable_program(torch.export.export(_ActivationOps(code), (x, dy, packed))))
    got = et.Program(pte).run("forward", x.numpy(), dy.numpy(), packed.numpy())
    for value, ref in zip(got, want, strict=True):  # exp: a last-bit difference from PyTorch's vectorised one
        np.testing.assert_allclose(value, ref.numpy(), rtol=1e-6, atol=1e-6)


class _ChannelOps(nn.Module):
    """The norms' per-channel operators as the training program calls them."""

    def forward(self, x, a, b, dy):
        ops_ = torch.ops.edgetl_export
        return (
            ops_.channel_affine(x, a, b),
            ops_.channel_scale(dy, a),
            ops_.channel_sum(dy),
            ops_.channel_dot(dy, x),
            ops_.channel_center(x + b),
            ops_.channel_sumsq(x),
        )


@pytest.mark.parametrize("shape", [(2, 5, 7, 130), (1, 1, 1, 3), (8, 40)])
def test_native_channel_kernels_match_float64_at_any_thread_count(tmp_path, shape):
    """deploy/native/kernels' per-channel affine map, scale, sum, dot, centring and sum of squares
    (NHWC maps, and N x C pooled features) against float64; the same bits at 1 and 4 threads (130
    channels: 3 groups)."""
    if et.load_native_kernels() is None:
        pytest.skip("the native kernel library is not built (deploy/native/build.sh)")
    g = torch.Generator().manual_seed(sum(shape))
    x, dy = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    a, b = torch.randn(shape[-1], generator=g), torch.randn(shape[-1], generator=g)
    axes = tuple(range(len(shape) - 1))
    x64, dy64, a64 = x.double(), dy.double(), a.double()
    shifted = (x + b).double()
    want = (x64 * a64 + b.double(), dy64 * a64, dy64.sum(axes), (dy64 * x64).sum(axes), shifted - shifted.mean(axes), (x64 * x64).sum(axes))
    pte = tmp_path / "channel.pte"
    pte.write_bytes(et.portable_program(torch.export.export(_ChannelOps(), (x, a, b, dy))))
    program, runs = et.Program(pte), {}
    try:
        for threads in (1, 4):
            et.set_threads(threads)
            runs[threads] = program.run("forward", x.numpy(), a.numpy(), b.numpy(), dy.numpy())
    finally:
        et.set_threads(2)
    for value, ref in zip(runs[1], want, strict=True):
        np.testing.assert_allclose(value, ref.numpy(), rtol=1e-6, atol=1e-6)
    for one, four in zip(runs[1], runs[4], strict=True):
        assert np.array_equal(one, four), "4 threads differ from 1"


class _GateOps(nn.Module):
    def forward(self, x, s, dy):
        return torch.ops.edgetl_export.channel_gate(x, s), torch.ops.edgetl_export.channel_gate_grad(dy, x)


def test_native_squeeze_excitation_gate_matches_float64_and_autograd(tmp_path):
    """deploy/native/kernels' gating multiply and its gradients against float64 and eager autograd."""
    if et.load_native_kernels() is None:
        pytest.skip("the native kernel library is not built (deploy/native/build.sh)")
    g = torch.Generator().manual_seed(5)
    x, s = torch.randn(3, 7, 5, 70, generator=g, requires_grad=True), torch.rand(3, 1, 1, 70, generator=g, requires_grad=True)
    dy = torch.randn(3, 7, 5, 70, generator=g)
    got_grads = torch.autograd.grad(device_ops.channel_gate(x, s), (x, s), dy)
    want_grads = torch.autograd.grad(x * s, (x, s), dy)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want)
    pte = tmp_path / "gate.pte"
    pte.write_bytes(et.portable_program(torch.export.export(_GateOps(), (x.detach(), s.detach(), dy))))
    y, ds = et.Program(pte).run("forward", x.detach().numpy(), s.detach().numpy(), dy.numpy())
    np.testing.assert_allclose(y, (x * s).detach().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ds, (dy.double() * x.detach().double()).sum((1, 2), keepdim=True).numpy(), rtol=1e-6, atol=1e-6)


class _MeanOps(nn.Module):
    def forward(self, x, dm):
        return torch.ops.edgetl_export.spatial_mean(x), torch.ops.edgetl_export.spatial_mean_grad(dm, x.shape[1], x.shape[2])


def test_native_global_average_pooling_matches_float64_and_autograd(tmp_path):
    """deploy/native/kernels' spatial mean and its gradient against float64 and eager autograd."""
    if et.load_native_kernels() is None:
        pytest.skip("the native kernel library is not built (deploy/native/build.sh)")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 7, 5, 70, generator=g, requires_grad=True)
    dm = torch.randn(3, 1, 1, 70, generator=g)
    want_dx = torch.autograd.grad(device_ops.spatial_mean(x), x, dm)[0]
    torch.testing.assert_close(want_dx, torch.autograd.grad(x.mean((1, 2), keepdim=True), x, dm)[0])
    pte = tmp_path / "mean.pte"
    pte.write_bytes(et.portable_program(torch.export.export(_MeanOps(), (x.detach(), dm))))
    mean, dx = et.Program(pte).run("forward", x.detach().numpy(), dm.numpy())
    np.testing.assert_allclose(mean, x.detach().double().mean((1, 2), keepdim=True).numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dx, want_dx.numpy(), rtol=1e-6, atol=1e-7)


def test_train_mode_norm_keeps_float32_accuracy_when_a_channel_mean_dwarfs_its_spread():
    """The program's train-mode batch norm normalises the centred map: over the raw input its
    scale gradient is sum(dy * x) - mean * sum(dy), which cancels in float32 when a channel's mean
    is thousands of times its spread (the inputs of a deep top's lowest norms at random
    initialisation; 8x eager PyTorch's error). Over the centred map it stays within eager's."""
    g = torch.Generator().manual_seed(3)
    bn = nn.BatchNorm2d(32).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.uniform_(-0.1, 0.1, generator=g)
    x = torch.randn(8, 32, 14, 14, generator=g, dtype=torch.float64) * 0.01 + 30.0  # mean / std = 3000
    dy = torch.randn(8, 32, 14, 14, generator=g, dtype=torch.float64)

    def grads(module: nn.Module, dtype: torch.dtype, channels_last: bool = False) -> list[torch.Tensor]:
        xin = x.to(dtype).clone().requires_grad_(True)
        y = module(xin.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if channels_last else module(xin)
        y.backward(dy.to(dtype))
        return [t.double() for t in (xin.grad, module.weight.grad, module.bias.grad)]

    exact = grads(copy.deepcopy(bn).double(), torch.float64)
    eager = grads(copy.deepcopy(bn), torch.float32)
    program = grads(nhwc.BatchNormNHWC(copy.deepcopy(bn)), torch.float32, channels_last=True)

    def error(got: torch.Tensor, want: torch.Tensor) -> float:
        return float((got - want).abs().max() / want.abs().max())

    for name, got, ref, want in zip(("dx", "dweight", "dbias"), program, eager, exact, strict=True):
        assert error(got, want) <= max(2 * error(ref, want), 1e-6), name


def test_channel_affine_keeps_its_input_only_for_a_trained_scale():
    """A shift-only norm (scale frozen) saves nothing for backward; a batch norm's trained scale needs x."""
    x = torch.randn(2, 3, 3, 4, requires_grad=True)
    frozen, trained, shift = torch.randn(4), torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    y = device_ops.channel_affine(x, frozen, shift)
    assert all(t is None or t.numel() == 4 for t in y.grad_fn.saved_tensors)
    dy = torch.randn_like(y)
    gx, gs = torch.autograd.grad(y, (x, shift), dy)
    torch.testing.assert_close(gx, dy * frozen)
    torch.testing.assert_close(gs, dy.sum((0, 1, 2)))
    y = device_ops.channel_affine(x, trained, shift)
    assert any(t is not None and t.shape == x.shape for t in y.grad_fn.saved_tensors)
    ga = torch.autograd.grad(y, trained, dy)[0]
    torch.testing.assert_close(ga, (dy * x).sum((0, 1, 2)))


def test_verification_refuses_a_backward_that_differs_from_eager(tmp_path):
    """The program's ReLU6 backward is MobileTL's sign rule; eager's is the exact one: three steps apart."""
    model = load_model("mobilenet_v2", num_classes=3)
    with torch.no_grad():  # push the top block's activations past 6, where the two rules differ
        model.features[17].conv[0][0].weight.mul_(30)
    sign = edgetl.prepare(model, edgetl.TrainPolicy(blocks=1))
    exact = edgetl.prepare(model, edgetl.TrainPolicy(blocks=1, activation_grad="exact"))
    shape = tuple(sign.forward_bottom(torch.zeros(4, 3, 64, 64)).shape)
    # the decomposed depthwise path (any ExecuTorch runtime): the kernels' path is the bundle's
    ex = training.export_training(sign, feature_shape=shape, num_classes=3, native_kernels=False)
    assert not any(op.startswith("edgetl_export::") for ops in ex.program.operators.values() for op in ops)
    assert ex.kernel_library is None and "none of edgetl's" in training.describe_kernels(ex) and "slower" in training.describe_kernels(ex)
    pte, ptd = tmp_path / "train.pte", tmp_path / "train.ptd"
    pte.write_bytes(ex.program.pte)
    ptd.write_bytes(ex.program.ptd)
    training.verify_training(sign, ex, pte, ptd, lr=0.05, momentum=0.9, weight_decay=0.0)  # its own policy passes
    with pytest.raises(VerificationError, match="training program does not match eager"):
        training.verify_training(exact, ex, pte, ptd, lr=0.05, momentum=0.9, weight_decay=0.0)


# --- errors -------------------------------------------------------------------------------------------


def test_a_run_whose_config_names_another_model_is_refused(tmp_path, export_run):
    run = tmp_path / "run"
    shutil.copytree(export_run, run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "model": "mobilenet_v3_small"}))
    with pytest.raises(edgetl.EdgetlError, match="another model"):
        read_weights(run)


def test_checkpoint_from_another_model_is_refused(tmp_path, export_run):
    with pytest.raises(edgetl.EdgetlError, match="another model"):
        cli(["export", "--checkpoint", str(export_run / "model.pt"), "--model", "mobilenet_v3_small", "--out", str(tmp_path / "x")])
    state = torch.load(export_run / "model.pt", weights_only=True)["model"]
    torch.save(state, tmp_path / "plain.pt")
    with pytest.raises(ExportError, match=r"does not hold mobilenet_v3_small weights.*looks like mobilenet_v2"):
        cli(["export", "--checkpoint", str(tmp_path / "plain.pt"), "--model", "mobilenet_v3_small", "--out", str(tmp_path / "x")])
    with pytest.raises(edgetl.EdgetlError, match="--model"):
        cli(["export", "--checkpoint", str(tmp_path / "plain.pt"), "--out", str(tmp_path / "y")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_lite0"])
def test_identify_model_matches_keys_and_shapes_with_any_classifier_size(name):
    state = load_model(name, num_classes=7).state_dict()
    assert identify_model(state) == name
    assert [n for n in edgetl.MODELS if architecture_mismatch(n, state) is None] == [name]
    state = dict(state)
    key = next(k for k, v in reversed(state.items()) if v.dim() == 2)  # the classifier's weight
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)
    assert (
        architecture_mismatch(name, state) == f"other shapes: {key} {tuple(state[key].shape)} (expected ('*', {state[key].shape[1] - 1}))"
    )
    with pytest.raises(edgetl.WeightsError, match="fit none of edgetl's architectures"):
        identify_model(state)


def test_weights_and_models_of_another_architecture_are_refused(tmp_path):
    state = load_model("mobilenet_v2", num_classes=3).state_dict()
    with pytest.raises(
        ExportError, match=r"the run does not hold mobilenet_v3_small weights \(missing keys: .*; it looks like mobilenet_v2$"
    ):
        load_weights("mobilenet_v3_small", state, 3, source="the run")
    with pytest.raises(ExportError, match=r"unknown model 'resnet'"):
        load_weights("resnet", state, 3)
    config = edgetl.ExportConfig(image_size=IMAGE_SIZE, batch_size=BATCH)
    model = load_model("mobilenet_v2", num_classes=3)
    with pytest.raises(ExportError, match=r"does not hold mobilenet_v3_small weights.*it looks like mobilenet_v2$"):
        edgetl.export(model, POLICY, tmp_path / "a", config, model_name="mobilenet_v3_small")
    with pytest.raises(ExportError, match=r"cannot export Sequential: Sequential has no 'classifier' module"):
        edgetl.export(nn.Sequential(nn.Conv2d(3, 3, 1)), POLICY, tmp_path / "b", config)
    with pytest.raises(ExportError, match=r"TrainPolicy.blocks=30 but the model has only 17 inverted-residual blocks"):
        edgetl.export(model, edgetl.TrainPolicy(blocks=30), tmp_path / "c", config)
    assert list(tmp_path.iterdir()) == []


def test_device_weights_are_applied_by_name_and_other_files_refused(training_bundle, export_run, tmp_path):
    ptd = training_bundle / "train.ptd"
    state = load_model("mobilenet_v2", num_classes=3).state_dict()
    merged = apply_device_weights(state, ptd)
    stored = et.read_ptd(ptd.read_bytes())
    assert set(stored) < set(merged) == set(state)
    assert all(np.array_equal(merged[k].numpy().reshape(-1), v.reshape(-1)) for k, v in stored.items())
    with pytest.raises(ExportError, match=r"which the checkpoint does not have \(another model\?\)"):
        apply_device_weights(load_model("mobilenet_v3_small", num_classes=3).state_dict(), ptd)
    (tmp_path / "bad.ptd").write_bytes(b"not a weights file")
    with pytest.raises(ExportError, match="cannot read device weights"):
        cli(["export", "--checkpoint", str(export_run), "--device-weights", str(tmp_path / "bad.ptd"), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_output_directory_with_other_content_is_refused(tmp_path):
    out = tmp_path / "dist"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists with other content"):
        edgetl.export(load_model("mobilenet_v2", num_classes=3), POLICY, out, edgetl.ExportConfig(image_size=IMAGE_SIZE, batch_size=BATCH))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_missing_executorch_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(et.runtime, "executorch_version", lambda: None)
    with pytest.raises(ExecutorchMissingError, match="pip install executorch"):
        edgetl.export(
            load_model("mobilenet_v2", num_classes=3), POLICY, tmp_path / "d", edgetl.ExportConfig(image_size=IMAGE_SIZE, batch_size=BATCH)
        )


def test_layer_without_an_exportable_form_is_named_with_its_part():
    model = load_model("mobilenet_v2", num_classes=3)
    block = model.features[17].conv
    block[1][0] = nn.Conv2d(960, 960, 3, padding="same", groups=480, bias=False)  # sized by its input
    net = edgetl.prepare(model, edgetl.TrainPolicy(blocks=1))
    with pytest.raises(UnsupportedModelError, match=r"features\.17\.conv\.1\.0.*trained block features\.17"):
        nhwc.trainable_top(net)


class _Erfinv(nn.Module):
    def forward(self, x):
        return torch.special.erfinv(torch.tanh(x) * 0.5)


def test_operator_without_kernel_is_named_with_its_part():
    model = load_model("mobilenet_v2", num_classes=3)
    model.classifier.append(_Erfinv())
    net = edgetl.prepare(model, edgetl.TrainPolicy(blocks=0))
    shape = tuple(net.forward_bottom(torch.zeros(2, 3, 32, 32)).shape)
    with pytest.raises(UnsupportedModelError, match=r"erfinv.*classifier"):
        training.export_training(net, feature_shape=shape, num_classes=3)
    head = nn.Sequential(nn.Flatten(), nn.Linear(12, 3), _Erfinv())
    with pytest.raises(UnsupportedModelError, match=r"erfinv.*2 \(head\)"):
        inference.export_inference(head, torch.zeros(1, 3, 2, 2), part_of=lambda path: "head")


def _tiny_manifest() -> Manifest:
    image = TensorSpec("image", [1, 3, 32, 32], "float32")
    logits = TensorSpec("logits", [1, 2], "float32")
    return Manifest(
        created=Created("0", "0", "0", "2026-01-01T00:00:00+00:00"),
        model=ModelInfo("mobilenet_v2", 2, ["a", "b"], {}),
        input=InputInfo(32, "NCHW", "float32", "RGB", "0..1", [0.5] * 3, [0.5] * 3, 37, "center", "bilinear"),
        runtime=RuntimeInfo("1.5"),
        programs=Programs(inference=XnnpackProgram("a.bin", "forward", [], [], [image], [logits])),
        verification=Verification(inference_max_abs_diff=0.0),
    )


def test_bundle_writer_is_all_or_nothing(tmp_path):
    out = tmp_path / "dist"
    with pytest.raises(RuntimeError, match="power cut"), bundle_mod.BundleWriter(out) as writer:
        writer.write("model.pte", b"x" * 100)
        raise RuntimeError("power cut")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with bundle_mod.BundleWriter(out) as writer:
        writer.write("a.bin", b"old")
        writer.commit(_tiny_manifest())
    with pytest.raises(ExportError, match="--force"):
        bundle_mod.BundleWriter(out)
    with bundle_mod.BundleWriter(out, overwrite=True) as writer:
        writer.write("b.bin", b"new")
        written = writer.commit(_tiny_manifest())
    assert sorted(p.name for p in out.iterdir()) == ["b.bin", "manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist"]
    # read back into the type; optional sections absent from the JSON
    loaded = edgetl.ExportBundle.load(out)
    assert loaded.manifest == written.manifest and loaded.manifest.files["b.bin"].bytes == 3
    data = json.loads((out / "manifest.json").read_text())
    assert "memory" not in data and set(data["programs"]) == {"inference"} and set(data["verification"]) == {"inference_max_abs_diff"}
    del data["input"]["mean"]
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ExportError, match=r"input\.mean is missing"):
        edgetl.ExportBundle.load(out)
    # /proc/self is a directory nobody, root included, can create files in
    with pytest.raises(ExportError, match=r"cannot create (the bundle directory beside|output) /proc/self/dist"):
        bundle_mod.BundleWriter("/proc/self/dist")
