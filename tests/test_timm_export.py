"""timm's models in the exporter's channels-last training top, and a UIB with layer scale.

A full export of a timm model (XNNPACK classifier, frozen bottom, training program, verified
against eager) takes 2-3 minutes here, beyond this suite's budget: ``benchmarks/timm_export.py``
runs it for MobileNetV4-Conv-Small and MobileNetV3-Large (figures in docs/timm.md). These tests hold
what the training program is made of: the NHWC top computes the eager MobileTL top's loss,
gradients and running statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import edgetl
from edgetl.exporter import nhwc, training
from edgetl.exporter.errors import ExportError, UnsupportedModelError
from edgetl.models import timm_models, zoo
from edgetl.profiler.measure import measure_saved_bytes
from edgetl.profiler.predict import predict_units

timm = pytest.importorskip("timm", reason="timm not installed: pip install 'edgetl[timm]'")


def _calibrated(name: str, size: int) -> nn.Module:
    torch.manual_seed(0)
    model = zoo.load_model(f"timm:{name}", num_classes=3).train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(2):
            model(torch.randn(8, 3, size, size))
    return model.eval()


@pytest.mark.parametrize(
    "name,blocks,size,pads",
    [
        ("mobilenetv4_conv_small", 3, 64, 0),  # UIBs, a ConvBnAct stage, the head's BatchNorm1d
        ("mobilenetv3_large_100", 2, 64, 0),  # Hard-Swish, squeeze-excitation
        ("tf_efficientnet_lite0", 5, 72, 1),  # a stride-2 conv with TF "SAME" padding (uneven at 72 px)
    ],
)
def test_channels_last_top_matches_the_eager_top(name, blocks, size, pads):
    model = _calibrated(name, size)
    net = training.without_dropout(edgetl.prepare(model, edgetl.TrainPolicy(blocks=blocks)))
    top = nhwc.trainable_top(net)
    assert sum(isinstance(m, nhwc.SamePadNHWC) for m in top.modules()) == pads
    f = net.forward_bottom(torch.randn(4, 3, size, size))
    y = torch.tensor([0, 1, 2, 0])
    nn.functional.cross_entropy(net.forward_top(f), y).backward()
    top(f, y)[0].backward()
    ref = dict(net.trainable_parameters())
    assert {n for n, p in top.named_parameters()} == set(ref)
    for n, p in top.named_parameters():
        scale = ref[n].grad.abs().max().item()
        assert (p.grad - ref[n].grad).abs().max().item() <= 1e-4 * max(scale, 1e-3), n
    buffers = dict(net.named_buffers())
    updated = [n for n, _ in top.updated_buffers()]
    assert updated and all(n in buffers for n in updated)
    for n, b in top.named_buffers():
        if b.dtype.is_floating_point:
            torch.testing.assert_close(b, buffers[n], msg=n)


def _with_layer_scale() -> nn.Module:
    """MobileNetV4-Conv-Small whose last UIB has a layer scale (as timm's hybrid models' UIBs do)."""
    torch.manual_seed(0)
    raw = timm.create_model("mobilenetv4_conv_small")
    block = raw.blocks[3][5]
    block.layer_scale = timm.layers.LayerScale2d(block.pw_proj.conv.out_channels, 0.5)
    return zoo.replace_classifier(timm_models.wrap(raw, "mobilenetv4_conv_small"), 3)


def test_layer_scale_trains_is_predicted_to_the_byte_and_refused_by_the_training_export():
    model = _with_layer_scale()
    for method in ("mobiletl", "vanilla"):
        policy = edgetl.TrainPolicy(2, method)
        net = edgetl.prepare(model, policy)
        assert net.get_submodule("features.blocks.3.5.layer_scale").gamma.requires_grad
        rows = {r.name: r for r in predict_units(model, policy, batch_size=2, image_size=64)}
        measured = measure_saved_bytes(net, {n: net.get_submodule(n) for n in net.top_names}, torch.randn(2, 3, 64, 64))
        row = rows["features.blocks.3.5"]
        assert any(s.what == "layer-scale input" for s in row.saved)
        assert row.nbytes == measured["features.blocks.3.5"].nbytes, method
    with pytest.raises(UnsupportedModelError, match=r"features\.blocks\.3\.5\.layer_scale \(LayerScale2d\) in trained block"):
        nhwc.trainable_top(net)


def test_a_checkpoint_of_a_timm_model_is_checked_and_loaded_by_name():
    """``edgetl export --checkpoint RUN`` reads a run's weights by the model name it recorded."""
    from edgetl.exporter.weights import check_architecture, load_weights

    torch.manual_seed(0)
    state = zoo.load_model("timm:mobilenetv4_conv_small", num_classes=4).state_dict()
    model = load_weights("timm:mobilenetv4_conv_small", state, 4)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ExportError, match=r"does not hold timm:mobilenetv4_conv_medium weights \(missing keys"):
        check_architecture("timm:mobilenetv4_conv_medium", state)
