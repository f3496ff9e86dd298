"""Compare the native preprocessing (deploy/native/src/image_decode.cpp, image_resize.cpp) with the Python reference.

Given the ``edgetl-preprocess`` tool that ``deploy/native/build.sh`` builds, generates test images
of many sizes and pixel formats with PIL (plus hand-written PNGs for formats PIL cannot write:
16-bit RGB/RGBA/LA, 2/4-bit grey and palette, tRNS, Adam7 interlace), and checks that

    edgetl-preprocess IMAGE SIZE SHORT INTERP mean std OUT.bin

equals, to max abs diff <= 1e-6, the eval transform applied the way the Python loaders do it:
``transform(load_image(path))`` (edgetl.data.folder's loader: ``Image.open(path).convert("RGB")`` as
torchvision's, except 16-bit grey, which it scales to 8 bits by ``value >> 8`` first).
Where ``transform(Image.open(path))`` works too (RGB and greyscale files) it is checked as well.
Corrupt inputs (half a JPEG/PNG, a text file, an empty file, a GIF, a missing file) must exit 1 with one error line on stderr.

Run by tests/test_native.py; by hand:
    .venv/bin/python tests/native_preprocess_compare.py --binary deploy/native/build/edgetl-preprocess
Exit status 0 when every case passes.
"""

from __future__ import annotations

import argparse
import io
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

# isort: off
import edgetl  # must precede torchvision: see edgetl/_torchvision_compat.py

# isort: on
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from edgetl.data.folder import load_image

TOL = 1e-6


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def make_transform(spec):
    if spec["model"] is not None:
        return edgetl.transforms_for(spec["model"], image_size=spec["size"], train=False)
    mode = v2.InterpolationMode.BICUBIC if spec["interp"] == "bicubic" else v2.InterpolationMode.BILINEAR
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RGB(),
            v2.Resize(spec["short"], interpolation=mode, antialias=True),
            v2.CenterCrop(spec["size"]),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(spec["mean"]), list(spec["std"])),
        ]
    )


def spec_from_model(model, size):
    from edgetl.models.zoo import model_spec

    s = model_spec(model)
    interp = "bicubic" if s.interpolation == v2.InterpolationMode.BICUBIC else "bilinear"
    return {
        "name": f"{model}@{size}",
        "model": model,
        "size": size,
        "short": round(size / s.crop_ratio),
        "interp": interp,
        "mean": tuple(s.mean),
        "std": tuple(s.std),
    }


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def custom_spec(size, short, interp, mean_std=IMAGENET):
    return {
        "name": f"{interp}:{size}/{short}",
        "model": None,
        "size": size,
        "short": short,
        "interp": interp,
        "mean": mean_std[0],
        "std": mean_std[1],
    }


SPECS = [
    spec_from_model("mobilenet_v2", 224),
    spec_from_model("efficientnet_lite0", 224),
    custom_spec(160, 183, "bilinear"),
    custom_spec(97, 111, "bicubic", ((0.5, 0.25, 0.125), (0.3, 0.2, 0.1))),
    custom_spec(224, 200, "bilinear"),  # crop larger than the resized image: zero padding
    custom_spec(225, 225, "bicubic"),
]


# ---------------------------------------------------------------------------------------------
# Test images
# ---------------------------------------------------------------------------------------------


