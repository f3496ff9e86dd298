"""Why an AdamW bundle's verification checks gradients and rule apart: the figures side by side.

    .venv/bin/python benchmarks/adamw_verification.py [--model mobilenet_v2] [--blocks 2] [--image-size 64]
        [--batch-size 4] [--steps 3] [--lr 0.002]

Exports the training program once, then runs ``--steps`` steps on the same random features three
ways and prints, per step, the largest weight difference (relative to max(1, |w|), the
verification's measure; its tolerance is 1e-4):

* SGD (momentum 0): the program + ExecuTorch's SGD against eager ``torch.optim.SGD`` (what the
  verification holds the program's gradients to);
* AdamW end to end: the program + the device's AdamW against eager ``torch.optim.AdamW`` on eager's
  own gradients, with the worst element's gradient relative to its tensor's largest gradient;
* AdamW rule: the device's AdamW against ``torch.optim.AdamW`` on the program's gradients.
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
    from edgetl.exporter.device_optim import AdamW
    from edgetl.models.zoo import load_model
    from edgetl.train.optim import build_optimizer, decayed_names

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.002)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    net = edgetl.prepare(load_model(args.model, num_classes=3), edgetl.TrainPolicy(blocks=args.blocks))
    with torch.no_grad():
        shape = tuple(net.forward_bottom(torch.zeros(args.batch_size, 3, args.image_size, args.image_size)).shape)
    ex = training.export_training(net, feature_shape=shape, num_classes=3)
    tmp = Path(tempfile.mkdtemp())
    (tmp / "train.pte").write_bytes(ex.program.pte)
    (tmp / "train.ptd").write_bytes(ex.program.ptd)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(shape, generator=gen).abs(), torch.randint(0, 3, (shape[0],), generator=gen)) for _ in range(args.steps)]
    loss_fn = nn.CrossEntropyLoss()

    def eager_run(name: str):
        eager = training.without_dropout(net).train()
        import copy

        eager = copy.deepcopy(eager)
        opt = build_optimizer(name, eager.trainable_parameters(), lr=args.lr, momentum=0.0)
        for x, y in batches:
            loss = loss_fn(eager.forward_top(x), y)
            opt.zero_grad()
            loss.backward()
            grads = {k: p.grad.detach().clone().numpy() for k, p in eager.trainable_parameters()}
            opt.step()
            yield {k: p.detach().numpy().copy() for k, p in eager.trainable_parameters()}, grads

    def program_run(name: str):
        session = et.TrainingSession(tmp / "train.pte", tmp / "train.ptd", buffer_names=ex.buffer_names)
        sgd = device = reference = None
        named: list = []
        shapes = {k: p.shape for k, p in net.trainable_parameters()}
        for x, y in batches:
            session.forward_backward(x.numpy(), y.numpy())
            grads = session.gradient_arrays()
            if name == "sgd":
                sgd = sgd or session.sgd(args.lr)
                sgd.step()
            else:
                if device is None:
                    params = session.parameter_arrays()
                    named = [(k, nn.Parameter(torch.from_numpy(params[k].copy()).reshape(shapes[k]))) for k in ex.parameter_names]
                    reference = build_optimizer("adamw", named, lr=args.lr)
                    device = AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decay=decayed_names(named))
                for k, p in named:
                    p.grad = torch.from_numpy(np.asarray(grads[k]).copy()).reshape(p.shape)
                reference.step()
                device.step(grads)
            state = {k: np.asarray(v).copy() for k, v in session.named_parameters().items()}
            yield state, {k: p.detach().numpy().copy() for k, p in named}

    def worst(a: dict, b: dict) -> tuple[float, str]:
        return max((training._max_rel(a[k].reshape(b[k].shape), b[k]), k) for k in b)

    print(f"{args.model} K={args.blocks} {args.image_size} px batch {args.batch_size}, lr {args.lr}, random features")
    print(
        "step | SGD: program vs eager | AdamW end to end: program vs eager (worst tensor, |g| / max|g| there) "
        "| AdamW rule on the program's gradients"
    )
    sgd = zip(program_run("sgd"), eager_run("sgd"), strict=True)
    adamw = zip(program_run("adamw"), eager_run("adamw"), strict=True)
    for i, (((ps, _), (es, _)), ((pa, torch_on_program), (ea, eg))) in enumerate(zip(sgd, adamw, strict=True), 1):
        sgd_diff, _ = worst(ps, es)
        end_diff, tensor = worst(pa, ea)
        at = int(np.abs(pa[tensor].reshape(ea[tensor].shape) - ea[tensor]).argmax())
        g = eg[tensor].reshape(-1)
        rule_diff, _ = worst(pa, torch_on_program)
        print(f"{i:4d} | {sgd_diff:21.3g} | {end_diff:9.3g} ({tensor}, {abs(g[at]) / np.abs(g).max():.2g}) | {rule_diff:.3g}")


if __name__ == "__main__":
    main()
