"""On-device fine-tuning on an int8 frozen bottom against a float32 one (a benchmark, not a test).

    python benchmarks/int8_bottom.py [--run runs/demo-...] [--seeds 3] [--threads 2] [--observer minmax] [--work /tmp/edgetl-int8]

The demo setting: the demo's fine-tuned run (EfficientNet-Lite0 from ImageNet, MobileTL K=4 on
Fashion-MNIST, 96 px; default: the newest ``runs/demo-*``), exported twice with ``--training
--batch-size 8`` — float32, and ``--quantize int8`` (``model.pte`` and ``bottom.pte`` int8, the
training program float32; ``--max-accuracy-drop 100`` so the benchmark measures rather than
refuses; ``--observer`` as the export's). Then, per seed and alternating the two bundles, the native device runner
(``deploy/native/build/edgetl-device``, fresh process each time) fine-tunes one epoch on the
demo's 240 device photos (Fashion-MNIST test images 9000-9239) with ``--seed``, and classifies
1,000 other test images (8000-8999) with the trained weights. Reported: test accuracy after
fine-tuning (mean ± std over seeds), the process's peak RSS (its own VmHWM), the time to compute
the bottom's features of the 240 photos, the epoch's training time, and the accuracy of
``model.pte`` before fine-tuning; int8 / float32 ratios from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EDGETL = [sys.executable, "-m", "edgetl"]
RUNNER = ROOT / "deploy" / "native" / "build" / "edgetl-device"
MiB = 2**20


def run(cmd: list[str]) -> tuple[float, str, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0, r.stdout, r.stderr


def export(run_dir: Path, out: Path, int8: bool, observer: str) -> Path:
    if not (out / "manifest.json").is_file():
        print(f"exporting {'int8' if int8 else 'float32'} bundle -> {out} ...", flush=True)
        cmd = [*EDGETL, "export", "--checkpoint", str(run_dir), "--out", str(out), "--training", "--batch-size", "8"]
        if int8:
            cmd += ["--quantize", "int8", "--max-accuracy-drop", "100", "--observer", observer]
        seconds, stdout, _ = run(cmd)
        print(stdout.rstrip(), flush=True)
        print(f"  exported in {seconds:.0f}s", flush=True)
    return out


def accuracy(threads: int, bundle: Path, photos: Path, trained: Path | None = None) -> float:
    cmd = [str(RUNNER), "--threads", str(threads), "classify", str(bundle), str(photos), "--top-k", "1", "--json"]
    if trained is not None:
        cmd += ["--trained", str(trained)]
    _, out, _ = run(cmd)
    rows = [json.loads(line) for line in out.splitlines()]
    return 100.0 * sum(r["top"][0]["label"] == Path(r["path"]).parent.name for r in rows) / len(rows)


def finetune(threads: int, bundle: Path, photos: Path, state: Path, seed: int) -> dict[str, float]:
    shutil.rmtree(state, ignore_errors=True)
    cmd = [str(RUNNER), "--threads", str(threads), "--verbose", "finetune", str(bundle), str(photos), "--state", str(state)]
    wall, out, err = run([*cmd, "--epochs", "1", "--seed", str(seed)])
    history = json.loads((state / "state.json").read_text())["history"][0]
    return {
        "peak_bytes": int(float(re.findall(r"peak ([\d.]+) MiB", err)[-1]) * MiB),
        "features_s": float(re.findall(r"features of \d+ images from bottom.pte in ([\d.]+)s", out)[-1]),
        "epoch_s": float(history["seconds"]),
        "wall_s": wall,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="the demo's run directory (default: the newest runs/demo-*)")
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="ExecuTorch threads of the device runner (default: %(default)s)")
    p.add_argument("--observer", default="minmax", help="of the int8 export (default: %(default)s)")
    p.add_argument("--work", default="/tmp/edgetl-int8-bottom", help="bundles and photos, reused between runs (default: %(default)s)")
    args = p.parse_args()
    runs = sorted(ROOT.glob("runs/demo-*/model.pt"))
    run_dir = Path(args.run) if args.run else (runs[-1].parent if runs else None)
    if run_dir is None or not (run_dir / "model.pt").is_file():
        raise SystemExit("no demo run: run ./scripts/demo.sh first, or pass --run")
    if not RUNNER.is_file():
        raise SystemExit(f"no device runner at {RUNNER}: bash deploy/native/build.sh deploy/native/build")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from edgetl.data.fashion_mnist import FashionMNIST, write_image_folder

    photos, check = work / "photos" / "train", work / "photos" / "test"
    if not check.is_dir():
        test = FashionMNIST(split="test")
        write_image_folder(test, photos, indices=range(9000, 9240))
        write_image_folder(test, check, indices=range(8000, 9000))
    bundles = {"float32": export(run_dir, work / "fp32", False, args.observer), "int8": export(run_dir, work / "int8", True, args.observer)}
    q = json.loads((bundles["int8"] / "manifest.json").read_text())["quantization"]
    for c in q["checks"]:
        print(
            f"export check ({c['images']} validation images of the run): {c['path']}: float32 {c['fp32_accuracy']:.2f}% "
            f"int8 {c['int8_accuracy']:.2f}%, top-1 agreement {c['top1_agreement']:.2f}%"
        )
    before = {k: accuracy(args.threads, b, check) for k, b in bundles.items()}
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in bundles}
    for seed in range(args.seeds):
        for name in ("float32", "int8") if seed % 2 == 0 else ("int8", "float32"):
            state = work / f"state-{name}"
            r = finetune(args.threads, bundles[name], photos, state, seed)
            r["accuracy"] = accuracy(args.threads, bundles[name], check, state)
            rows[name].append(r)
            print(f"seed {seed} {name:7s} " + " ".join(f"{k}={v:.4g}" for k, v in r.items()), flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[name])

    print(
        f"\nLite0 demo run {run_dir.name}, K=4, batch 8, 96 px; device fine-tuning: 1 epoch on 240 photos, "
        f"{args.seeds} seeds, {args.threads} threads; accuracy on 1,000 other test photos"
    )
    header = ["bottom", "model.pte accuracy (no fine-tuning)", "accuracy after fine-tuning", "peak RSS"]
    header += ["bottom features (240 photos)", "epoch", "bottom.pte size"]
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for name, bundle in bundles.items():
        accs = [r["accuracy"] for r in rows[name]]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        ratio = "" if name == "float32" else " ({:.3f}×)"
        size = (bundle / "bottom.pte").stat().st_size
        cells = [
            f"{before[name]:.1f}%",
            f"{statistics.mean(accs):.2f}% ± {spread:.2f}",
            f"{med(name, 'peak_bytes') / MiB:.1f} MiB" + ratio.format(med(name, "peak_bytes") / med("float32", "peak_bytes")),
            f"{med(name, 'features_s'):.2f} s" + ratio.format(med(name, "features_s") / med("float32", "features_s")),
            f"{med(name, 'epoch_s'):.2f} s" + ratio.format(med(name, "epoch_s") / med("float32", "epoch_s")),
            f"{size / MiB:.2f} MiB" + ratio.format(size / (bundles["float32"] / "bottom.pte").stat().st_size),
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
