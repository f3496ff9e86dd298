"""scikit-learn's ``load_digits`` (1,797 real 8x8 scans, 0..16) as an ImageFolder of PNGs, one folder per
digit: the second dataset of ``docs/int8.md``.

    python benchmarks/digits_folder.py digits/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="directory to write (one subfolder per digit)")
    args = ap.parse_args()
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = args.out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image * 255 / 16).round().astype(np.uint8)
        Image.fromarray(pixels, "L").convert("RGB").save(folder / f"{i:04d}.png")
    print(f"{len(digits.images)} images under {args.out}")


if __name__ == "__main__":
    main()
