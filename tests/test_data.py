"""Datasets and weights loading: Fashion-MNIST idx files, ImageFolder trees (one scan per root,
unreadable images skipped, 16-bit grayscale), local state dicts."""

from __future__ import annotations

import gzip
import shutil
import struct
import urllib.error
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgetl import DataError, FashionMNIST, WeightsError, load_model, transforms_for
from edgetl.data import folder
from edgetl.data.fashion_mnist import CLASSES, DEBIAN_DIR, read_idx, write_image_folder
from edgetl.data.folder import build_datasets, load_image
from edgetl.models.zoo import MODELS, classifier_linear
from tests.conftest import CLASSES as FOLDER_CLASSES
from tests.conftest import make_image_folder, write_truncated_jpeg


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
    tree = ImageFolder(str(root))
    assert tree.classes == sorted(CLASSES)
    indices = sorted(int(Path(path).stem) for path, _ in tree.samples)
    assert indices == list(range(20))  # every written image, once
    for path, target in tree.samples:
        index = int(Path(path).stem)
        assert tree.classes[target] == CLASSES[int(ds.targets[index])]
        assert np.array_equal(np.asarray(Image.open(path)), ds.images[index].numpy())


@pytest.mark.skipif(not (DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").exists(), reason="Debian's dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_the_debian_package():
    test = FashionMNIST(split="test")
    assert len(test) == 10_000
    assert torch.bincount(test.targets).tolist() == [1000] * 10  # the real test split is balanced


def _final_linear_keys(model: torch.nn.Module) -> set[str]:
    linear = classifier_linear(model)[2]
    name = next(n for n, m in model.named_modules() if m is linear)
    return {f"{name}.weight", f"{name}.bias"}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_local_state_dict_loads_and_replaces_the_classifier(tmp_path, name):
    torch.manual_seed(0)
    source = load_model(name, num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = load_model(name, weights=tmp_path / "w.pth", num_classes=4)
    assert classifier_linear(model)[2].out_features == 4
    same = {k for k, v in model.state_dict().items() if k in source.state_dict() and torch.equal(v, source.state_dict()[k])}
    assert same == set(source.state_dict()) - _final_linear_keys(source)
    kept = load_model(name, weights=tmp_path / "w.pth", num_classes=1000)
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


# --- ImageFolder trees -----------------------------------------------------------------------


def _image_files(*roots: Path) -> list[str]:
    return sorted(str(p) for root in roots for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".tif"))


@pytest.fixture
def folder_copy(tmp_path, image_folder) -> Path:
    root = tmp_path / "data"
    shutil.copytree(image_folder, root)
    return root


def _tagged(tag: str):
    return lambda image: (tag, np.asarray(image))


def test_truncated_jpeg_is_skipped_with_one_log_line_naming_it(folder_copy, image_folder, capsys):
    broken = write_truncated_jpeg(folder_copy / "red" / "zz_truncated.jpg")
    with Image.open(broken) as im:
        im.verify()  # the header check alone accepts it ...
    with pytest.raises(OSError, match="truncated"), Image.open(broken) as im:
        im.convert("RGB")  # ... decoding its pixels fails
    lines: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warnings.warn: it echoes a source line and repeats per call
        data = build_datasets(str(folder_copy), train_transform=_tagged("train"), eval_transform=_tagged("eval"), log=lines.append)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"warning: skipping 1 unreadable image(s) in {folder_copy}: {broken} (")
    assert "truncated" in lines[0]
    assert capsys.readouterr() == ("", "")  # everything went through log
    # the other images all load, once each, with their labels
    items = [data.train[i] for i in range(len(data.train))] + [data.val[i] for i in range(len(data.val))]
    assert len(items) == len(_image_files(image_folder))
    assert Counter(FOLDER_CLASSES[t] for _, t in items) == Counter({c: len(list((image_folder / c).iterdir())) for c in FOLDER_CLASSES})
    assert all(image[1].shape == (24, 24, 3) for image, _ in items)


def test_unreadable_images_are_logged_to_stderr_by_default_once_per_folder(folder_copy, tmp_path, capsys):
    val_root = make_image_folder(tmp_path / "val", per_class=2, seed=3)
    broken = write_truncated_jpeg(folder_copy / "green" / "cut.jpg")
    garbage = val_root / "blue" / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    build_datasets(str(folder_copy), train_transform=None, eval_transform=None, val_data=str(val_root))
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert str(broken) in lines[0] and str(folder_copy) in lines[0] and str(garbage) not in lines[0]
    assert str(garbage) in lines[1] and str(val_root) in lines[1]


def test_class_left_without_readable_images_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=3)
    for f in (root / "green").iterdir():
        f.unlink()
    write_truncated_jpeg(root / "green" / "a.jpg")
    (root / "green" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines: list[str] = []
    with pytest.raises(DataError, match=rf"class\(es\) green in {root} have no readable image"):
        build_datasets(str(root), train_transform=None, eval_transform=None, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("warning: skipping 2 unreadable image(s)")


@pytest.mark.parametrize("separate_val", [False, True], ids=["held-out", "val-folder"])
def test_each_root_is_scanned_once_and_each_image_decoded_once(folder_copy, tmp_path, monkeypatch, separate_val):
    (folder_copy / "red" / "notes.txt").write_text("not an image: never decoded")
    val_root = make_image_folder(tmp_path / "val", per_class=2, seed=3) if separate_val else None
    built: list[str] = []
    decoded: list[str] = []

    class CountingImageFolder(folder.ImageTree):
        def __init__(self, root, *args, **kwargs):
            built.append(str(root))
            super().__init__(root, *args, **kwargs)

    real_load = folder.load_image

    def counting_load(path):
        decoded.append(path)
        return real_load(path)

    monkeypatch.setattr(folder, "ImageTree", CountingImageFolder)
    monkeypatch.setattr(folder, "load_image", counting_load)
    data = build_datasets(
        str(folder_copy),
        train_transform=_tagged("train"),
        eval_transform=_tagged("eval"),
        val_data=str(val_root) if val_root else None,
        val_fraction=0.25,
    )
    roots = [folder_copy] + ([val_root] if val_root else [])
    assert built == [str(r) for r in roots]
    assert sorted(decoded) == _image_files(*roots)  # the up-front check: one full decode per image
    decoded.clear()
    # the training and evaluation views share the scan but apply their own transforms to the same images
    assert len(data.train) == len(data.train_eval)
    for i in range(len(data.train)):
        (tag, image), target = data.train[i]
        (eval_tag, eval_image), eval_target = data.train_eval[i]
        assert (tag, eval_tag, target) == ("train", "eval", eval_target)
        assert np.array_equal(image, eval_image)
    assert all(data.val[i][0][0] == "eval" for i in range(len(data.val)))
    assert len(decoded) == 2 * len(data.train) + len(data.val)  # then one decode per item read
    expected_val = len(_image_files(val_root)) if val_root else round(0.25 * len(_image_files(folder_copy)))
    assert len(data.val) == expected_val


def _write_16_bit(path: Path, values: np.ndarray) -> str:
    """Save uint16 ``values`` in the PIL mode the suffix gives: PNG -> I;16, .tif -> I;16B or I (int32)."""
    if path.suffix == ".png":
        Image.fromarray(values.astype(np.uint16)).save(path)
    elif path.stem.endswith("int32"):
        Image.fromarray(values.astype(np.int32)).save(path)
    else:
        image = Image.new("I;16B", (values.shape[1], values.shape[0]))
        image.frombytes(values.astype(">u2").tobytes())
        image.save(path)
    with Image.open(path) as im:
        return im.mode


@pytest.mark.parametrize("file,mode", [("g.png", "I;16"), ("g.tif", "I;16B"), ("g_int32.tif", "I")])
def test_16_bit_grayscale_is_scaled_to_8_bits(tmp_path, file, mode):
    values = np.random.default_rng(0).integers(0, 40_000, size=(20, 30)).astype(np.uint16)
    values[0, :5] = [0, 255, 256, 40_000, 65535]
    assert _write_16_bit(tmp_path / file, values) == mode
    image = load_image(str(tmp_path / file))
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    expected = (values >> 8).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(pixels[..., c], expected)
    assert pixels[0, :5, 0].tolist() == [0, 0, 1, 156, 255]


def test_16_bit_grayscale_reaches_training_and_evaluation_scaled(tmp_path):
    rng = np.random.default_rng(1)
    expected = {}
    for k, name in enumerate(("dark", "mid")):
        values = rng.integers(0, 20_000 * (k + 1), size=(16, 16)).astype(np.uint16)
        expected[k] = (values >> 8).astype(np.uint8)
        (tmp_path / "d" / name).mkdir(parents=True)
        for i in range(3):
            _write_16_bit(tmp_path / "d" / name / f"{i}.png", values)
    transform = transforms_for("mobilenet_v2", image_size=16, train=False)
    data = build_datasets(str(tmp_path / "d"), train_transform=transform, eval_transform=transform, val_fraction=0.34)
    assert data.classes == ["dark", "mid"]
    items = [data.train[i] for i in range(len(data.train))] + [data.val[i] for i in range(len(data.val))]
    assert len(items) == 6
    for x, target in items:
        reference = transform(Image.fromarray(expected[target]).convert("RGB"))
        torch.testing.assert_close(x, reference, rtol=0, atol=0)


def test_fashion_mnist_training_split_is_read_once_for_both_views(tiny_fashion, monkeypatch):
    import edgetl.data.fashion_mnist as fm

    read: list[str] = []
    real = fm.read_idx
    monkeypatch.setattr(fm, "read_idx", lambda path: read.append(Path(path).name) or real(path))
    monkeypatch.setenv("EDGETL_FASHION_MNIST", str(tiny_fashion))
    data = build_datasets("fashion-mnist", train_transform=_tagged("train"), eval_transform=_tagged("eval"), train_limit=12)
    assert sorted(read) == sorted(f"{s}-{k}-idx{n}-ubyte.gz" for s in ("train", "t10k") for k, n in (("images", 3), ("labels", 1)))
    assert data.classes == list(CLASSES) and (len(data.train), len(data.train_eval), len(data.val)) == (12, 12, 10)
    for i in range(12):
        (tag, image), target = data.train[i]
        (eval_tag, eval_image), eval_target = data.train_eval[i]
        assert (tag, eval_tag, target) == ("train", "eval", eval_target)
        assert np.array_equal(image, eval_image)
    assert data.val[3][0][0] == "eval" and data.val[3][1] == 3


def test_many_unreadable_images_are_one_line_naming_the_first_ten(folder_copy):
    bad = [folder_copy / "blue" / f"bad{i:02d}.png" for i in range(12)]
    for path in bad:
        path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines: list[str] = []
    data = build_datasets(str(folder_copy), train_transform=None, eval_transform=None, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith(f"warning: skipping 12 unreadable image(s) in {folder_copy}: ")
    assert [str(p) in lines[0] for p in bad] == [True] * 10 + [False] * 2
    assert lines[0].endswith(" and 2 more")
    assert len(data.train) + len(data.val) == len(_image_files(folder_copy)) - len(bad)
