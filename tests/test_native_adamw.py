"""The device's optimizers: AdamW (torch.optim.AdamW's rule) and the one weight-decay rule.

An AdamW bundle of the shared run (tests/conftest.py: MobileNetV2 K=2, 64 px, batch 4) is exported
here, verified by the exporter against torch.optim.AdamW; edgetl-device's steps are held against
the exporter's numpy rule over the same program (bit for bit) and against eager PyTorch. Weight
decay applies to conv and linear weights alone, on the workstation and on the device, SGD and AdamW.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import edgetl
from edgetl.exporter import _executorch as et
from edgetl.exporter.device_optim import AdamW
from edgetl.exporter.training import ADAMW_RULE_TOLERANCE, WEIGHT_TOLERANCE
from edgetl.train.optim import build_optimizer, decayed_names
from tests.conftest import CLASSES, EXPORT_BATCH, EXPORT_IMAGE_SIZE, export_eager_net, make_image_folder

BATCH = EXPORT_BATCH
ADAMW_LR, ADAMW_DECAY = 0.002, 0.05


def run(runner: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(runner), *args], capture_output=True, text=True, timeout=600)


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [line for line in r.stderr.strip().splitlines() if not re.match(r"epoch \d+/\d+ step", line)]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("edgetl-device: error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def adamw_bundle(export_run, tmp_path_factory) -> Path:
    """``edgetl export --training --optimizer adamw`` of the shared run, with weight decay."""
    from edgetl.cli import main

    out = tmp_path_factory.mktemp("adamw-bundle") / "dist"
    argv = ["export", "--checkpoint", str(export_run), "--out", str(out), "--training", "--batch-size", str(BATCH)]
    argv += ["--optimizer", "adamw", "--lr", str(ADAMW_LR), "--weight-decay", str(ADAMW_DECAY), "--betas", "0.85,0.995"]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """24 images: 3 classes x 8 (6 steps of batch 4 per epoch)."""
    return make_image_folder(tmp_path_factory.mktemp("adamw") / "photos", per_class=8, size=45, seed=13)


def _features(bundle: Path, photos: Path) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Bottom features and labels of ``photos`` (the Python transforms) and epoch 0's batches (seed 0)."""
    from PIL import Image

    from tests.test_native import epoch_order, images_of

    paths = images_of(photos)
    tf = edgetl.transforms_for("mobilenet_v2", image_size=EXPORT_IMAGE_SIZE, train=False)
    x = np.stack([tf(Image.open(p).convert("RGB")).numpy() for p in paths])
    labels = np.array([CLASSES.index(p.parent.name) for p in paths])
    bottom = et.Program(bundle / "bottom.pte")
    feats = np.concatenate([bottom.run("forward", x[i : i + BATCH])[0] for i in range(0, len(x), BATCH)])
    order = epoch_order(len(paths), seed=0, epoch=0)
    return feats, labels, [np.array(order[s * BATCH : (s + 1) * BATCH]) for s in range(len(paths) // BATCH)]


def test_the_device_rule_in_numpy_equals_torch_adamw():
    """The exporter's reference for the device (device_optim.AdamW) against torch.optim.AdamW over
    decayed and undecayed tensors, 20 steps: equal within float32 rounding (torch fuses its lerp)."""
    torch.manual_seed(0)
    named = [("conv.weight", torch.nn.Parameter(torch.randn(16, 8, 1, 1))), ("norm.bias", torch.nn.Parameter(torch.randn(16)))]
    arrays = {k: p.detach().clone().numpy() for k, p in named}
    opt = build_optimizer("adamw", named, lr=0.01, weight_decay=0.5, betas=(0.8, 0.99), eps=1e-6)
    device = AdamW(arrays, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.5, decay=decayed_names(named))
    assert decayed_names(named) == ["conv.weight"]
    start = {k: v.copy() for k, v in arrays.items()}
    grads = [{k: torch.randn_like(p) for k, p in named} for _ in range(20)]
    for step in grads:
        for k, p in named:
            p.grad = step[k].clone()
        opt.step()
        device.step({k: g.numpy() for k, g in step.items()})
    for k, p in named:
        np.testing.assert_allclose(arrays[k], p.detach().numpy(), rtol=0, atol=1e-6)
        assert np.abs(arrays[k] - start[k]).max() > 0.05  # the steps moved it
    # the decoupled decay reached the weight alone: without it the bias ends where it does
    undecayed = AdamW({k: v.copy() for k, v in start.items()}, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.5, decay=[])
    for step in grads:
        undecayed.step({k: g.numpy() for k, g in step.items()})
    assert np.array_equal(undecayed.params["norm.bias"], arrays["norm.bias"])
    assert not np.allclose(undecayed.params["conv.weight"], arrays["conv.weight"], rtol=0, atol=1e-4)


def test_the_bundle_names_adamw_and_its_decayed_parameters(adamw_bundle, export_run):
    manifest = json.loads((adamw_bundle / "manifest.json").read_text())
    train = manifest["programs"]["training"]
    opt = train["optimizer"]
    net = export_eager_net(export_run)
    decayed = [n for n, p in net.trainable_parameters() if p.dim() >= 2]
    assert opt["name"] == "adamw" and opt["lr"] == ADAMW_LR and opt["weight_decay"] == ADAMW_DECAY
    assert opt["betas"] == [0.85, 0.995] and opt["eps"] == 1e-8
    assert opt["weight_decay_parameters"] == decayed
    assert not any(n.endswith("bias") for n in decayed)  # nor any norm: their tensors are 1-D
    check = manifest["verification"]["training"]
    assert check["weight_max_abs_diff"] <= WEIGHT_TOLERANCE and check["loss_max_abs_diff"] <= check["tolerance"]["loss"]
    assert 0 <= check["adamw_rule_max_abs_diff"] <= ADAMW_RULE_TOLERANCE


def test_adamw_steps_equal_the_exporters_rule_bit_for_bit_and_torch_adamw(runner, adamw_bundle, export_run, photos, tmp_path):
    """One epoch (6 AdamW steps) on the device against the same program stepped by the exporter's
    numpy rule (identical bytes: weights and both moments) and by torch.optim.AdamW over the same
    gradients (eager's parameter groups: within float32 rounding)."""
    state = tmp_path / "state"
    r = run(runner, "finetune", str(adamw_bundle), str(photos), "--state", str(state), "--epochs", "1", "--threads", "2")
    assert r.returncode == 0, r.stderr
    saved = json.loads((state / "state.json").read_text())
    assert saved["optimizer"] == "adamw" and saved["optimizer_steps"] == 6 and "momentum" not in saved
    native = et.read_ptd((state / "trained.ptd").read_bytes())
    moments = np.frombuffer((state / saved["adamw_moments"]).read_bytes(), dtype=np.float32)

    manifest = json.loads((adamw_bundle / "manifest.json").read_text())
    train, opt = manifest["programs"]["training"], manifest["programs"]["training"]["optimizer"]
    feats, labels, batches = _features(adamw_bundle, photos)
    session = et.TrainingSession(adamw_bundle / "train.pte", adamw_bundle / "train.ptd", buffer_names=train["buffers"])
    shapes = {n: p.shape for n, p in export_eager_net(export_run).trainable_parameters()}
    adamw = reference = named = None
    losses = []
    for idx in batches:
        losses.append(float(session.forward_backward(feats[idx], labels[idx])[0]))
        if adamw is None:
            params = session.parameter_arrays()
            named = [(n, torch.nn.Parameter(torch.from_numpy(params[n].copy()).reshape(shapes[n]))) for n in train["trainable_parameters"]]
            settings = dict(lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"], weight_decay=opt["weight_decay"])
            reference = build_optimizer("adamw", named, **settings)
            adamw = AdamW(params, decay=opt["weight_decay_parameters"], **settings)
        grads = session.gradient_arrays()
        for n, p in named:
            p.grad = torch.from_numpy(grads[n].copy()).reshape(p.shape)
        reference.step()
        adamw.step(grads)
    python = session.state()
    for name, value in python.items():
        assert np.array_equal(native[name].reshape(-1), np.asarray(value).reshape(-1)), name
    names = train["trainable_parameters"]
    want = np.concatenate([adamw.exp_avg[n].reshape(-1) for n in names] + [adamw.exp_avg_sq[n].reshape(-1) for n in names])
    assert np.array_equal(moments, want)
    assert saved["history"][0]["loss"] == pytest.approx(np.mean(losses), abs=1e-6)
    initial = et.read_ptd((adamw_bundle / "train.ptd").read_bytes())
    for name, p in named:
        ref = p.detach().numpy().reshape(-1)
        assert np.abs(native[name].reshape(-1) - ref).max() <= ADAMW_RULE_TOLERANCE * max(1.0, float(np.abs(ref).max())), name
        assert np.abs(native[name] - initial[name]).max() > 0, name  # every tensor moved
    assert max(np.abs(native[n] - initial[n]).max() for n in names) > 2 * ADAMW_LR  # AdamW: up to about lr per step


def test_adamw_resumes_bit_identically_and_refuses_another_optimizer(runner, adamw_bundle, photos, tmp_path):
    """Epoch 1, then a second run resuming to epoch 2, ends with the bytes of a straight 2-epoch run
    (weights, exp_avg, exp_avg_sq, step count), as do runs at 1 and 4 threads; a resume with SGD
    is refused, nothing written."""

    def finetune(state: Path, epochs: int, *extra: str) -> subprocess.CompletedProcess:
        args = ["finetune", str(adamw_bundle), str(photos), "--state", str(state), "--epochs", str(epochs), "--seed", "5", *extra]
        return run(runner, *args)

    assert (r := finetune(tmp_path / "whole", 2)).returncode == 0, r.stderr
    assert (r := finetune(tmp_path / "cut", 1)).returncode == 0, r.stderr
    before = {p.name: p.read_bytes() for p in (tmp_path / "cut").iterdir() if p.name != ".edgetl.lock"}
    one_line_error(finetune(tmp_path / "cut", 2, "--optimizer", "sgd"), "trained with adamw, not sgd", "--optimizer adamw")
    assert {p.name: p.read_bytes() for p in (tmp_path / "cut").iterdir() if p.name != ".edgetl.lock"} == before
    resumed = finetune(tmp_path / "cut", 2)
    assert resumed.returncode == 0 and "resuming after epoch 1" in resumed.stdout, resumed.stderr
    a = json.loads((tmp_path / "whole" / "state.json").read_text())
    b = json.loads((tmp_path / "cut" / "state.json").read_text())
    assert a["optimizer_steps"] == b["optimizer_steps"] == 12
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert (tmp_path / "whole" / "trained.ptd").read_bytes() == (tmp_path / "cut" / "trained.ptd").read_bytes()
    assert (tmp_path / "whole" / a["adamw_moments"]).read_bytes() == (tmp_path / "cut" / b["adamw_moments"]).read_bytes()
    for threads in ("1", "4"):  # per-element arithmetic: the same bytes at any thread count
        assert (r := finetune(tmp_path / threads, 2, "--threads", threads)).returncode == 0, r.stderr
        assert (tmp_path / threads / "trained.ptd").read_bytes() == (tmp_path / "whole" / "trained.ptd").read_bytes()
        assert (tmp_path / threads / a["adamw_moments"]).read_bytes() == (tmp_path / "whole" / a["adamw_moments"]).read_bytes()
    names = sorted(p.name for p in (tmp_path / "cut").iterdir())
    assert names == sorted(["state.json", "trained.ptd", b["weights"], b["adamw_moments"], ".edgetl.lock"])
    # the Python reader of state.json
    from edgetl._device_state import read_state

    s = read_state(tmp_path / "cut")
    assert (s.optimizer, s.optimizer_steps, s.adamw_moments) == ("adamw", 12, b["adamw_moments"])


def test_adamw_killed_mid_run_resumes_to_the_bytes_of_an_uninterrupted_run(runner, adamw_bundle, tmp_path):
    """kill -9 once epoch 1 is saved (the run is inside a later epoch), then the same command."""
    data = make_image_folder(tmp_path / "photos", per_class=40, size=40, seed=17)
    epochs = 6

    def cmd(state: Path) -> list[str]:
        return [str(runner), "finetune", str(adamw_bundle), str(data), "--state", str(state), "--epochs", str(epochs), "--threads", "1"]

    assert (r := subprocess.run(cmd(tmp_path / "whole"), capture_output=True, text=True)).returncode == 0, r.stderr
    state = tmp_path / "cut"
    proc = subprocess.Popen(cmd(state), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (state / "state.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = json.loads((state / "state.json").read_text())
    assert 1 <= saved["epoch"] < epochs, "the kill came too late to interrupt training"
    resumed = subprocess.run(cmd(state), capture_output=True, text=True)
    assert resumed.returncode == 0 and f"resuming after epoch {saved['epoch']}" in resumed.stdout, resumed.stderr
    a, b = (json.loads((tmp_path / d / "state.json").read_text()) for d in ("whole", "cut"))
    assert a["optimizer_steps"] == b["optimizer_steps"] == epochs * (120 // BATCH)
    assert (tmp_path / "whole" / "trained.ptd").read_bytes() == (state / "trained.ptd").read_bytes()
    assert (tmp_path / "whole" / a["adamw_moments"]).read_bytes() == (state / b["adamw_moments"]).read_bytes()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--optimizer", "adam"], "unknown optimizer 'adam'"),
        (["--optimizer", "adamw", "--betas", "1,0.999"], "--betas must both be in [0, 1)"),
        (["--optimizer", "adamw", "--betas", "0.9,-0.1"], "--betas must both be in [0, 1)"),
        (["--optimizer", "adamw", "--betas", "0.9"], "--betas must be two numbers"),
        (["--optimizer", "adamw", "--eps", "0"], "--eps must be a positive number"),
        (["--optimizer", "adamw", "--eps", "-1e-8"], "--eps must be a positive number"),
        (["--betas", "0.9,0.99"], "--betas and --eps are AdamW's"),
        (["--optimizer", "adamw", "--momentum", "0.5"], "--momentum is SGD's"),
    ],
)
def test_bad_optimizer_settings_fail_with_one_line_and_write_nothing(runner, training_bundle, photos, tmp_path, args, needle):
    r = run(runner, "finetune", str(training_bundle), str(photos), "--state", str(tmp_path / "s"), *args)
    one_line_error(r, needle)
    assert not (tmp_path / "s").exists()


def test_sgd_weight_decay_spares_norms_and_biases_on_the_device(runner, training_bundle, export_run, photos, tmp_path):
    """The device's SGD with --weight-decay decays conv and linear weights alone, as the workstation's
    param_groups do: the same bytes as ExecuTorch's SGD over the manifest's decay list, within float
    rounding of eager torch.optim.SGD, and away from a rule that decays every parameter."""
    wd = 0.5
    state = tmp_path / "state"
    args = ["finetune", str(training_bundle), str(photos), "--state", str(state), "--epochs", "1", "--weight-decay", str(wd)]
    r = run(runner, *args, "--threads", "1")
    assert r.returncode == 0, r.stderr
    native = et.read_ptd((state / "trained.ptd").read_bytes())

    manifest = json.loads((training_bundle / "manifest.json").read_text())
    train, opt = manifest["programs"]["training"], manifest["programs"]["training"]["optimizer"]
    feats, labels, batches = _features(training_bundle, photos)

    def bindings(decay):
        session = et.TrainingSession(training_bundle / "train.pte", training_bundle / "train.ptd", buffer_names=train["buffers"])
        sgd = None
        for idx in batches:
            session.forward_backward(feats[idx], labels[idx])
            sgd = sgd or session.sgd(opt["lr"], momentum=opt["momentum"], weight_decay=wd, decay=decay)
            sgd.step()
        return session.state()

    python = bindings(opt["weight_decay_parameters"])
    for name in train["trainable_parameters"]:
        assert np.array_equal(native[name].reshape(-1), python[name].reshape(-1)), name
    every = bindings(None)  # decay on every parameter, norms and biases too
    spared = [n for n in train["trainable_parameters"] if n not in opt["weight_decay_parameters"]]
    assert spared and max(np.abs(native[n] - every[n].reshape(native[n].shape)).max() for n in spared) > 1e-5

    net = export_eager_net(export_run).train()
    eager = build_optimizer("sgd", net.trainable_parameters(), lr=opt["lr"], momentum=opt["momentum"], weight_decay=wd)
    for idx in batches:
        loss = torch.nn.functional.cross_entropy(net.forward_top(torch.from_numpy(feats[idx])), torch.from_numpy(labels[idx]))
        eager.zero_grad()
        loss.backward()
        eager.step()
    for name, p in net.trainable_parameters():
        ref = p.detach().numpy().reshape(-1)
        assert np.abs(native[name].reshape(-1) - ref).max() <= 1e-6 * max(1.0, float(np.abs(ref).max())), name


def test_an_export_with_bad_adamw_settings_fails_with_one_line(export_run, tmp_path, capsys):
    from edgetl.cli import main

    out = tmp_path / "dist"
    base = ["export", "--checkpoint", str(export_run), "--out", str(out), "--training", "--optimizer"]
    for args, needle in (
        (["adamw", "--betas", "0.9,1"], "betas must be two numbers in [0, 1)"),
        (["adamw", "--eps", "0"], "eps must be a finite number > 0"),
    ):
        assert main(base + args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("edgetl: error: ") and needle in lines[0], lines
        assert not out.exists()
    with pytest.raises(SystemExit) as exc:
        main([*base, "adam"])
    assert exc.value.code == 2 and "invalid choice: 'adam'" in capsys.readouterr().err and not out.exists()
