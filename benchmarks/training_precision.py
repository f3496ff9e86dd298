"""How far each float32 implementation of a training step is from the exact one.

    .venv/bin/python benchmarks/training_precision.py [--model mobilenet_v2] [--blocks all] [--image-size 64]
        [--batch-size 2] [--steps 3]

Exports the MobileTL training program (the verification's replay program, which also returns every
masked activation's input), then, for each of ``--steps`` SGD steps from the program's state,
computes the gradients three ways on the same random features: the ExecuTorch program, eager
PyTorch in float32 and eager PyTorch in float64 (both through the program's 1-bit masks, so a mask
element at rounding distance of 0 cannot tell them apart). Per step it prints the loss of each and
the tensors whose gradients are furthest from float64, relative to that gradient's largest
element: the program's error and eager float32's side by side. This is the evidence behind the
verification's float64 reference (``edgetl.exporter.training.verify_training``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    import edgetl
    from edgetl.exporter import _executorch as et
    from edgetl.exporter import training
    from edgetl.models.zoo import load_model, num_blocks

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--blocks", default="all", help="K, or 'all'")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worst", type=int, default=5, help="tensors listed per step")
    args = ap.parse_args(argv)
    k = num_blocks(args.model) if args.blocks == "all" else int(args.blocks)
    torch.manual_seed(0)
    net = edgetl.prepare(load_model(args.model, num_classes=3), edgetl.TrainPolicy(blocks=k))
    with torch.no_grad():
        shape = tuple(net.forward_bottom(torch.zeros(args.batch_size, 3, args.image_size, args.image_size)).shape)
    replay = training.export_training(net, feature_shape=shape, num_classes=3, record_activations=True)
    tmp = Path(tempfile.mkdtemp())
    (tmp / "replay.pte").write_bytes(replay.program.pte)
    (tmp / "replay.ptd").write_bytes(replay.program.ptd)
    session = et.TrainingSession(tmp / "replay.pte", tmp / "replay.ptd", buffer_names=replay.buffer_names)
    eager = {dtype: training.without_dropout(net).train().to(dtype) for dtype in (torch.float32, torch.float64)}
    masks = {dtype: training._replaying(e, replay.activation_names) for dtype, e in eager.items()}
    gen = torch.Generator().manual_seed(0)
    loss_fn = nn.CrossEntropyLoss()
    sgd = None
    print(f"{args.model} K={k} {args.image_size} px batch {args.batch_size}: gradient error relative to float64, per tensor")
    for step in range(1, args.steps + 1):
        x, y = torch.randn(shape, generator=gen).abs(), torch.randint(0, 3, (shape[0],), generator=gen)
        if sgd is not None:  # from the program's state (the first step starts from the net's)
            for e in eager.values():
                training._take_state(e, session.state())
        out = session.forward_backward(x.numpy(), y.numpy())
        for name, value in zip(replay.activation_names, out[2 : 2 + len(replay.activation_names)], strict=True):
            for m in masks.values():
                m[name].replay(training._nchw(value))
        grads, losses = {}, {}
        for dtype, e in eager.items():
            for _, p in e.trainable_parameters():
                p.grad = None
            loss = loss_fn(e.forward_top(x.to(dtype)), y)
            loss.backward()
            losses[dtype] = loss.item()
            grads[dtype] = {n: p.grad.double().numpy() for n, p in e.trainable_parameters()}
        program = {n: np.asarray(g, dtype=np.float64) for n, g in session.named_gradients().items()}
        rows = []
        for n, exact in grads[torch.float64].items():
            scale = float(np.abs(exact).max())
            if scale < 1e-12:  # a gradient that is 0 up to rounding (a bias before a train-mode norm)
                continue
            rows.append(
                (
                    float(np.abs(program[n].reshape(exact.shape) - exact).max()) / scale,
                    float(np.abs(grads[torch.float32][n] - exact).max()) / scale,
                    n,
                )
            )
        rows.sort(key=lambda r: -max(r[0], r[1]))
        print(
            f"step {step}: loss program {float(out[0]):.9f}, eager float32 {losses[torch.float32]:.9f}, float64 {losses[torch.float64]:.9f}"
        )
        print(f"  largest over all tensors: program {max(r[0] for r in rows):.2e}, eager float32 {max(r[1] for r in rows):.2e}")
        for a, b, n in rows[: args.worst]:
            print(f"  {n}: program {a:.2e}, eager float32 {b:.2e}")
        sgd = sgd or session.sgd(0.01, momentum=0.9)
        sgd.step()


if __name__ == "__main__":
    main()
