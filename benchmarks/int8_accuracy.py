"""int8 post-training quantization options on fine-tuned models, side by side (a benchmark, not a test).

    python benchmarks/int8_accuracy.py --run runs/demo [--run runs/digits ...] [--qat-epochs 1] [--threads 1] [--work /tmp/edgetl-int8-acc]
    python benchmarks/int8_accuracy.py --bundles dist/demo dist/demo-int8 [--threads 1]

``--bundles``: the ``model.pte`` of exported bundles side by side, nothing else: size, classify
latency (batch 1, median of 50 after 5 warm-up runs, the bundles alternating round by round in one
process) and the accuracy the export recorded (``quantization.checks``).

For each run directory (a finished ``edgetl finetune``): its float32 accuracy on its validation
images, then each quantization option as the PT2E int8 graph in eager PyTorch (what the export
checks before lowering): the quantizer's own ReLU6 handling (the clamp shares its convolution's
pre-clamp range) against ReLU6 on its own range, the three activation observers, 25 / 100 / 500
calibration images (a seeded subset of the run's training images). Then the per-layer sensitivity
on the first 200 validation images and the mixed-precision choice at the 1-point limit. Last, the
float32, pure int8, (if any layer stays float32) mixed and (with ``--qat-epochs``) the
quantization-aware fine-tuned programs (:mod:`edgetl.exporter.qat`, on all the run's training
images, ``ExportConfig.qat_lr``) lowered to XNNPACK: size on
disk, classify latency (batch 1, ``--threads`` threads, median of 50 after 5 warm-up runs, one
process) and accuracy through ExecuTorch.

Printed per run: accuracy, drop against float32 (points), top-1 agreement, logits SQNR (dB).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from edgetl.exporter import _executorch as et
from edgetl.exporter import calibration as cal
from edgetl.exporter import inference, qat, quantize, sensitivity
from edgetl.exporter.config import ExportConfig
from edgetl.exporter.weights import load_weights
from edgetl.train.run import read_weights

MAX_DROP = 1.0


def _row(name: str, logits: np.ndarray, fp32: np.ndarray, y: np.ndarray) -> str:
    acc = 100.0 * float((logits.argmax(1) == y).mean())
    base = 100.0 * float((fp32.argmax(1) == y).mean())
    agree = 100.0 * float((logits.argmax(1) == fp32.argmax(1)).mean())
    return f"  {name:<44} {acc:7.2f}% {acc - base:+6.2f} {agree:7.2f}% {sensitivity.sqnr_db(logits, fp32):6.1f}"


def _latency_ms(pte: Path, x: torch.Tensor) -> float:
    program = et.Program(pte)
    for _ in range(5):
        program.run("forward", x.numpy())
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        program.run("forward", x.numpy())
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def bench(run: Path, work: Path, qat_epochs: int) -> None:
    trained = read_weights(run)
    model = load_weights(trained.model_name, trained.state_dict, trained.num_classes, source=trained.source).eval()
    size = trained.config.image_size
    calib = {
        n: cal.from_run(trained.config, model=trained.model_name, image_size=size, count=n, seed=0, log=lambda _: None)
        for n in (25, 100, 500)
    }
    validation = calib[100][1]
    images, y = validation.images, validation.labels.numpy()
    fp32 = quantize.eager_outputs(model, images)
    print(f"\n{run}: {trained.model_name}, {size} px, {len(images)} validation images", flush=True)
    print(f"  {'option (PT2E graph, eager)':<44} {'accuracy':>8} {'delta':>6} {'agreement':>8} {'SQNR':>6}")
    print(_row("float32", fp32, fp32, y), flush=True)
    options = [
        ("quantizer's ReLU6 (shares conv range), minmax", 100, {"fuse_clamps": False}),
        ("quantizer's ReLU6, histogram", 100, {"fuse_clamps": False, "observer": "histogram"}),
        ("ReLU6 own range, minmax", 100, {}),
        ("ReLU6 own range, moving_average", 100, {"observer": "moving_average"}),
        ("ReLU6 own range, histogram", 100, {"observer": "histogram"}),
        ("ReLU6 own range, minmax, 25 images", 25, {}),
        ("ReLU6 own range, minmax, 500 images", 500, {}),
    ]
    for name, n, kw in options:
        t0 = time.perf_counter()
        out = sensitivity.int8_outputs(model, calib[n][0].images, images, **kw)
        print(_row(name, out, fp32, y) + f"   ({time.perf_counter() - t0:.0f}s)", flush=True)

    calibration = calib[100][0].images
    t0 = time.perf_counter()
    report = sensitivity.measure(model, calibration, images[:200], validation.labels[:200], fp32[:200], log=lambda _: None)
    print(f"  sensitivity of {len(report.layers)} layers on 200 images in {time.perf_counter() - t0:.0f}s; costliest:")
    print("\n".join("    " + line for line in report.table(5).splitlines()))
    report.write(work / f"{run.name}-sensitivity.json")
    floatable = set(et.quantizable_layers(model, images[:1], floatable=True))
    ranking = [layer for layer in report.ranking() if layer in floatable]
    drop = sensitivity.int8_drop(model, calibration, images, validation.labels, fp32)
    mixed = sensitivity.choose_float_layers(drop, ranking, MAX_DROP, log=lambda _: None)
    if mixed is None:
        print(f"  mixed precision: no set of float32 layers brings the drop within {MAX_DROP} point")
    else:
        kept = len(mixed.float_layers)
        print(f"  mixed precision: {kept} layer(s) float32 -> drop {mixed.accuracy_drop:+.2f} {mixed.float_layers}")
        print(f"    (float32 layers, drop) tried: {mixed.tried}")

    qat_graph = None
    if qat_epochs:
        train = cal.from_run(trained.config, model=trained.model_name, image_size=size, count=10**9, seed=0, log=lambda _: None)[0]
        t0 = time.perf_counter()
        qat_graph = qat.finetune_int8(model, train.images, epochs=qat_epochs, lr=ExportConfig.qat_lr, seed=0, log=lambda _: None)
        name = f"QAT, {qat_epochs} epoch(s) on {len(train)} images"
        print(_row(name, quantize.graph_outputs(qat_graph, images, 1), fp32, y) + f"   ({time.perf_counter() - t0:.0f}s)", flush=True)

    x1 = images[:1]
    variants = [("float32", model), ("int8 (minmax, 100 images)", quantize.int8_graph(model, x1, calibration))]
    if mixed is not None and mixed.float_layers:
        variants.append(
            (
                f"int8, {len(mixed.float_layers)} layer(s) float32",
                quantize.int8_graph(model, x1, calibration, float_layers=mixed.float_layers),
            )
        )
    if qat_graph is not None:
        variants.append((f"int8 QAT, {qat_epochs} epoch(s)", qat_graph))
    print(f"  {'program (XNNPACK, batch 1)':<44} {'bytes':>9} {'ms':>7} {'accuracy':>8}")
    sizes = {}
    for name, module in variants:
        res = inference.export_inference(module, x1)
        pte = work / f"{run.name}-{len(sizes)}.pte"
        pte.write_bytes(res.program.buffer)
        ms = _latency_ms(pte, x1)
        acc = 100.0 * float((quantize.program_outputs(pte, images, 1).argmax(1) == y).mean())
        sizes[name] = (pte.stat().st_size, ms)
        f32 = sizes["float32"]
        print(
            f"  {name:<44} {sizes[name][0]:9d} {ms:7.2f} {acc:7.2f}%   size x{sizes[name][0] / f32[0]:.2f}, speed x{f32[1] / ms:.2f}",
            flush=True,
        )


def time_bundles(bundles: list[Path]) -> None:
    import json

    programs, x = {}, None
    for b in bundles:
        m = json.loads((b / "manifest.json").read_text())
        size = m["input"]["image_size"]
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        programs[b] = (et.Program(b / "model.pte"), x, m)
    times: dict[Path, list[float]] = {b: [] for b in bundles}
    for p, x, _ in programs.values():
        for _ in range(5):
            p.run("forward", x.numpy())
    for _ in range(50):
        for b, (p, x, _) in programs.items():
            t0 = time.perf_counter()
            p.run("forward", x.numpy())
            times[b].append((time.perf_counter() - t0) * 1000)
    print(f"{'bundle':<28} {'model.pte bytes':>15} {'ms':>7}  accuracy (export check)")
    for b, (_, _, m) in programs.items():
        q = m.get("quantization")
        acc = "float32" if q is None else "; ".join(f"{c['int8_accuracy']:.2f}% vs {c['fp32_accuracy']:.2f}%" for c in q["checks"])
        floats = f", {len(q['float_layers'])} layer(s) float32" if q and q.get("float_layers") else ""
        print(f"{b.name:<28} {(b / 'model.pte').stat().st_size:15d} {statistics.median(times[b]):7.2f}  {acc}{floats}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", help="a finished run directory (repeat for several)")
    ap.add_argument("--bundles", nargs="+", type=Path, help="time these bundles' model.pte side by side instead")
    ap.add_argument("--qat-epochs", type=int, default=0, help="also quantization-aware fine-tune this many epochs (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="threads of torch and ExecuTorch (default: %(default)s)")
    ap.add_argument("--work", default="/tmp/edgetl-int8-acc", help="where programs and reports go (default: %(default)s)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    et.set_threads(args.threads)
    if args.bundles:
        time_bundles(args.bundles)
        return
    if not args.run:
        ap.error("--run or --bundles is required")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for run in args.run:
        bench(Path(run), work, args.qat_epochs)


if __name__ == "__main__":
    main()
