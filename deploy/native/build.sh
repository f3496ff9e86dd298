#!/usr/bin/env bash
# Build the native device runner:  deploy/native/build.sh [BUILD_DIR]  ->  BUILD_DIR/edgetl-device
#
# Needs: cmake (3.19+), g++ (C++17), the executorch wheel (`pip install executorch==1.5.1 --no-deps`
# is enough: only its C++ runtime is used), and the Debian packages libjpeg62-turbo-dev libpng-dev
# libssl-dev nlohmann-json3-dev (installed here with apt when missing and we may: root or sudo).
# The wheel is found through `python3` (PYTHON=...) or given as EXECUTORCH_DIR=.../site-packages/executorch.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BUILD="${1:-$HERE/build}"
PY="${PYTHON:-python3}"

if [ -z "${EXECUTORCH_DIR:-}" ]; then
  # find_spec does not import executorch (whose Python parts would want torch)
  EXECUTORCH_DIR="$("$PY" -c 'import importlib.util as u; s = u.find_spec("executorch"); print(list(s.submodule_search_locations)[0])' 2>/dev/null)" || {
    echo "build.sh: executorch not found by $PY; pip install executorch==1.5.1 --no-deps, or set EXECUTORCH_DIR" >&2; exit 2; }
fi
if [ ! -f "$EXECUTORCH_DIR/share/cmake/executorch-config.cmake" ]; then
  echo "build.sh: $EXECUTORCH_DIR has no share/cmake/executorch-config.cmake (executorch 1.5+ wheel needed)" >&2; exit 2
fi

missing=()
[ -f /usr/include/jpeglib.h ] || [ -f "/usr/include/$(uname -m)-linux-gnu/jpeglib.h" ] || missing+=(libjpeg62-turbo-dev)
[ -f /usr/include/png.h ] || missing+=(libpng-dev)
[ -f /usr/include/openssl/sha.h ] || missing+=(libssl-dev)
[ -f /usr/include/nlohmann/json.hpp ] || missing+=(nlohmann-json3-dev)
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null || missing+=(g++)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "== installing ${missing[*]} (apt)" >&2
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null; } || {
    echo "build.sh: could not install ${missing[*]}; run: sudo apt install ${missing[*]}" >&2; exit 2; }
fi

mkdir -p "$BUILD"
if ! cmake -S "$HERE" -B "$BUILD" -DEXECUTORCH_DIR="$EXECUTORCH_DIR" -DCMAKE_BUILD_TYPE=Release >"$BUILD/configure.log" 2>&1; then
  cat "$BUILD/configure.log" >&2; exit 1
fi
if ! cmake --build "$BUILD" -j "$(nproc)" >"$BUILD/build.log" 2>&1; then
  cat "$BUILD/build.log" >&2; exit 1
fi
echo "$BUILD/edgetl-device"
