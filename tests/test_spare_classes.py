"""Spare classes (``edgetl export --training --spare-classes N``): inert outputs a device assigns.

The exported program against eager PyTorch with a spare output switched on in its weights file,
the loss over active classes against its formula, and the ``embed`` method imprinting reads.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import edgetl
from edgetl.cli import main
from edgetl.exporter import _executorch as et
from edgetl.exporter import training
from edgetl.nn.spare import SpareClassLinear, cross_entropy, spare_head
from tests.conftest import CLASSES, EXPORT_BATCH, SPARE, export_eager_net


@pytest.fixture(scope="module")
def bundle(spare_bundle) -> edgetl.ExportBundle:
    return edgetl.ExportBundle.load(spare_bundle)


def _spare_eager(run) -> edgetl.TransferModel:
    net = export_eager_net(run)
    net.classifier[1] = SpareClassLinear(net.classifier[1], SPARE)
    return net


def test_spare_outputs_are_listed_inert_and_in_the_weights_file(bundle):
    train = bundle.manifest.programs.training
    spare = train.spare_classes
    known = len(CLASSES)
    assert (spare.count, spare.weight, spare.bias, spare.active) == (
        SPARE,
        "classifier.1.weight",
        "classifier.1.bias",
        "classifier.1.active",
    )
    assert bundle.manifest.model.classes == list(CLASSES)
    assert train.methods["predict"].outputs[0].shape == [EXPORT_BATCH, known + SPARE]
    assert train.methods["embed"].outputs[0].shape == [EXPORT_BATCH, spare.embedding_size]
    tensors = et.read_ptd(bundle.file("train.ptd").read_bytes())
    assert tensors["classifier.1.active"].tolist() == [1.0] * known + [0.0] * SPARE
    assert not tensors["classifier.1.weight"].reshape(known + SPARE, -1)[known:].any()


def test_known_rows_are_the_runs(bundle, export_run):
    tensors = et.read_ptd(bundle.file("train.ptd").read_bytes())
    run = export_eager_net(export_run).state_dict()
    known = len(CLASSES)
    assert np.array_equal(tensors["classifier.1.weight"].reshape(known + SPARE, -1)[:known], run["classifier.1.weight"].numpy())
    assert np.array_equal(tensors["classifier.1.bias"].reshape(-1)[:known], run["classifier.1.bias"].numpy())


def test_program_trains_a_switched_on_spare_class_like_eager_and_leaves_the_other_inert(bundle, export_run, tmp_path):
    train = bundle.manifest.programs.training
    known = len(CLASSES)
    net = training.without_dropout(_spare_eager(export_run)).train()
    head = net.classifier[1]
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # the device's imprinting: a row for output `known`, switched on
        head.weight[known] = torch.randn(head.in_features, generator=gen) * 0.05
        head.bias[known] = 0.1
        head.active[known] = 1.0
    base = bundle.file("train.ptd").read_bytes()
    layout = et.ptd_slots(base)
    names = ("classifier.1.weight", "classifier.1.bias", "classifier.1.active")
    ptd = tmp_path / "switched.ptd"
    ptd.write_bytes(et.write_ptd(base, layout, {n: net.state_dict()[n].numpy() for n in names}))
    session = et.TrainingSession(bundle.file("train.pte"), ptd, buffer_names=train.buffers)
    opt = torch.optim.SGD([p for _, p in net.trainable_parameters()], lr=0.005, momentum=0.9)
    shape = train.methods["forward"].inputs[0].shape
    sgd = None
    for _ in range(3):
        f = torch.randn(shape, generator=gen).relu()
        y = torch.tensor([known, 0, known, 2])  # the new class and known ones
        loss = F.cross_entropy(net.forward_top(f), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        et_loss, logits, *_ = session.forward_backward(f.numpy(), y.numpy())
        sgd = sgd or session.sgd(0.005, momentum=0.9)
        sgd.step()
        assert abs(float(et_loss) - loss.item()) < 1e-4
        assert np.all(logits[:, known + 1] < -1e8), "an inactive output must stay masked"
        assert np.all(np.argmax(logits, 1) <= known)
    state = session.state()
    for name in train.trainable_parameters:
        assert np.abs(state[name].reshape(-1) - net.state_dict()[name].numpy().reshape(-1)).max() < 1e-4, name
    w = state["classifier.1.weight"].reshape(known + SPARE, -1)
    assert np.array_equal(w[known + 1], np.zeros_like(w[known + 1])), "the inert row gets an exactly zero gradient"
    assert state["classifier.1.bias"].reshape(-1)[known + 1] == 0.0
    assert np.abs(w[known] - head.weight[known].detach().numpy()).max() < 1e-4 and not np.allclose(w[known], 0)


def test_embed_is_the_classifier_input_of_eager(bundle, export_run):
    net = _spare_eager(export_run).eval()
    shape = bundle.manifest.programs.training.methods["embed"].inputs[0].shape
    f = torch.randn(shape, generator=torch.Generator().manual_seed(2)).relu()
    captured = []
    net.classifier[1].register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    with torch.no_grad():
        net.forward_top(f)
    got = et.Program(bundle.file("train.pte"), bundle.file("train.ptd")).run("embed", f.numpy())[0]
    assert np.abs(got - captured[0].numpy()).max() < 1e-4


def test_label_smoothing_spreads_over_the_active_classes_only():
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(8, 4)
    head = SpareClassLinear(linear, 3)
    x, y = torch.randn(5, 8, generator=gen), torch.tensor([0, 3, 1, 2, 3])
    got = cross_entropy(head(x), y, label_smoothing=0.2, active=head.active)
    want = F.cross_entropy(linear(x), y, label_smoothing=0.2)  # the 4 known classes alone
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(cross_entropy(head(x), y, active=head.active), F.cross_entropy(linear(x), y), atol=1e-6)
    assert spare_head(nn.Sequential(nn.Dropout(), head)) == ("1", head)


def test_spare_classes_need_a_training_export(export_run, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(export_run), "--out", str(tmp_path / "o"), "--spare-classes", "2"]) == 2
    assert "spare classes" in capsys.readouterr().err
    argv = ["export", "--checkpoint", str(export_run), "--out", str(tmp_path / "o"), "--training", "--spare-classes", "-1"]
    assert main(argv) == 2
    assert not (tmp_path / "o").exists()
