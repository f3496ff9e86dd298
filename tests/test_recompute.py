"""TrainPolicy.recompute: every trained unit keeps only its input and is recomputed in backward.

Exact (the same loss, gradients and running statistics bit for bit), predicted to the byte, and
refused by the exporter."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import edgetl
from edgetl.exporter.errors import ExportError
from edgetl.models.blocks import find_blocks
from edgetl.models.zoo import MODELS, load_model
from edgetl.profiler.analytic import total_bytes
from edgetl.profiler.measure import measure_saved_bytes
from edgetl.profiler.predict import predict_units, recompute_transient
from edgetl.profiler.shapes import float_bytes
from edgetl.train import prepare as prepare_mod
from edgetl.train.policy import METHODS, TrainPolicy
from edgetl.train.prepare import Recomputed, prepare

ALL_MODELS = sorted(MODELS)


@pytest.fixture(scope="module")
def models():
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = load_model(name, num_classes=3)
        return cache[name]

    return get


def _run_steps(base: nn.Module, policy: TrainPolicy, steps: int = 2):
    """Two SGD steps (fixed seeds: the same dropout / stochastic-depth draws); per step the loss and
    gradients, then the final parameters and buffers."""
    net = prepare(base, policy)
    opt = torch.optim.SGD([p for _, p in net.trainable_parameters()], lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    record = []
    for step in range(steps):
        x, y = torch.randn(4, 3, 40, 40, generator=gen), torch.randint(0, 3, (4,), generator=gen)
        torch.manual_seed(100 + step)
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        record.append((loss.detach(), {n: p.grad.clone() for n, p in net.trainable_parameters()}))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return net, record


def _count_calls(net: nn.Module, module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("method", METHODS)
# K=3 on every architecture; K=all (the stem recomputed too, full fine-tuning) on the smallest
@pytest.mark.parametrize("name,k", [(name, 3) for name in ALL_MODELS] + [("mobilenet_v3_small", "all")])
def test_recompute_is_bit_for_bit_exact(models, name, method, k):
    base = models(name)
    k = len(find_blocks(base)) if k == "all" else k
    plain, want = _run_steps(base, TrainPolicy(k, method))
    rc, got = _run_steps(base, TrainPolicy(k, method, recompute=True))
    for (loss_a, grads_a), (loss_b, grads_b) in zip(want, got, strict=True):
        assert torch.equal(loss_a, loss_b)
        assert grads_a.keys() == grads_b.keys() and grads_a
        for n in grads_a:
            assert torch.equal(grads_a[n], grads_b[n]), n
    params_a, params_b = dict(plain.named_parameters()), dict(rc.named_parameters())
    assert all(torch.equal(params_a[n], params_b[n]) for n in params_a)
    buffers_a, buffers_b = dict(plain.named_buffers()), dict(rc.named_buffers())
    assert buffers_a.keys() == buffers_b.keys()
    for n in buffers_a:
        assert torch.equal(buffers_a[n], buffers_b[n]), n  # running statistics updated once per step, not twice
    initial = dict(base.named_buffers())
    moved = [n for n, b in buffers_b.items() if n.endswith("running_var") and not torch.equal(b, initial[n])]
    assert moved  # the comparison is about statistics that did change
    assert all(int(buffers_b[n.replace("running_var", "num_batches_tracked")]) == 2 for n in moved)


def test_recompute_runs_the_trained_units_twice_and_the_frozen_ones_once(models):
    base = models("mobilenet_v3_large")
    for recompute, twice in ((False, 1), (True, 2)):
        net = prepare(base, TrainPolicy(2, "mobiletl", recompute=recompute))
        top_conv = next(m for m in net.get_submodule(net.top_names[0]).modules() if isinstance(m, nn.Conv2d))
        final_conv = next(m for m in net.get_submodule(net.top_names[-1]).modules() if isinstance(m, nn.Conv2d))
        frozen_conv = next(m for m in net.get_submodule(net.bottom_names[-1]).modules() if isinstance(m, nn.Conv2d))
        counts = [_count_calls(net, m) for m in (top_conv, final_conv, frozen_conv)]
        net(torch.randn(2, 3, 32, 32)).sum().backward()
        assert [c[0] for c in counts] == [twice, twice, 1]


def test_without_scratch_statistics_the_recomputation_would_update_them_twice(models, monkeypatch):
    """The guard is what the exactness test checks: without it the running statistics differ."""
    base = models("mobilenet_v2")
    plain, _ = _run_steps(base, TrainPolicy(2, "vanilla"), steps=1)
    monkeypatch.setattr(prepare_mod, "_scratch_running_stats", lambda _unit: contextlib.nullcontext())
    rc, _ = _run_steps(base, TrainPolicy(2, "vanilla", recompute=True), steps=1)
    key = next(n for n, _ in plain.named_buffers() if n.startswith(plain.top_names[0]) and n.endswith("running_var"))
    assert not torch.equal(dict(plain.named_buffers())[key], dict(rc.named_buffers())[key])
    assert int(dict(rc.named_buffers())[key.replace("running_var", "num_batches_tracked")]) == 2


def test_without_the_generator_state_stochastic_depth_would_draw_other_masks(models, monkeypatch):
    """EfficientNet's top blocks drop paths at random: the recomputation must replay the forward's draws."""
    base = models("efficientnet_b0")
    _, want = _run_steps(base, TrainPolicy(3, "mobiletl"), steps=1)
    _, got = _run_steps(base, TrainPolicy(3, "mobiletl", recompute=True), steps=1)
    assert all(torch.equal(want[0][1][n], got[0][1][n]) for n in want[0][1])
    monkeypatch.setattr(prepare_mod, "_draws_random_numbers", lambda _unit: False)
    _, wrong = _run_steps(base, TrainPolicy(3, "mobiletl", recompute=True), steps=1)
    assert torch.equal(want[0][0], wrong[0][0])  # the forward is the same; its backward is not
    assert not all(torch.equal(want[0][1][n], wrong[0][1][n]) for n in want[0][1])


@pytest.mark.parametrize("name", ALL_MODELS)
def test_recompute_keeps_the_architecture_state_dict_and_eval_forward(models, name):
    base = models(name)
    plain, rc = prepare(base, TrainPolicy(3)), prepare(base, TrainPolicy(3, recompute=True))
    assert list(rc.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in rc.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert [n for n, m in rc.named_modules() if isinstance(m, Recomputed)] == rc.top_names
    assert [type(u).__name__ for u in rc.top_units()] == [type(u).__name__ for u in plain.top_units()]
    fresh = load_model(name, num_classes=3)
    fresh.load_state_dict({k: v for k, v in rc.state_dict().items()}, strict=True)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(rc.eval()(x), plain.eval()(x))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("image_size", [32, 64])
def test_predicted_equals_measured_with_recompute(models, name, method, image_size):
    base = models(name)
    policy = TrainPolicy(4, method, recompute=True)
    net = prepare(base, policy)
    measured = measure_saved_bytes(
        net, {n: net.get_submodule(n) for n in net.bottom_names + net.top_names}, torch.randn(2, 3, image_size, image_size)
    )
    rows = predict_units(base, policy, batch_size=2, image_size=image_size)
    assert {r.name: r.nbytes for r in rows} == {n: m.nbytes for n, m in measured.items()}
    trained = [r for r in rows if r.role in ("block", "stage")]
    assert [r.name for r in trained] == net.top_names
    assert all(r.nbytes == float_bytes(r.in_shape) and r.recomputed for r in trained)
    plain = {r.name: r for r in predict_units(base, TrainPolicy(4, method), batch_size=2, image_size=image_size)}
    # what a unit stores again while recomputed: its plain saved tensors less its input
    for r in trained:
        assert total_bytes(r.recomputed) == plain[r.name].nbytes - r.nbytes
    assert recompute_transient(rows) == max(total_bytes(r.recomputed) for r in trained) > 0
    assert recompute_transient(plain.values()) == 0
    assert sum(r.nbytes for r in rows) < sum(r.nbytes for r in plain.values())


def test_the_exporter_refuses_a_recomputed_training_program(tmp_path):
    model = load_model("mobilenet_v2", num_classes=3)
    config = edgetl.ExportConfig(image_size=64, batch_size=2, training=True)
    with pytest.raises(ExportError, match=r"^TrainPolicy.recompute cannot be exported: the training program stores what it stores"):
        edgetl.export(model, TrainPolicy(2, recompute=True), tmp_path / "dist", config, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def _backward_start_and_peak(timeline) -> tuple[int, int]:
    start = next(t0 for name, t0, _ in timeline.phases if name == "backward")
    before = max(i for i, t in enumerate(timeline.times_us) if t <= start)
    return timeline.total(before), timeline.phase_peaks()["backward"]


@pytest.mark.parametrize("name", ["efficientnet_b0"])
def test_step_timeline_with_recompute(name):
    """Live bytes entering backward drop by exactly the predicted stored bytes (EfficientNet's
    stochastically-deep blocks also keep the generator state), and backward then holds at least the
    predicted recomputation transient on top of them. EfficientNet-B0 only (squeeze-excitation,
    stochastic depth): the suite's time budget; the stored bytes of every model under recompute are
    held to the byte in test_predicted_equals_measured_with_recompute."""
    from edgetl.profiler.timeline import measure_step_timeline

    base, k, batch, size = load_model(name, num_classes=10), 4, 2, 64
    figures = {}
    for recompute in (False, True):
        policy = TrainPolicy(k, "mobiletl", recompute=recompute)
        rows = predict_units(base, policy, batch_size=batch, image_size=size)
        start, peak = _backward_start_and_peak(measure_step_timeline(name, policy, batch_size=batch, image_size=size, num_classes=10))
        figures[recompute] = (start, peak, sum(r.nbytes for r in rows), recompute_transient(rows))
    (start0, _, stored0, _), (start1, peak1, stored1, transient) = figures[False], figures[True]
    net = prepare(base, TrainPolicy(k, recompute=True))
    rng_states = sum(prepare_mod._draws_random_numbers(u) for u in net.top_units())
    assert rng_states == (k if name == "efficientnet_b0" else 0)
    assert start0 - start1 == stored0 - stored1 - rng_states * torch.get_rng_state().numel()
    assert peak1 - start1 >= transient > 0
