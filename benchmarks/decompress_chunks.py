"""The time cost of decompressing stored inputs in batch chunks in backward (``saved_precision``),
by chunk limit, side by side in one process.

    .venv/bin/python benchmarks/decompress_chunks.py [--repeats 15] [--warmup 3]

Backward decompresses a compressed conv (or gating) input one batch chunk at a time
(:func:`edgetl.nn.compress.decompress_chunk`: as many images as keep the fp32 chunk within
``DECOMPRESS_CHUNK_BYTES``). Smaller chunks hold fewer bytes but make more
``convolution_backward`` calls. This times one whole training step (:func:`edgetl.train.step.train_step`,
Adam) of ``TrainPolicy(K, saved_precision="int8")`` for several limits: the whole batch in one chunk
(the unchunked formula), 2 MiB, 1 MiB, 512 KiB and one image a chunk, in the headline setting
(MobileNetV3-Large, K=5, batch 8, 224 px) and in the small-map one (EfficientNet-Lite0, K=8,
batch 32, 64 px, maps down to 2 x 2). The limits alternate step by step within each repeat so that
drift on the machine hits all of them; medians, and each as a ratio to the unchunked step. It also
prints the largest fp32 chunk each limit holds (the bytes the profiler predicts).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from edgetl.models.zoo import load_model  # noqa: E402
from edgetl.nn import compress  # noqa: E402
from edgetl.profiler.predict import predict_units  # noqa: E402
from edgetl.train.optim import build_optimizer  # noqa: E402
from edgetl.train.policy import TrainPolicy  # noqa: E402
from edgetl.train.prepare import TransferModel, prepare  # noqa: E402
from edgetl.train.step import train_step  # noqa: E402

KIB = 2**10
MIB = 2**20
#: label -> DECOMPRESS_CHUNK_BYTES (0: one image a chunk; huge: the whole batch)
LIMITS = {"whole batch": 2**62, "2 MiB": 2 * MIB, "1 MiB": MIB, "512 KiB": 512 * KIB, "one image": 0}
SETTINGS = (("mobilenet_v3_large", 5, 8, 224), ("efficientnet_lite0", 8, 32, 64))


def largest_chunk(model: torch.nn.Module, policy: TrainPolicy, batch: int, size: int) -> int:
    """The largest fp32 chunk backward holds under the current limit (as the estimate computes it)."""
    rows = predict_units(model, policy, batch_size=batch, image_size=size)
    shapes = [s.shape for r in rows for s in r.saved if s.precision != "fp32"]
    return max(4 * compress.decompress_chunk(s) * int(torch.Size(s[1:]).numel()) for s in shapes)


def time_steps(net: TransferModel, batch: int, size: int, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each training step of ``net``, by chunk limit, the limits alternating step by step."""
    opt = build_optimizer("adam", net.trainable_parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(limit: int) -> float:
        with mock.patch.object(compress, "DECOMPRESS_CHUNK_BYTES", limit):
            t0 = time.perf_counter()
            train_step(net, x, y, loss_fn, opt)
            return time.perf_counter() - t0

    for _ in range(warmup):  # allocator, oneDNN's primitives for every chunk shape, Adam's state
        for limit in LIMITS.values():
            step(limit)
    times: dict[str, list[float]] = {label: [] for label in LIMITS}
    for _ in range(repeats):
        for label, limit in LIMITS.items():
            times[label].append(step(limit))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds over all limits first (the first steps are slow)")
    args = p.parse_args()
    torch.manual_seed(0)
    for name, k, batch, size in SETTINGS:
        model = load_model(name, num_classes=10)
        policy = TrainPolicy(k, saved_precision="int8")
        times = time_steps(prepare(model, policy).train(), batch, size, args.repeats, args.warmup)
        whole = statistics.median(times["whole batch"])
        print(f"\n{name}, K={k}, batch {batch}, {size} px, int8, Adam: {args.repeats} alternating steps a limit (medians)")
        print(f"{'chunk limit':14}{'largest fp32 chunk':>20}{'step (ms)':>12}{'/ whole batch':>15}")
        for label, limit in LIMITS.items():
            with mock.patch.object(compress, "DECOMPRESS_CHUNK_BYTES", limit):
                chunk = largest_chunk(model, policy, batch, size)
            t = statistics.median(times[label])
            print(f"{label:14}{chunk / MIB:>16.2f} MiB{t * 1e3:12.1f}{t / whole:15.3f}")


if __name__ == "__main__":
    main()
