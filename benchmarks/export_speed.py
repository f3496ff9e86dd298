"""ExecuTorch programs against eager PyTorch, side by side (a benchmark, not a test).

    python benchmarks/export_speed.py [--threads 1] [--out /tmp/edgetl-bench] [--parts inference,training] [--run runs/demo-...]

1. Inference, batch 1, 224 px: the XNNPACK ``model.pte`` of MobileNetV2, MobileNetV3-Large and
   EfficientNet-Lite0 against the eager model (eval, no_grad), in float32 and int8 (PT2E,
   calibrated on 16 random images: latency does not depend on the weights or ranges), side by
   side: latency, size on disk. With ``--run`` (default: the newest ``runs/demo-*``) the demo's
   fine-tuned Lite0 is also exported both ways through ``edgetl.export`` at its 96 px, and the
   int8 accuracy delta on its validation set is printed (the export's own check).
2. Training, MobileNetV2, MobileTL K=2, batch 8, 224 px: one step of the ExecuTorch training
   program (portable kernels, from bottom features) + ExecuTorch's SGD against the eager MobileTL
   step (``forward_top`` + backward + ``torch.optim.SGD``), and the frozen bottom as XNNPACK
   program, as portable-kernel program and in eager. Time and peak RSS of each are measured in a
   fresh child process (peak RSS only grows within a process).
3. What the training program keeps for backward (exported joint graph) against the eager
   profiler's prediction, and its planned memory arena.

Weights are random (no download here): latency does not depend on them. Threads default to 1
for every runtime, so the ratios compare kernels rather than thread pools.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("mobilenet_v2", "mobilenet_v3_large", "efficientnet_lite0")
IMAGE, BATCH, BLOCKS = 224, 8, 2


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _time(fn, runs: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


# --- child processes ------------------------------------------------------------------------------


def child(args: argparse.Namespace) -> dict:
    import numpy as np

    manifest = json.loads((Path(args.bundle) / "manifest.json").read_text())
    train = manifest["programs"]["training"]
    fshape = train["methods"]["forward"]["inputs"][0]["shape"]
    rng = np.random.default_rng(0)
    feats = np.abs(rng.standard_normal(fshape)).astype(np.float32)
    labels = rng.integers(0, manifest["model"]["num_classes"], fshape[0]).astype(np.int64)
    images = rng.standard_normal((fshape[0], 3, IMAGE, IMAGE)).astype(np.float32)
    if args.child.startswith("et"):
        from edgetl.exporter import _executorch as et

        et.set_threads(args.threads)
        base = _rss_mib()
        if args.child == "et-train":
            session = et.TrainingSession(Path(args.bundle) / "train.pte", Path(args.bundle) / "train.ptd", buffer_names=train["buffers"])
            session.forward_backward(feats, labels)
            opt = train["optimizer"]
            sgd = session.sgd(opt["lr"], momentum=opt["momentum"])

            def step():
                session.forward_backward(feats, labels)
                sgd.step()
        else:  # et-bottom / et-bottom-portable
            name = "bottom.pte" if args.child == "et-bottom" else "bottom_portable.pte"
            program = et.Program(Path(args.bundle) / name)

            def step():
                program.run("forward", images)
    else:
        import torch

        torch.set_num_threads(args.threads)
        import edgetl
        from edgetl.exporter.training import without_dropout
        from edgetl.models.zoo import load_model

        model = load_model("mobilenet_v2", num_classes=manifest["model"]["num_classes"])
        model.load_state_dict(torch.load(Path(args.bundle).parent / "model_state.pt", weights_only=True))
        net = without_dropout(edgetl.prepare(model, edgetl.TrainPolicy(blocks=BLOCKS)))
        f, y, x = torch.from_numpy(feats), torch.from_numpy(labels), torch.from_numpy(images)
        base = _rss_mib()
        if args.child == "eager-train":
            net.train()
            opt = torch.optim.SGD([p for _, p in net.trainable_parameters()], lr=0.01, momentum=0.9)
            loss_fn = torch.nn.CrossEntropyLoss()

            def step():
                loss = loss_fn(net.forward_top(f), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        else:  # eager-bottom

            def step():
                net.forward_bottom(x)

    times = _time(step, args.steps)
    return {"ms": statistics.median(times), "ms_min": min(times), "peak_rss_mib": _peak_rss_mib(), "rss_before_mib": base}


def run_child(kind: str, bundle: Path, threads: int, steps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--child", kind, "--bundle", str(bundle), "--threads", str(threads), "--steps", str(steps)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def inference_rows(args, out: Path, calibrated) -> None:
    import torch

    from edgetl.exporter import _executorch as et
    from edgetl.exporter import inference, quantize

    rows = []
    for name in MODELS:
        model = calibrated(name, 1000)
        x = torch.randn(1, 3, IMAGE, IMAGE)
        gen = torch.Generator().manual_seed(1)
        graph = quantize.int8_graph(model, x, torch.randn(16, 3, IMAGE, IMAGE, generator=gen))
        with torch.no_grad():
            eager_ms = statistics.median(_time(lambda: model(x), args.runs))  # noqa: B023
        row = {"name": name, "eager_ms": eager_ms}
        for kind, module in (("fp32", model), ("int8", graph)):
            res = inference.export_inference(module, x)
            path = out / f"{name}-{kind}.pte"
            path.write_bytes(res.program.buffer)
            program = et.Program(path)
            xn = x.numpy()
            row[kind] = {
                "ms": statistics.median(_time(lambda: program.run("forward", xn), args.runs)),  # noqa: B023
                "bytes": path.stat().st_size,
                "diff": inference.max_abs_diff(path, model, x),
            }
            print(f"  exported {name} {kind}: lowered in {res.seconds:.1f}s, undelegated ops {res.program.undelegated}", flush=True)
        rows.append(row)
    print(f"\n== Inference, batch 1, 224 px (median of {args.runs} runs, {args.threads} thread(s), one process) ==")
    print("| model | eager | XNNPACK float32 | XNNPACK int8 | int8 speed-up over float32 | size float32 | size int8 | size ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        f, q = r["fp32"], r["int8"]
        print(
            f"| {r['name']} | {r['eager_ms']:.2f} ms | {f['ms']:.2f} ms | {q['ms']:.2f} ms | {f['ms'] / q['ms']:.2f}x | "
            f"{f['bytes'] / 2**20:.2f} MiB | {q['bytes'] / 2**20:.2f} MiB | {q['bytes'] / f['bytes']:.3f} |"
        )
    print("max |XNNPACK float32 - eager|: " + ", ".join(f"{r['name']} {r['fp32']['diff']:.2e}" for r in rows))


def demo_accuracy(args, out: Path) -> None:
    """The demo's fine-tuned Lite0 exported float32 and int8 at its own size: the int8 accuracy delta
    on its validation set, as ``edgetl export --quantize int8`` measures it."""
    import edgetl
    from edgetl.exporter import calibration as cal
    from edgetl.train.run import read_weights

    runs = sorted(Path(__file__).resolve().parents[1].glob("runs/demo-*/model.pt"))
    run = Path(args.run) if args.run else (runs[-1].parent if runs else None)
    if run is None:
        print("\n(no demo run: int8 accuracy delta skipped; run ./scripts/demo.sh or pass --run)")
        return
    trained = read_weights(run)
    model = edgetl.load_model(trained.model_name, num_classes=trained.num_classes)
    model.load_state_dict(trained.state_dict)
    size = trained.config.image_size
    calibration, validation = cal.from_run(trained.config, model=trained.model_name, image_size=size, count=100, seed=0)
    sizes = {}
    for kind in ("none", "int8"):
        config = edgetl.ExportConfig(image_size=size, quantize=kind, max_accuracy_drop=100.0)
        bundle = edgetl.export(
            model,
            trained.policy,
            out / f"demo-{kind}",
            config,
            model_name=trained.model_name,
            classes=trained.classes,
            calibration=calibration,
            validation=validation,
            log=lambda line: print("  " + line, flush=True),
        )
        sizes[kind] = (bundle.path / "model.pte").stat().st_size
    check = bundle.manifest.quantization.checks[0]
    print(f"\n== int8 accuracy on the demo's validation set ({run.name}: {trained.model_name}, {size} px, {check.images} images) ==")
    print("| model.pte | accuracy | top-1 agreement with float32 | size |")
    print("|---|---|---|---|")
    print(f"| float32 (eager = XNNPACK within 1e-3) | {check.fp32_accuracy:.2f}% | | {sizes['none'] / 2**20:.2f} MiB |")
    print(
        f"| int8 | {check.int8_accuracy:.2f}% ({-check.accuracy_drop:+.2f} points) | {check.top1_agreement:.2f}% | "
        f"{sizes['int8'] / 2**20:.2f} MiB ({sizes['int8'] / sizes['none']:.3f}) |"
    )


# --- main -------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="/tmp/edgetl-bench")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--parts", default="inference,training", help="inference (float32 and int8), training (default: %(default)s)")
    p.add_argument("--run", help="the demo's run for the int8 accuracy delta (default: the newest runs/demo-*; none: skipped)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--bundle", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    import shutil
    import warnings

    import numpy as np
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import edgetl
    from edgetl.exporter import _executorch as et
    from edgetl.exporter import inference
    from edgetl.models.zoo import load_model

    et.set_threads(args.threads)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    print(
        f"edgetl export benchmark: torch {torch.__version__}, executorch {et.executorch_version()}, "
        f"{args.threads} thread(s), {os.cpu_count()} CPUs",
        flush=True,
    )

    def calibrated(name: str, num_classes: int) -> torch.nn.Module:
        """Random weights with batch-norm statistics of its own activations (realistic magnitudes)."""
        torch.manual_seed(0)
        model = load_model(name, num_classes=num_classes)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        with torch.no_grad():
            model.train()(torch.randn(16, 3, IMAGE, IMAGE))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 0.1
        return model.eval()

    # 1. inference, float32 and int8
    parts = set(args.parts.split(","))
    if "inference" in parts:
        inference_rows(args, out, calibrated)
        demo_accuracy(args, out)
    if "training" not in parts:
        return

    # 2. training: export a bundle, then time each part in a fresh process
    model = calibrated("mobilenet_v2", 10)
    torch.save(model.state_dict(), out / "model_state.pt")  # the eager child's weights
    t0 = time.perf_counter()
    bundle = edgetl.export(
        model,
        edgetl.TrainPolicy(blocks=BLOCKS),
        out / "bundle",
        edgetl.ExportConfig(image_size=IMAGE, batch_size=BATCH, training=True),
        log=lambda line: print("  " + line, flush=True),
    )
    print(f"  bundle exported and verified in {time.perf_counter() - t0:.1f}s", flush=True)
    # the frozen bottom without XNNPACK, to justify delegating it
    net = edgetl.prepare(model, edgetl.TrainPolicy(blocks=BLOCKS))
    bottom = inference.Bottom(net)
    xb = torch.randn(BATCH, 3, IMAGE, IMAGE)
    with torch.no_grad():
        (bundle.path / "bottom_portable.pte").write_bytes(et.portable_program(torch.export.export(bottom, (xb,))))
    results = {
        k: run_child(k, bundle.path, args.threads, args.steps)
        for k in ("eager-train", "et-train", "eager-bottom", "et-bottom", "et-bottom-portable")
    }
    print(
        f"\n== Training step, MobileNetV2 MobileTL K={BLOCKS}, batch {BATCH}, 224 px (median of {args.steps} steps, "
        "each in a fresh process) =="
    )
    print(f"{'part':34s} {'ms':>9s} {'peak RSS MiB':>13s} {'RSS before MiB':>15s}")
    labels = {
        "eager-train": "top step, eager MobileTL",
        "et-train": "top step, ExecuTorch (portable)",
        "eager-bottom": "frozen bottom, eager",
        "et-bottom": "frozen bottom, XNNPACK bottom.pte",
        "et-bottom-portable": "frozen bottom, portable kernels",
    }
    for k, label in labels.items():
        r = results[k]
        print(f"{label:34s} {r['ms']:9.1f} {r['peak_rss_mib']:13.1f} {r['rss_before_mib']:15.1f}")
    e, t = results["eager-train"], results["et-train"]
    print(
        f"ExecuTorch / eager top step: time {t['ms'] / e['ms']:.2f}x, peak RSS {t['peak_rss_mib'] / e['peak_rss_mib']:.2f}x "
        f"(RSS growth during the steps: eager {e['peak_rss_mib'] - e['rss_before_mib']:.1f} MiB, "
        f"ExecuTorch {t['peak_rss_mib'] - t['rss_before_mib']:.1f} MiB)"
    )
    device = results["et-bottom"]["ms"] + t["ms"]
    host = results["eager-bottom"]["ms"] + e["ms"]
    print(
        f"whole step incl. frozen bottom: eager {host:.1f} ms, ExecuTorch (XNNPACK bottom + portable top) {device:.1f} ms "
        f"({device / host:.2f}x); with a portable bottom it would be {results['et-bottom-portable']['ms'] + t['ms']:.1f} ms"
    )

    ops = et.profile_operators(
        bundle.path / "train.pte",
        bundle.path / "train.ptd",
        "forward",
        [
            np.abs(np.random.default_rng(0).standard_normal(bundle.manifest.programs.training.methods["forward"].inputs[0].shape)).astype(
                np.float32
            ),
            np.arange(BATCH, dtype=np.int64) % 10,
        ],
    )
    total = sum(ops.values())
    print(
        f"ExecuTorch training step by kernel (ETDump, one step, {total:.0f} ms): "
        + ", ".join(f"{k} {v:.0f}" for k, v in list(ops.items())[:8])
    )

    # 3. memory
    mem = bundle.manifest.memory
    print("\n== What the training program keeps for backward (batch 8, 224 px) ==")
    print(
        f"exported joint graph: {mem.saved_for_backward_bytes_exported / 2**20:.3f} MiB; eager profiler "
        f"(predict_units, no dropout): {mem.saved_for_backward_bytes_predicted / 2**20:.3f} MiB "
        f"(ratio {mem.saved_for_backward_ratio:.3f}); uint8 masks: {mem.saved_uint8_masks}"
    )
    print(
        "planned arenas: "
        + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in mem.planned_arena_bytes.items())
        + f"; trainable parameters {mem.trainable_parameter_bytes / 2**20:.2f} MiB (in the arena twice: weights and gradients)"
    )
    v = bundle.manifest.verification
    print(
        f"verification: model.pte {v.inference_max_abs_diff:.2e}, bottom.pte {v.bottom_max_abs_diff:.2e}, "
        f"3 SGD steps loss {v.training.loss_max_abs_diff:.2e} weights {v.training.weight_max_abs_diff:.2e}"
    )


if __name__ == "__main__":
    main()
