"""Trust, round two (issue 25), the data folder: links inside a class are not followed, hidden
folders are not classes, one class is refused, image dimensions are checked before decoding."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from edgetl.data import folder
from edgetl.data.folder import build_datasets, load_image
from edgetl.data.limits import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE
from edgetl.errors import DataError


@pytest.fixture
def data(tmp_path, image_folder) -> Path:
    root = tmp_path / "data"
    shutil.copytree(image_folder, root)
    return root


def _labels(root: Path, **kw) -> Counter:
    sets = build_datasets(str(root), train_transform=None, eval_transform=None, val_fraction=0.25, log=lambda _: None, **kw)
    base = sets.train_eval.dataset.base  # the one scan both views share
    return Counter(sets.classes[t] for t in base.targets)


def _on_disk(root: Path) -> Counter:
    return Counter({c.name: len(list(c.glob("*.png"))) for c in root.iterdir() if c.is_dir()})


def test_a_link_inside_a_class_folder_is_not_followed(data):
    """`red/loop -> ..` would list every class again under red, and again, until the path is too long."""
    expected = _on_disk(data)
    (data / "red" / "loop").symlink_to("..", target_is_directory=True)
    (data / "green" / "elsewhere").symlink_to(data / "blue", target_is_directory=True)
    assert _labels(data) == expected


@pytest.mark.parametrize("target", [".", "..", "red"], ids=["the-root", "above-it", "another-class"])
def test_a_class_folder_linking_back_or_into_another_class_is_refused(data, target):
    (data / "zloop").symlink_to(target, target_is_directory=True)
    with pytest.raises(DataError, match=r"class folders? .*zloop.* (links back to the data folder|overlap)"):
        build_datasets(str(data), train_transform=None, eval_transform=None)


def test_a_link_to_an_image_file_is_an_image(data):
    expected = _on_disk(data)
    (data / "red" / "linked.png").symlink_to(data / "red" / "000.png")
    assert _labels(data) == expected + Counter({"red": 1})


def test_hidden_folders_are_not_classes(data):
    hidden = data / ".ipynb_checkpoints"
    hidden.mkdir()
    shutil.copy(data / "red" / "000.png", hidden / "000-checkpoint.png")
    sets = build_datasets(str(data), train_transform=None, eval_transform=None, log=lambda _: None)
    assert sets.classes == ["blue", "green", "red"]


def test_a_single_class_folder_is_refused(tmp_path, image_folder):
    root = tmp_path / "one"
    shutil.copytree(image_folder / "red", root / "red")
    with pytest.raises(DataError, match=r"has one class \(red\); a classifier needs two or more"):
        build_datasets(str(root), train_transform=None, eval_transform=None)


def test_an_image_too_wide_is_skipped_with_its_reason(data, tmp_path):
    """A 1 x 1,000,000 PNG is a few kilobytes; resized to the input size it would ask for gigabytes."""
    val = tmp_path / "val"
    shutil.copytree(data, val)
    wide = val / "red" / "wide.png"
    Image.new("L", (MAX_IMAGE_SIDE + 1, 1)).save(wide)
    lines: list[str] = []
    sets = build_datasets(str(data), train_transform=None, eval_transform=None, val_data=str(val), log=lines.append)
    assert str(wide) not in [path for path, _ in sets.val.base.samples]
    assert len(lines) == 1 and f"{wide} (DataError: image too large, not decoded: {MAX_IMAGE_SIDE + 1}x1 pixels" in lines[0], lines


@pytest.mark.parametrize("size", [(MAX_IMAGE_SIDE + 1, 1), (1, MAX_IMAGE_SIDE + 1), (8193, 8193), (1, MAX_ASPECT_RATIO + 1), (65, 1)])
def test_dimensions_are_checked_before_any_pixel_is_decoded(tmp_path, monkeypatch, size):
    path = tmp_path / "big.png"
    Image.new("1", size).save(path)  # 1 bit a pixel: small to write, 8193 x 8193 is 2**26 + 16385 pixels
    assert 8193 * 8193 > MAX_IMAGE_PIXELS

    def no_decoding(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(DataError, match=rf"image too large, not decoded: {size[0]}x{size[1]} pixels"):
        load_image(str(path))


@pytest.mark.parametrize("size", [(MAX_IMAGE_SIDE, MAX_IMAGE_SIDE // MAX_ASPECT_RATIO + 1), (MAX_ASPECT_RATIO, 1), (2, 2)])
def test_an_image_at_the_limits_is_read(tmp_path, size):
    path = tmp_path / "edge.png"
    Image.new("1", size).save(path)
    assert load_image(str(path)).size == size


def test_a_strip_one_pixel_high_is_refused_before_its_resize_grows_it(tmp_path):
    """1 x 65535 is within the side and pixel limits; resized for evaluation it would be 12 GiB."""
    path = tmp_path / "strip.png"
    Image.new("L", (MAX_IMAGE_SIDE, 1)).save(path)
    with pytest.raises(DataError, match=rf"{MAX_IMAGE_SIDE}x1 pixels: one side more than {MAX_ASPECT_RATIO} times the other"):
        load_image(str(path))


def test_the_scan_and_the_loader_are_one_listing(data):
    """The class-has-images check and the dataset list the same files (one listing function)."""
    (data / "red" / "loop").symlink_to("..", target_is_directory=True)
    listed = folder._files_under(str(data / "red"))
    assert sorted(listed) == sorted(str(p) for p in (data / "red").glob("*.png"))
