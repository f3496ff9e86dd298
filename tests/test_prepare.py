"""prepare(): block discovery, what trains, what is frozen, and one whole block against a reference."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgetl import TrainPolicy, find_blocks, load_model, prepare
from edgetl.errors import ConfigError
from edgetl.models.blocks import block_spec, feature_units
from edgetl.models.zoo import MODELS, num_blocks
from edgetl.nn.layers import MaskedActivation, ShiftOnlyNorm, activation_kind
from edgetl.profiler.measure import measure_saved_bytes
from tests.conftest import calibrate

#: the architectures' published block counts (a new registry entry must add its own)
EXPECTED_BLOCKS = {"mobilenet_v2": 17, "mobilenet_v3_small": 11, "mobilenet_v3_large": 15, "efficientnet_b0": 16, "efficientnet_lite0": 16}
ARCHITECTURES = sorted(MODELS)


def test_every_registered_architecture_has_an_expected_block_count():
    assert set(EXPECTED_BLOCKS) == set(MODELS)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_blocks_are_found_by_type(name):
    model = load_model(name, num_classes=5)
    blocks = find_blocks(model)
    assert len(blocks) == EXPECTED_BLOCKS[name] == num_blocks(name)
    specs = [block_spec(n, b) for n, b in blocks]
    for (n, block), spec in zip(blocks, specs, strict=True):
        # the skip connection exactly where shapes allow it
        assert bool(block.use_res_connect) == (spec.stride == 1 and spec.in_channels == spec.out_channels), n
    assert all(a.out_channels == b.in_channels for a, b in itertools.pairwise(specs))  # consecutive: one chain
    names = [n for n, _ in feature_units(model)]
    assert names[0] not in dict(blocks) and names[-1] not in dict(blocks)  # stem below, final conv stage above


def test_policy_validation():
    with pytest.raises(ConfigError, match=r"blocks must be >= 0 \(0 = classifier only\), got -1"):
        TrainPolicy(blocks=-1)
    with pytest.raises(ConfigError, match="unknown TrainPolicy.method 'tinytl'"):
        TrainPolicy(blocks=1, method="tinytl")
    with pytest.raises(ConfigError, match="unknown TrainPolicy.activation_grad 'approx'"):
        TrainPolicy(blocks=1, activation_grad="approx")
    with pytest.raises(ConfigError, match="unknown TrainPolicy.activation_mask 'dense'"):
        TrainPolicy(blocks=1, activation_mask="dense")
    with pytest.raises(ConfigError, match="blocks must be an integer, got 1.5"):
        TrainPolicy(blocks=1.5)
    with pytest.raises(ConfigError, match="blocks must be an integer, got True"):
        TrainPolicy(blocks=True)
    policy = TrainPolicy(blocks=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.blocks = 2  # frozen
    assert policy.blocks == 1


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_more_blocks_than_the_model_has_is_refused(name):
    n = num_blocks(name)
    model = load_model(name, num_classes=3)
    with pytest.raises(ConfigError, match=f"blocks={n + 1} but the model has only {n} inverted-residual blocks"):
        prepare(model, TrainPolicy(blocks=n + 1))
    net = prepare(model, TrainPolicy(blocks=n))  # all of them: full fine-tuning, stem included
    assert net.bottom_names == [] and all(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("method", ["vanilla", "mobiletl"])
def test_prepared_model_computes_the_same_function_in_eval(name, method):
    torch.manual_seed(0)
    model = load_model(name, num_classes=4).eval()
    for m in model.modules():  # non-trivial statistics so shift-only norms are really exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    net = prepare(model, TrainPolicy(blocks=4, method=method)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), rtol=1e-4, atol=1e-5)
    assert set(net.state_dict()) == set(model.state_dict())  # loads back into the torchvision model


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_mobiletl_rewrites_only_the_top_blocks(name):
    model = load_model(name, num_classes=4)
    net = prepare(model, TrainPolicy(blocks=3))
    blocks = find_blocks(net)
    for i, (_, block) in enumerate(blocks):
        norms = [m for m in block.modules() if isinstance(m, (nn.BatchNorm2d, ShiftOnlyNorm))]
        acts = [m for m in block.modules() if isinstance(m, MaskedActivation)]
        if i < len(blocks) - 3:
            assert not acts and all(type(m) is nn.BatchNorm2d for m in norms)
            assert not any(p.requires_grad for p in block.parameters())
        else:
            assert all(isinstance(m, ShiftOnlyNorm) for m in norms[:-1]) and type(norms[-1]) is nn.BatchNorm2d
            plain = [m for m in block.modules() if activation_kind(m) is not None and not isinstance(m, MaskedActivation)]
            assert acts and not plain  # every activation, squeeze-excitation's included, is masked
            trainable = {n for n, p in block.named_parameters() if p.requires_grad}
            for m in norms[:-1]:  # shift only: the scale is a frozen buffer
                assert [n for n, _ in m.named_parameters()] == ["bias"] and "weight" in dict(m.named_buffers())
            assert trainable == {n for n, _ in block.named_parameters()}
    # the original is untouched
    assert not any(isinstance(m, (ShiftOnlyNorm, MaskedActivation)) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_head_only_policy_trains_the_classifier_alone(name):
    model = load_model(name, num_classes=4)
    net = prepare(model, TrainPolicy(blocks=0))
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    linears = [n for n, m in model.classifier.named_modules() if isinstance(m, nn.Linear)]
    assert linears and trainable == {f"classifier.{n}.{p}" for n in linears for p in ("weight", "bias")}
    assert net.top_names == [] and net.bottom_names == [n for n, _ in feature_units(model)]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_frozen_bottom_runs_without_autograd_and_in_eval(name):
    net = prepare(load_model(name, num_classes=4), TrainPolicy(blocks=2)).train()
    assert net.bottom_names and net.top_names
    assert all(not u.training for u in net.bottom_units())
    assert all(u.training for u in net.top_units())
    units = {n: net.get_submodule(n) for n in net.bottom_names + net.top_names}
    measured = measure_saved_bytes(net, units, torch.randn(2, 3, 64, 64))
    assert all(measured[n].nbytes == 0 and measured[n].in_shape for n in net.bottom_names)
    assert all(measured[n].nbytes > 0 for n in net.top_names)
    assert not net.forward_bottom(torch.randn(2, 3, 64, 64)).requires_grad


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_training_steps_change_exactly_what_mobiletl_trains(name):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 64, 64)
    net = prepare(calibrate(load_model(name, num_classes=4), x), TrainPolicy(blocks=2))
    before = _snapshot(net)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        loss = F.cross_entropy(net(x), torch.tensor([0, 1, 2, 3] * 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    for name in net.bottom_names:
        assert not any(k.startswith(name + ".") for k in changed), f"frozen {name} changed"
    for block_name in net.trained_block_names:
        block = net.get_submodule(block_name)
        norms = [n for n, m in block.named_modules() if isinstance(m, (ShiftOnlyNorm, nn.BatchNorm2d))]
        for n in norms[:-1]:  # internal: shift trains, scale and statistics frozen
            p = f"{block_name}.{n}."
            assert p + "bias" in changed
            assert not {p + "weight", p + "running_mean", p + "running_var", p + "num_batches_tracked"} & changed
        last = f"{block_name}.{norms[-1]}."
        assert {last + "weight", last + "bias", last + "running_mean", last + "running_var"} <= changed
        convs = [n for n, m in block.named_modules() if isinstance(m, nn.Conv2d)]
        assert all(f"{block_name}.{c}.weight" in changed for c in convs)
    above = [n for n in net.top_names if n not in net.trained_block_names]  # the final conv stage: trains in full
    assert above and all(k in changed for k, p in net.named_parameters() if any(k.startswith(n + ".") for n in above))
    assert {f"classifier.{k}" for k, _ in net.classifier.named_parameters()} <= changed


def _ste(x, y, mask):
    """Forward value y, gradient dy * mask: an independent straight-through reference."""
    return y.detach() + (x - x.detach()) * mask.float()


def _frozen_affine(x, bn, beta):
    s = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return x * s.view(1, -1, 1, 1) + (beta - bn.running_mean * s).view(1, -1, 1, 1)


def test_whole_mobilenet_v3_block_matches_an_independent_reference():
    """A V3 block with expansion, Hard-Swish and squeeze-excitation, forward and every gradient."""
    torch.manual_seed(0)
    model = load_model("mobilenet_v3_large", num_classes=4).double()  # float64: compare formulas, not rounding
    name, orig = next(
        (n, b) for n, b in find_blocks(model) if b.use_res_connect and len(b.block) == 4 and type(b.block[0][2]) is nn.Hardswish
    )
    for m in orig.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    policy_k = len(find_blocks(model)) - [n for n, _ in find_blocks(model)].index(name)
    net = prepare(model, TrainPolicy(blocks=policy_k))
    block = net.get_submodule(name).train()
    ref = {k: v.detach().clone().requires_grad_(v.dtype.is_floating_point) for k, v in dict(orig.named_parameters()).items()}

    x = torch.randn(3, orig.block[0][0].in_channels, 9, 9, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, orig.block[3][0].out_channels, 9, 9, dtype=torch.float64)
    out = block(x)
    (out * dy).sum().backward()

    xr = x.detach().clone().requires_grad_()
    e, d, se, p = orig.block
    z = F.conv2d(xr, ref["block.0.0.weight"])
    z = _frozen_affine(z, e[1], ref["block.0.1.bias"])
    z = _ste(z, F.hardswish(z), z > 0)
    z = F.conv2d(z, ref["block.1.0.weight"], stride=d[0].stride, padding=d[0].padding, groups=d[0].groups)
    z = _frozen_affine(z, d[1], ref["block.1.1.bias"])
    a = _ste(z, F.hardswish(z), z > 0)
    s = a.mean((2, 3), keepdim=True)
    s = F.conv2d(s, ref["block.2.fc1.weight"], ref["block.2.fc1.bias"])
    s = _ste(s, F.relu(s), s > 0)
    s = F.hardsigmoid(F.conv2d(s, ref["block.2.fc2.weight"], ref["block.2.fc2.bias"]))  # gate: exact
    z = F.conv2d(a * s, ref["block.3.0.weight"])
    rm, rv = p[1].running_mean.clone(), p[1].running_var.clone()
    z = F.batch_norm(z, rm, rv, ref["block.3.1.weight"], ref["block.3.1.bias"], training=True, momentum=p[1].momentum, eps=p[1].eps)
    expected = z + xr
    (expected * dy).sum().backward()

    # float64: a wrong formula is off by O(1); accumulation order by < 1e-6
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-9)
    got = dict(block.named_parameters())
    assert set(got) == {k for k in ref if not (k.endswith("weight") and k[:9] in ("block.0.1", "block.1.1"))}
    for k, param in got.items():
        torch.testing.assert_close(param.grad, ref[k].grad, rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    torch.testing.assert_close(block.block[3][1].running_mean, rm)  # last norm's statistics update
