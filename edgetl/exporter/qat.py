"""Quantization-aware fine-tuning (QAT): the int8 graph trained on the run's images, for models
whose post-training int8 loses more than the limit.

:func:`finetune_int8` folds the batch norms into their convolutions (running statistics, as the
post-training graph folds them), puts fake quantization on every tensor the XNNPACK quantizer
quantizes (the same configuration, ReLU6 on its own range), reads the activation ranges off one
pass over the images, then trains every weight through the fake quantization (straight-through
gradients) towards the float32 network's output with Adam for ``epochs`` passes, and converts the result to the int8 graph the export
checks and lowers.

Decided: the target is the float32 network's output (distillation: the KL divergence of the
int8 graph's class probabilities from float32's), not the labels: the export promises a program
that computes what the fine-tuned float32 model computes, and is checked against it; training on
labels would fine-tune further and compare the result with a different model. It needs no
labels, so any calibration images serve. The ranges are observed (moving averages of each batch's extremes) for the first half of
the steps and frozen for the second, so the weights settle on the grid the program keeps; the
norms stay folded throughout (their statistics are the fine-tuned run's, and a folded convolution
is one int8 tensor, as XNNPACK runs it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from edgetl.exporter import _executorch as et
from edgetl.exporter.quantize import calibration_batches, eager_outputs

#: images per training step
BATCH = 32


def finetune_int8(
    module: nn.Module,
    images: Tensor,
    *,
    epochs: int,
    lr: float,
    seed: int,
    batch: int = BATCH,
    log: Callable[[str], None] = print,
) -> nn.Module:
    """``module`` (eval mode, left unchanged) distilled into its int8 graph on ``images``
    (preprocessed, the evaluation transform) and converted: a PT2E int8 graph for XNNPACK that
    runs at any batch size, as :func:`edgetl.exporter.quantize.int8_graph` returns."""
    if len(images) < 2:
        raise ValueError(f"quantization-aware fine-tuning needs at least 2 images, got {len(images)}")
    teacher = eager_outputs(module, images)
    batch = max(2, min(batch, len(images)))
    prepared = et.prepare_int8_qat(module, images[:batch])
    et.qat_mode(prepared, observe=True)
    with torch.no_grad():
        for x in calibration_batches(images, batch):
            prepared(x)
    params = [p for p in prepared.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(images) // batch
    total, step = epochs * steps_per_epoch, 0
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        running = 0.0
        for i in range(steps_per_epoch):
            et.qat_mode(prepared, observe=step < total // 2)
            idx = order[i * batch : (i + 1) * batch]
            student = nn.functional.log_softmax(prepared(images[idx]), dim=1)
            loss = nn.functional.kl_div(
                student, torch.from_numpy(teacher[idx.numpy()]).log_softmax(1), log_target=True, reduction="batchmean"
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += float(loss.detach())
            step += 1
        log(f"    QAT epoch {epoch + 1}/{epochs}: loss {running / max(1, steps_per_epoch):.4f} ({steps_per_epoch} steps of {batch})")
    et.qat_mode(prepared, observe=False)
    return et.convert_int8(prepared)
