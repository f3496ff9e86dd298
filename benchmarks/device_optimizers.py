"""edgetl-device's SGD and AdamW side by side on one bundle: predicted need, peak RSS, optimizer time.

    .venv/bin/python benchmarks/device_optimizers.py --bundle DIST --data DIR [--epochs 2] [--threads 2]
        [--runner deploy/native/build/edgetl-device]

``DIST`` is an ``edgetl export --training`` bundle, ``DIR`` an ImageFolder of its classes. Each
optimizer trains ``--epochs`` epochs in a fresh process and state directory (``finetune
--optimizer sgd`` with the bundle's momentum, or 0.9 when the bundle names AdamW; ``--optimizer
adamw`` with its defaults), one after the other. Per optimizer it prints the need
``edgetl.profiler.native`` predicts (the sum the runner checks against its memory limit) and its
optimizer-state term, the process's peak RSS (VmHWM, the largest epoch's ``peak_rss_bytes``), the
seconds per epoch spent in the optimizer step and in the program's forward-backward, and the last
epoch's loss.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    from edgetl.profiler.native import native_peak_of_bundle

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runner", type=Path, default=ROOT / "deploy/native/build/edgetl-device")
    args = ap.parse_args(argv)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    named = manifest["programs"]["training"]["optimizer"]
    images = sum(1 for p in args.data.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    print(f"{manifest['model']['name']}, {images} images, {args.epochs} epochs, {args.threads} threads; bundle optimizer {named['name']}")
    print("optimizer | predicted need MiB (optimizer state) | peak RSS MiB | optimizer s/epoch | forward-backward s/epoch | loss")
    for name in ("sgd", "adamw"):
        extra = ["--optimizer", name]
        if name == "sgd" and named["name"] != "sgd":
            extra += ["--momentum", "0.9"]
        need = native_peak_of_bundle(manifest, images=images, optimizer=name, momentum=0.9 if name == "sgd" else None)
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [str(args.runner), "--threads", str(args.threads), "finetune", str(args.bundle), str(args.data)]
            cmd += ["--state", f"{tmp}/state", "--epochs", str(args.epochs), *extra]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(done.stderr)
            rows = json.loads(Path(tmp, "state", "state.json").read_text())["history"]
        optimizer_s, step_s = (sum(r[key] for r in rows) / len(rows) for key in ("optimizer_seconds", "step_seconds"))
        print(
            f"{name:9s} | {need.total / 2**20:8.2f} ({need.optimizer_state / 2**20:.2f}) | "
            f"{max(r['peak_rss_bytes'] for r in rows) / 2**20:8.2f} | {optimizer_s:.4f} | {step_s:.3f} | {rows[-1]['loss']:.4f}"
        )


if __name__ == "__main__":
    main()
