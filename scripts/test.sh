#!/usr/bin/env bash
# The whole test suite, installing what it needs first (a fresh machine needs nothing else).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="weights,test,plot,fleet,timm" source "$ROOT/scripts/setup.sh"
# foolbox ships 20 labelled ImageNet images (the Lite0 weight-conversion proof); its Python
# dependencies are not needed, only its data folder.
"$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('foolbox') is None)" 2>/dev/null \
  || pip_install --no-deps "foolbox==3.3.4"
cd "$ROOT"
# the native device runner and edgetl's ExecuTorch kernels: exports then run (and verify) them
PYTHON="$VENV/bin/python" bash deploy/native/build.sh deploy/native/build >/dev/null
# ... and cross-built for 64-bit ARM (a Raspberry Pi), run under qemu-aarch64 by tests/test_native_aarch64.py
# and packaged (.deb) by tests/test_native_package.py; installs the cross toolchain, qemu-user and the
# arm64 libraries with apt on first use
if [ "$(uname -m)" = x86_64 ] && command -v apt-get >/dev/null; then
  PYTHON="$VENV/bin/python" bash deploy/native/build.sh --target aarch64 deploy/native/build-aarch64 >/dev/null
fi
# lint and formatting are part of the suite: a red ruff is a red CI
"$VENV/bin/ruff" check edgetl tests benchmarks
"$VENV/bin/ruff" format --check -q edgetl tests benchmarks
# every core, one test file per worker at a time (a file's module fixtures are built once)
exec "$VENV/bin/python" -m pytest -q -n auto --dist loadfile "$@"
