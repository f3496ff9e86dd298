"""Memory options beyond MobileTL (TrainPolicy fields that prepare() applies): the same training, less memory."""

from __future__ import annotations

import pytest
import torch

from edgetl.errors import ConfigError
from edgetl.models.zoo import MODELS, load_model
from edgetl.train.bottom import frozen_run
from edgetl.train.policy import TrainPolicy
from edgetl.train.prepare import prepare


@pytest.mark.parametrize("model", sorted(MODELS))
def test_bottom_chunk_gives_the_same_features_and_gradients(model):
    torch.manual_seed(0)
    plain = load_model(model, num_classes=3)
    whole = prepare(plain, TrainPolicy(blocks=2))
    x, y = torch.randn(7, 3, 48, 48), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    for chunk in (2, 3, 5):  # 7 images: every chunking leaves a remainder
        chunked = prepare(plain, TrainPolicy(blocks=2, bottom_chunk=chunk))
        # oneDNN picks convolution kernels by batch size: equal up to float rounding, not always bit for bit
        want = whole.forward_bottom(x)
        torch.testing.assert_close(chunked.forward_bottom(x), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
        grads = []
        for net in (whole, chunked):
            net.zero_grad(set_to_none=True)
            torch.manual_seed(1)  # the same dropout masks in the classifier
            torch.nn.functional.cross_entropy(net(x), y).backward()
            grads.append([p.grad for _, p in net.trainable_parameters()])
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_bottom_chunk_must_be_a_positive_integer(bad):
    with pytest.raises(ConfigError, match="bottom_chunk must be an integer >= 1"):
        TrainPolicy(blocks=1, bottom_chunk=bad)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_the_frozen_bottom_run_flat_gives_each_units_own_output(model):
    """edgetl.train.bottom unrolls the frozen units to free each map once read: same features, bit for bit."""
    torch.manual_seed(0)
    net = prepare(load_model(model, num_classes=10), TrainPolicy(2)).train()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = x
        for unit in net.bottom_units():
            expected = unit(expected)
        assert torch.equal(net.forward_bottom(x), expected)
    assert {frozen_run(u) for u in net.bottom_units()} >= {"unrolled", "residual"}
