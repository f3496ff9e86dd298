"""Datasets and weights loading: Fashion-MNIST idx files, ImageFolder export, local state dicts."""

from __future__ import annotations

import gzip
import struct
import urllib.error

import numpy as np
import pytest
import torch

from edgetl import DataError, FashionMNIST, WeightsError, load_model, transforms_for
from edgetl.data.fashion_mnist import CLASSES, DEBIAN_DIR, read_idx, write_image_folder


def _write_idx(path, array: np.ndarray, gz: bool = True, truncate: int = 0) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    raw = raw[: len(raw) - truncate]
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.fixture
def tiny_fashion(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 10)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_fashion_mnist_reads_idx_and_feeds_the_model_pipeline(tiny_fashion):
    ds = FashionMNIST(tiny_fashion, split="train", transform=transforms_for("mobilenet_v2", image_size=40, train=False))
    assert len(ds) == 30 and ds.classes == list(CLASSES)
    x, y = ds[13]
    assert x.shape == (3, 40, 40) and x.dtype == torch.float32 and y == 3
    raw = FashionMNIST(tiny_fashion, split="test")[0][0]
    assert raw.shape == (1, 28, 28) and raw.dtype == torch.uint8


def test_truncated_and_bad_idx_files_fail_clearly(tmp_path):
    _write_idx(tmp_path / "a.gz", np.zeros((4, 28, 28)), truncate=5)
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(tmp_path / "a.gz")
    (tmp_path / "b").write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 20)  # float idx: not ours
    with pytest.raises(DataError, match="not an unsigned-byte idx"):
        read_idx(tmp_path / "b")
    (tmp_path / "c.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read idx"):
        read_idx(tmp_path / "c.gz")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(tmp_path / "nowhere")


def test_fashion_mnist_written_as_image_folder_round_trips(tiny_fashion, tmp_path):
    from torchvision.datasets import ImageFolder

    ds = FashionMNIST(tiny_fashion, split="train")
    root = write_image_folder(ds, tmp_path / "folder", indices=range(20))
    folder = ImageFolder(str(root))
    assert folder.classes == sorted(CLASSES)
    path, target = folder.samples[0]
    index = int(path.rsplit("/", 1)[1].split(".")[0])
    assert folder.classes[target] == CLASSES[int(ds.targets[index])]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(path)), ds.images[index].numpy())


@pytest.mark.skipif(not (DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").exists(), reason="Debian's dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_the_debian_package():
    test = FashionMNIST(split="test")
    assert len(test) == 10_000
    assert torch.bincount(test.targets).tolist() == [1000] * 10  # the real test split is balanced


def test_local_state_dict_loads_and_replaces_the_classifier(tmp_path):
    torch.manual_seed(0)
    source = load_model("mobilenet_v3_small", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = load_model("mobilenet_v3_small", weights=tmp_path / "w.pth", num_classes=4)
    assert model.classifier[-1].out_features == 4
    same = {k for k, v in model.state_dict().items() if k in source.state_dict() and torch.equal(v, source.state_dict()[k])}
    assert same == set(source.state_dict()) - {"classifier.3.weight", "classifier.3.bias"}
    kept = load_model("mobilenet_v3_small", weights=tmp_path / "w.pth", num_classes=1000)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(kept.eval()(x), source.eval()(x))


def test_weights_that_do_not_fit_are_refused(tmp_path):
    torch.save(load_model("mobilenet_v2", num_classes=10).state_dict(), tmp_path / "v2.pt")
    with pytest.raises(WeightsError, match="do not fit mobilenet_v3_small"):
        load_model("mobilenet_v3_small", weights=tmp_path / "v2.pt", num_classes=10)


def test_pickled_objects_are_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="cannot read weights"):
        load_model("mobilenet_v2", weights=tmp_path / "evil.pt", num_classes=2)


def test_default_weights_without_network_give_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache: torchvision must download

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    import torchvision.models._api as api

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)  # what WeightsEnum.get_state_dict calls
    with pytest.raises(WeightsError, match="URLError.*local state-dict file"):
        load_model("mobilenet_v2", weights="DEFAULT", num_classes=3)
