"""The training program at every depth: K = 1, a middle K and all blocks of every registry model,
exported and verified against eager; and the verification's replay of the program's 1-bit masks.

MobileTL's sign mask is a step function of the activation input. ExecuTorch's portable kernels
and PyTorch sum in different orders, so an input within float32 rounding of 0 is kept by one and
dropped by the other; a deep top has a few such elements per step, each moving its channel's
gradient and every layer below it. The verification replays the program's own masks in eager
(training._Replayed) when the plain comparison disagrees, and starts each step from the
program's state: MobileNetV2 with every block trained amplifies a 1e-7 change of its weights to
2% of its weights in three steps in eager PyTorch alone (test below), so only step-by-step
agreement can be asked of two float32 implementations; and from such a state eager float32's own
gradients can be tens of percent from the exact step, so that step is computed in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import edgetl
from edgetl.exporter import training
from edgetl.models.zoo import MODELS, load_model, num_blocks
from edgetl.nn.layers import MaskedActivation

IMAGE_SIZE, BATCH = 64, 2


#: K = 1, a middle K and all blocks of every registry model and of timm's MobileNetV4-Conv-Small
#: (UIBs, a ConvBnAct stage, the head's BatchNorm1d); timm's Lite0 (TF "SAME" padding in every
#: stride-2 block) at all blocks. An all-blocks export takes 40-100 s; every K at the models'
#: usual sizes is benchmarks/training_export_sweep.py.
DEPTHS = [
    *((name, k) for name in MODELS for k in sorted({1, num_blocks(name) // 2, num_blocks(name)})),
    *(("timm:mobilenetv4_conv_small", k) for k in (1, 6, 12)),  # of 12 blocks (timm is imported by the test)
    ("timm:tf_efficientnet_lite0", 16),
]


@pytest.mark.parametrize("name,k", DEPTHS)
def test_every_registry_model_exports_a_verified_training_program_at_k(tmp_path, name, k):
    """K = all trains the stem too (its full 3x3 convolution through ATen's convolution and its
    backward); every K verifies against eager with the exporter's tolerances."""
    if name.startswith("timm:"):
        pytest.importorskip("timm", reason="timm not installed: pip install 'edgetl[timm]'")
    torch.manual_seed(0)
    net = edgetl.prepare(load_model(name, num_classes=3), edgetl.TrainPolicy(blocks=k))
    with torch.no_grad():
        shape = tuple(net.forward_bottom(torch.zeros(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)).shape)
    ex = training.export_training(net, feature_shape=shape, num_classes=3)
    assert sorted(ex.parameter_names) == sorted(n for n, _ in net.trainable_parameters())
    pte, ptd = tmp_path / "train.pte", tmp_path / "train.ptd"
    pte.write_bytes(ex.program.pte)
    ptd.write_bytes(ex.program.ptd)
    check = training.verify_training(net, ex, pte, ptd, lr=0.01, momentum=0.9, weight_decay=0.0)
    assert check.loss_max_abs_diff <= training.LOSS_TOLERANCE and check.running_stats_moved > 0
    if check.mask_flips is not None:  # replayed: every activation input agreed within tolerance
        assert check.mask_flip_max_abs_diff <= training.WEIGHT_TOLERANCE


def test_replayed_masks_drive_eager_backward_through_the_programs_mask():
    """Backward follows the program's mask, not eager's own; the forward stays eager's exact one."""
    x = torch.tensor([[-1e-7, 2e-7, 1.0, -2.0, 7.0]], requires_grad=True)
    program = torch.tensor([[1e-7, -2e-7, 1.0, -2.0, 7.0]])  # the first two on the other side of 0
    for kind in ("relu6", "hardswish", "relu", "silu"):
        act = training._Replayed(MaskedActivation(kind))
        act.replay(program)
        y = act(x)
        (g,) = torch.autograd.grad(y, x, torch.full_like(y, 3.0))
        assert torch.equal(y, MaskedActivation(kind)(x.detach()))
        assert g.tolist() == [[3.0, 0.0, 3.0, 0.0, 3.0]]  # MobileTL's sign rule over the program's input
        assert act.flips()[0] == 2
    exact = training._Replayed(MaskedActivation("relu6", rule="exact"))
    exact.replay(program)
    (g,) = torch.autograd.grad(exact(x), x, torch.ones(1, 5))
    assert g.tolist() == [[1.0, 0.0, 1.0, 0.0, 0.0]]  # 1[0 < x < 6]


def test_replayed_gate_keeps_its_exact_derivative_with_the_programs_mask():
    """Hard-Sigmoid's derivative 1[0 < y < 1] / 6 takes the program's side of -3 and 3; Sigmoid
    has a continuous derivative and is not replayed."""
    x = torch.tensor([[-3.0 + 1e-6, 2.0, 4.0]], requires_grad=True)
    gate = training._Replayed(MaskedActivation("hardsigmoid"))
    gate.replay(torch.tensor([[-3.0 - 1e-6, 2.0, 4.0]]))
    (g,) = torch.autograd.grad(gate(x), x, torch.ones(1, 3))
    torch.testing.assert_close(g, torch.tensor([[0.0, 1 / 6, 0.0]]))
    assert gate.flips()[0] == 1
    sigmoid = training._Replayed(MaskedActivation("sigmoid"))
    sigmoid.replay(torch.zeros(1, 3))
    y = sigmoid(x)
    (g,) = torch.autograd.grad(y, x, torch.ones(1, 3))
    torch.testing.assert_close(g, (F.sigmoid(x) * (1 - F.sigmoid(x))).detach())
    assert sigmoid.flips() == (0, 0.0)


def test_a_deep_top_amplifies_rounding_so_trajectories_cannot_be_compared():
    """Why the replayed comparison starts each step from the program's state: two eager PyTorch
    runs of MobileNetV2 (all blocks, random initialisation, 64 px) whose weights differ by 1e-7
    part apart by ten times the weight tolerance within three SGD steps."""

    def spread(name: str) -> float:  # the largest weight difference, relative, after three steps
        torch.manual_seed(0)
        net = edgetl.prepare(load_model(name, num_classes=3), edgetl.TrainPolicy(blocks=num_blocks(name)))
        gen = torch.Generator().manual_seed(0)
        shape = (BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
        batches = [(torch.randn(shape, generator=gen).abs(), torch.randint(0, 3, (BATCH,), generator=gen)) for _ in range(3)]
        runs = []
        for eps in (0.0, 1e-7):
            eager = training.without_dropout(net).train()
            noise = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for _, p in eager.trainable_parameters():
                    p.mul_(1 + eps * torch.randn(p.shape, generator=noise))
            opt = torch.optim.SGD([p for _, p in eager.trainable_parameters()], lr=0.01, momentum=0.9)
            for x, y in batches:
                opt.zero_grad()
                F.cross_entropy(eager.forward_top(x), y).backward()
                opt.step()
            runs.append({k: p.detach() for k, p in eager.trainable_parameters()})
        a, b = runs
        return max(float((a[k] - b[k]).abs().max()) / max(1.0, float(a[k].abs().max())) for k in a)

    assert spread("mobilenet_v2") > 10 * training.WEIGHT_TOLERANCE