def natural(h, w, seed):
    """Smooth gradients + edges + noise: exercises rounding everywhere, compresses like a photo."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack(
        [
            128 + 100 * np.sin(xx / (3 + seed % 7) + yy / 13.0),
            128 + 100 * np.cos(yy / (5 + seed % 5)) * np.sin(xx / 17.0),
            255.0 * ((xx // 9 + yy // 7) % 2),
        ],
        axis=-1,
    )
    return (base + rng.normal(0, 18, (h, w, 3))).clip(0, 255).astype(np.uint8)


def png_bytes(w, h, depth, ctype, rows, palette=None, trns=None, interlace=False):
    """A minimal PNG encoder (filter 0) for formats PIL does not write. rows: packed scanlines."""

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[ctype]
    bits_pp = channels * depth

    def pack(row_samples):  # list of sample values -> bytes
        if depth == 8:
            return bytes(row_samples)
        if depth == 16:
            return b"".join(struct.pack(">H", v) for v in row_samples)
        out, acc, n = bytearray(), 0, 0
        for v in row_samples:
            acc = (acc << depth) | v
            n += depth
            if n == 8:
                out.append(acc)
                acc, n = 0, 0
        if n:
            out.append(acc << (8 - n))
        return bytes(out)

    if not interlace:
        raw = b"".join(b"\x00" + pack(r) for r in rows)
    else:  # Adam7
        raw = b""
        for x0, y0, dx, dy in [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]:
            if x0 >= w or y0 >= h:
                continue
            for y in range(y0, h, dy):
                samples = []
                for x in range(x0, w, dx):
                    samples.extend(rows[y][x * channels : (x + 1) * channels])
                raw += b"\x00" + pack(samples)
    del bits_pp
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, int(interlace)))
    if palette is not None:
        data += chunk(b"PLTE", bytes(palette))
    if trns is not None:
        data += chunk(b"tRNS", trns)
    return data + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def make_images(d: Path):
    """Yields (name, path, python_open_ok) for every test image."""
    cases = []
    sizes = [
        (375, 500),
        (500, 375),
        (256, 256),
        (224, 224),
        (183, 160),
        (80, 100),
        (53, 37),
        (1, 1),
        (2, 3),
        (257, 255),
        (767, 1023),
        (224, 300),
        (256, 300),
        (300, 256),
        (20, 600),
        (600, 20),
        (1080, 1920),
        (2448, 3264),
    ]
    rng = np.random.default_rng(11)
    extra = {
        "noise_289x311": rng.integers(0, 256, (289, 311, 3), dtype=np.uint8),  # bicubic overshoot/clamping
        "checker_130x97": (((np.indices((130, 97)).sum(0) % 2) * 255).astype(np.uint8)[..., None]).repeat(3, 2),
    }
    for name, a in extra.items():
        Image.fromarray(a).save(d / f"{name}.png")
        cases.append((f"{name}.png", d / f"{name}.png", True))
    for i, (h, w) in enumerate(sizes):
        a = natural(h, w, i)
        im = Image.fromarray(a)
        for q, sub in [(75, 2), (95, 0)]:
            p = d / f"rgb_{h}x{w}_q{q}.jpg"
            im.save(p, quality=q, subsampling=sub)
            cases.append((p.name, p, True))
        p = d / f"rgb_{h}x{w}.png"
        im.save(p)
        cases.append((p.name, p, True))

    a = natural(333, 451, 99)
    im = Image.fromarray(a)
    jpeg_variants = {
        "jpeg_422.jpg": dict(quality=85, subsampling=1),
        "jpeg_420_q50.jpg": dict(quality=50, subsampling=2),
        "jpeg_progressive.jpg": dict(quality=90, progressive=True),
        "jpeg_optimize.jpg": dict(quality=80, optimize=True),
        "jpeg_q100.jpg": dict(quality=100, subsampling=0),
        "jpeg_restart.jpg": dict(quality=85, restart_marker_rows=1),
    }
    for name, kw in jpeg_variants.items():
        try:
            im.save(d / name, **kw)
        except (TypeError, ValueError):
            kw.pop("restart_marker_rows", None)
            im.save(d / name, **kw)
        cases.append((name, d / name, True))
    im.convert("L").save(d / "grey.jpg", quality=90)
    cases.append(("grey.jpg", d / "grey.jpg", True))
    im.convert("L").resize((123, 457)).save(d / "grey_portrait.jpg", quality=75)
    cases.append(("grey_portrait.jpg", d / "grey_portrait.jpg", True))
    im.convert("CMYK").save(d / "cmyk.jpg", quality=90)
    cases.append(("cmyk.jpg", d / "cmyk.jpg", False))

    # PNG modes written by PIL
    for mode in ["L", "RGBA", "LA", "1", "I;16"]:
        src = im if mode != "RGBA" else Image.fromarray(np.dstack([a, natural(333, 451, 7)[..., 0]]), "RGBA")
        if mode == "LA":
            src = Image.fromarray(np.dstack([a[..., 0], a[..., 1]]), "LA")
        conv = src.convert(mode) if mode not in ("I;16",) else None
        if mode == "I;16":
            g16 = (np.asarray(im.convert("L")).astype(np.uint16) * 3 + 7) % 700  # straddles the 255 clip
            conv = Image.fromarray(g16)
        name = f"mode_{mode.replace(';', '')}.png"
        conv.save(d / name)
        cases.append((name, d / name, mode == "L"))  # "1": ToImage gives a bool tensor
    # 16-bit grey over the whole range (a scanner's or a medical image's): the loader scales it by >> 8
    g16 = (np.asarray(im.convert("L")).astype(np.uint32) * 257 + np.arange(451, dtype=np.uint32)[None, :] * 3) % 65536
    Image.fromarray(g16.astype(np.uint16)).save(d / "mode_I16_full.png")
    cases.append(("mode_I16_full.png", d / "mode_I16_full.png", False))
    im.quantize(colors=256).save(d / "palette256.png")
    cases.append(("palette256.png", d / "palette256.png", False))
    im.quantize(colors=16).save(d / "palette16.png", bits=4)
    cases.append(("palette16.png", d / "palette16.png", False))

    # Hand-written PNGs
    h, w = 61, 83
    rng = np.random.default_rng(5)
    rgb16 = rng.integers(0, 65536, (h, w, 3))
    rgba16 = rng.integers(0, 65536, (h, w, 4))
    la16 = rng.integers(0, 65536, (h, w, 2))
    grey16 = rng.integers(0, 600, (h, w))
    hand = {
        "png16_rgb.png": (16, 2, [list(r.ravel()) for r in rgb16], {}),
        "png16_rgba.png": (16, 6, [list(r.ravel()) for r in rgba16], {}),
        "png16_la.png": (16, 4, [list(r.ravel()) for r in la16], {}),
        "png16_grey.png": (16, 0, [list(r) for r in grey16], {}),
        "png2_grey.png": (2, 0, [list(r) for r in rng.integers(0, 4, (h, w))], {}),
        "png4_grey.png": (4, 0, [list(r) for r in rng.integers(0, 16, (h, w))], {}),
        "png8_grey_trns.png": (8, 0, [list(r) for r in rng.integers(0, 256, (h, w))], {"trns": b"\x00\x10"}),
        "png8_rgb_trns.png": (8, 2, [list(r.ravel()) for r in rng.integers(0, 256, (h, w, 3))], {"trns": b"\x00\x10\x00\x20\x00\x30"}),
        "png2_palette_trns.png": (
            2,
            3,
            [list(r) for r in rng.integers(0, 4, (h, w))],
            {"palette": list(rng.integers(0, 256, 12)), "trns": b"\x00\x80"},
        ),
        "png8_palette_trns.png": (
            8,
            3,
            [list(r) for r in rng.integers(0, 200, (h, w))],
            {"palette": list(rng.integers(0, 256, 600)), "trns": bytes(range(0, 200, 2))},
        ),
        "png_interlaced_rgb.png": (8, 2, [list(r.ravel()) for r in natural(h, w, 3)], {"interlace": True}),
        "png_interlaced_grey16.png": (16, 0, [list(r) for r in grey16], {"interlace": True}),
    }
    for name, (depth, ctype, rows, kw) in hand.items():
        (d / name).write_bytes(png_bytes(w, h, depth, ctype, rows, **kw))
        cases.append((name, d / name, ctype in (0, 2) and depth == 8))
    return cases


def make_bad_files(d: Path):
    good_jpg = d / "rgb_375x500_q75.jpg"
    good_png = d / "rgb_375x500.png"
    out = []
    for src, name in [(good_jpg, "half.jpg"), (good_png, "half.png")]:
        data = src.read_bytes()
        (d / name).write_bytes(data[: len(data) // 2])
        out.append((name, d / name))
    data = good_jpg.read_bytes()
    (d / "header_only.jpg").write_bytes(data[:200])
    out.append(("header_only.jpg", d / "header_only.jpg"))
    (d / "not_an_image.jpg").write_text("this is a text file, not a picture\n")
    out.append(("not_an_image.jpg", d / "not_an_image.jpg"))
    (d / "empty.png").write_bytes(b"")
    out.append(("empty.png", d / "empty.png"))
    buf = io.BytesIO()
    Image.fromarray(natural(20, 20, 1)).save(buf, "GIF")
    (d / "anim.gif").write_bytes(buf.getvalue())
    out.append(("anim.gif", d / "anim.gif"))
    png = bytearray(good_png.read_bytes())
    png[len(png) // 2] ^= 0xFF  # damaged IDAT: CRC mismatch
    (d / "crc.png").write_bytes(bytes(png))
    out.append(("crc.png", d / "crc.png"))
    out.append(("missing.jpg", d / "does_not_exist.jpg"))
    return out


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def run_native(binary, path, spec, out_path):
    args = [
        binary,
        str(path),
        str(spec["size"]),
        str(spec["short"]),
        spec["interp"],
        *[repr(float(v)) for v in spec["mean"]],
        *[repr(float(v)) for v in spec["std"]],
        str(out_path),
    ]
    return subprocess.run(args, capture_output=True, text=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", required=True, help="the edgetl-preprocess tool built by deploy/native/build.sh")
    ap.add_argument("--keep", help="write the test images to this folder (kept)")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    work = Path(args.keep) if args.keep else Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    binary = args.binary

    transforms = [(spec, make_transform(spec)) for spec in SPECS]
    images = make_images(work)
    failures = 0
    worst = 0.0
    out_bin = Path(tmp.name) / "out.bin"
    print("columns: max abs diff per transform; 'decode' = identity transform (short side unchanged, crop =")
    print("long side, mean 0, std 1), i.e. the decoded pixels themselves against Pillow's convert('RGB')")
    print(f"{'image':34s} {'WxH':>10s} {'PIL mode':8s} {'decode':>8s} " + " ".join(f"{s['name']:>22s}" for s in SPECS))
    for name, path, open_ok in images:
        with Image.open(path) as im:
            size = f"{im.width}x{im.height}"
            mode = im.mode
            raw = im.copy() if open_ok else None
        rgb = load_image(str(path))  # what the Python loaders feed the model (16-bit grey scaled by >> 8)
        w, h = rgb.size
        identity = custom_spec(max(w, h), min(w, h), "bilinear", ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
        diffs = []
        for spec, t in [(identity, make_transform(identity)), *transforms]:
            ref = t(rgb).numpy()
            proc = run_native(binary, path, spec, out_bin)
            if proc.returncode != 0:
                diffs.append(float("inf"))
                print(f"  {name}: native failed: {proc.stderr.strip()}")
                continue
            got = np.fromfile(out_bin, dtype=np.float32).reshape(ref.shape)
            diff = float(np.abs(got - ref).max())
            if raw is not None:  # the transform straight on the opened image must agree as well
                diff = max(diff, float(np.abs(got - t(raw).numpy()).max()))
            diffs.append(diff)
        worst = max([worst, *diffs])
        bad = [x for x in diffs if not x <= TOL]
        failures += bool(bad)
        print(f"{name:34s} {size:>10s} {mode:8s} {diffs[0]:8.3g} " + " ".join(f"{x:22.3g}" for x in diffs[1:]) + ("  FAIL" if bad else ""))

    print("\nerror cases (must exit 1 with one line on stderr):")
    for name, path in make_bad_files(work):
        proc = run_native(binary, path, SPECS[0], out_bin)
        lines = proc.stderr.strip().splitlines()
        ok = proc.returncode == 1 and len(lines) == 1
        failures += not ok
        print(f"  {name:18s} exit {proc.returncode}  {proc.stderr.strip()!r}" + ("" if ok else "  FAIL"))

    print(f"\nworst max abs diff: {worst:.3g} (tolerance {TOL}); {failures} failing case(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
