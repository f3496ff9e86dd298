"""MobileTL building blocks against reference formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgetl.nn import ops
from edgetl.nn.layers import MaskedActivation, ShiftOnlyNorm


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5, 7), (2, 3, 4, 5), (1, 13, 3, 3)])
def test_pack_unpack_round_trip(shape):
    torch.manual_seed(1)
    mask = torch.rand(shape) > 0.5
    packed = ops.pack_bits(mask)
    assert packed.dtype == torch.uint8
    assert packed.numel() == ops.packed_numel(mask.numel()) == -(-mask.numel() // 8)
    assert torch.equal(ops.unpack_bits(packed, mask.shape), mask)
    assert torch.equal(ops.pack_bits_lean(mask), packed)  # the eager operator's packer: the same bytes


def test_pack_bit_order_is_lsb_first():
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    assert ops.pack_bits(mask).tolist() == ops.pack_bits_lean(mask).tolist() == [0b10000001, 0b00000001]


def test_packing_a_mask_allocates_an_eighth_of_a_byte_per_element_and_step():
    """The eager packer's temporaries: with the plain arithmetic (a uint8, an int32 and their product,
    9 bytes an element alive at once) packing an expanded map's mask outweighed the map itself and set
    the top forward's peak under saved_precision (measured 84.1 MiB against 71.5 predicted)."""
    from torch.profiler import ProfilerActivity, profile

    def allocated(fn, *args) -> int:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn(*args)
        return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())  # every allocation, in bytes

    x = torch.randn(8, 96, 28, 28)
    n = x.numel()
    mask = x > 0
    assert allocated(ops.pack_bits_lean, mask) <= n + 64  # the result and 7 shifted columns, n/8 bytes each
    assert allocated(ops.pack_bits, mask) >= 8 * n
    # the eager operator: its fp32 output (4 bytes an element), the bool mask (1) and the packing (1)
    assert allocated(torch.ops.edgetl.masked_act_packed, x, "relu6", "sign") <= 6 * n + 1024


def _reference_grad(x, kind, rule):
    if kind == "relu6" and rule == "exact":
        return ((x > 0) & (x < 6)).float()
    return (x > 0).float()


@pytest.mark.parametrize("kind", ["relu", "relu6", "hardswish", "silu"])
@pytest.mark.parametrize("rule", ["sign", "exact"])
@pytest.mark.parametrize("mask", ["reuse", "packed"])
def test_masked_activation_forward_exact_backward_masked(kind, rule, mask):
    torch.manual_seed(2)
    x = (torch.randn(2, 3, 5, 7) * 5).requires_grad_()
    dy = torch.randn(2, 3, 5, 7)
    act = MaskedActivation(kind, rule, mask)
    y = act(x)
    torch.testing.assert_close(y, ops.activation_forward(x.detach(), kind), rtol=0, atol=0)
    (y * dy).sum().backward()
    torch.testing.assert_close(x.grad, dy * _reference_grad(x.detach(), kind, rule), rtol=0, atol=0)


def test_exact_rule_differs_from_sign_for_relu6_only_above_six():
    x = torch.tensor([-1.0, 0.5, 5.0, 7.0], requires_grad=True)
    ops.masked_act(x, "relu6", "exact").sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
    x.grad = None
    ops.masked_act(x, "relu6", "sign").sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("kind,torch_act", [("hardsigmoid", nn.Hardsigmoid()), ("sigmoid", nn.Sigmoid())])
def test_gates_keep_exact_derivative(kind, torch_act):
    torch.manual_seed(3)
    x = (torch.randn(4, 6, 1, 1) * 3).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    dy = torch.randn_like(x)
    (MaskedActivation(kind, "sign")(x) * dy).sum().backward()
    (torch_act(x_ref) * dy).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def _saved(fn):
    out = []

    def pack(t):
        out.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return out, result


def test_packed_activation_saves_only_a_bit_packed_mask():
    x = torch.randn(3, 5, 7, 11, requires_grad=True)  # 1155 elements: not a multiple of 8
    saved, _ = _saved(lambda: MaskedActivation("hardswish", mask="packed")(x))
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.uint8, 145)]


@pytest.mark.parametrize("kind", ["relu", "relu6", "hardswish", "silu", "hardsigmoid", "sigmoid"])
def test_reuse_activation_saves_only_its_output(kind):
    x = torch.randn(3, 5, 7, 11, requires_grad=True)
    saved, y = _saved(lambda: MaskedActivation(kind, mask="reuse")(x))
    assert len(saved) == 1
    assert saved[0].untyped_storage().data_ptr() == y.untyped_storage().data_ptr() and saved[0].shape == y.shape


def _bn(c=6, eps=1e-3):
    torch.manual_seed(4)
    bn = nn.BatchNorm2d(c, eps=eps)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 3.0)
    return bn.eval()


def test_shift_only_norm_matches_eval_batchnorm_and_reference_gradients():
    bn = _bn()
    norm = ShiftOnlyNorm(bn)
    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    dy = torch.randn(4, 6, 5, 5)
    y = norm(x)
    torch.testing.assert_close(y, bn(x.detach()))
    (y * dy).sum().backward()
    sigma = torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(x.grad, dy * (bn.weight / sigma).detach().view(1, -1, 1, 1))  # dx = gamma/sigma dy
    torch.testing.assert_close(norm.bias.grad, dy.sum(dim=(0, 2, 3)))  # dbeta = sum dy
    assert [n for n, p in norm.named_parameters()] == ["bias"]


def test_shift_only_norm_stores_no_activation():
    norm = ShiftOnlyNorm(_bn())
    constants = {b.untyped_storage().data_ptr() for b in norm.buffers()}
    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    saved, _ = _saved(lambda: norm(x))
    # exactly the per-channel scale, a view of its constant buffer: nothing of x's size
    assert [tuple(t.shape) for t in saved] == [(1, 6, 1, 1)]
    assert saved[0].untyped_storage().data_ptr() == norm.scale.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() in constants for t in saved)


def test_shift_only_norm_state_dict_round_trips_to_batchnorm():
    bn = _bn()
    norm = ShiftOnlyNorm(bn)
    assert set(norm.state_dict()) == set(bn.state_dict())
    other = ShiftOnlyNorm(nn.BatchNorm2d(6, eps=bn.eps))
    other.load_state_dict(norm.state_dict())  # derived scale must follow the loaded statistics
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(other(x), bn(x))
    fresh = nn.BatchNorm2d(6, eps=bn.eps).eval()
    fresh.load_state_dict(norm.state_dict())  # and back into a plain batch norm
    torch.testing.assert_close(fresh(x), bn(x))


def test_unknown_kind_rule_and_mask_fail_clearly():
    with pytest.raises(ValueError, match="unknown activation kind 'gelu'"):
        MaskedActivation("gelu")
    with pytest.raises(ValueError, match="unknown activation-gradient rule"):
        ops.masked_act(torch.randn(3), "relu", "approx")
    with pytest.raises(ValueError, match="unknown activation mask storage 'dense'"):
        MaskedActivation("relu", mask="dense")
