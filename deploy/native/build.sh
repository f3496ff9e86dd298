#!/usr/bin/env bash
# Build the native device runner:  deploy/native/build.sh [--target aarch64] [BUILD_DIR]  ->  BUILD_DIR/edgetl-device
#
# Needs: cmake (3.19+), g++ (C++17), the executorch wheel (`pip install executorch==1.5.1 --no-deps`
# is enough: only its C++ runtime is used), and the Debian packages libjpeg62-turbo-dev libpng-dev
# libssl-dev nlohmann-json3-dev (installed here with apt when missing and we may: root or sudo).
# The wheel is found through `python3` (PYTHON=...) or given as EXECUTORCH_DIR=.../site-packages/executorch.
#
# --target aarch64 cross-builds for 64-bit ARM Linux (Raspberry Pi OS Bookworm) on a Debian 12
# x86-64 machine: it adds the arm64 architecture to dpkg, installs the cross compiler, qemu-user
# (to run the result: qemu-aarch64 -L / BUILD_DIR/edgetl-device) and the arm64 -dev packages, and
# uses the manylinux aarch64 executorch wheel (downloaded once with pip into ~/.cache/edgetl, or
# EXECUTORCH_DIR=.../executorch of an unpacked one).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TARGET=native
if [ "${1:-}" = "--target" ]; then
  TARGET="${2:?build.sh: --target needs a value (aarch64)}"; shift 2
fi
case "$TARGET" in
  native|aarch64) ;;
  *) echo "build.sh: unknown --target '$TARGET' (aarch64)" >&2; exit 2 ;;
esac
[ "$TARGET" = aarch64 ] && [ "$(uname -m)" = aarch64 ] && TARGET=native  # on the device itself: a native build
BUILD="${1:-$HERE/build}"
PY="${PYTHON:-python3}"
ET_VERSION="${EXECUTORCH_VERSION:-1.5.1}"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"

apt_install() {  # apt_install PACKAGE...: one line and exit 2 when it cannot
  echo "== installing $* (apt)" >&2
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null; } || {
    echo "build.sh: could not install $*; run: sudo apt install $*" >&2; exit 2; }
}

missing=()
if [ "$TARGET" = aarch64 ]; then
  MA=aarch64-linux-gnu
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    echo "== dpkg --add-architecture arm64" >&2
    $SUDO dpkg --add-architecture arm64 || { echo "build.sh: could not add the arm64 architecture to dpkg" >&2; exit 2; }
  fi
  command -v $MA-g++ >/dev/null || missing+=(g++-$MA)
  command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
  [ -f /usr/lib/$MA/libstdc++.so.6 ] || missing+=(libstdc++6:arm64)
  [ -f /usr/include/$MA/jconfig.h ] || missing+=(libjpeg62-turbo-dev:arm64)
  [ -f /usr/lib/$MA/libpng.so ] || missing+=(libpng-dev:arm64)
  [ -f /usr/include/$MA/openssl/opensslconf.h ] || missing+=(libssl-dev:arm64)
else
  MA="$(uname -m)-linux-gnu"
  [ -f /usr/include/jpeglib.h ] || [ -f "/usr/include/$MA/jpeglib.h" ] || missing+=(libjpeg62-turbo-dev)
  [ -f /usr/include/png.h ] || missing+=(libpng-dev)
  [ -f /usr/include/openssl/sha.h ] || missing+=(libssl-dev)
  command -v g++ >/dev/null || missing+=(g++)
fi
[ -f /usr/include/nlohmann/json.hpp ] || missing+=(nlohmann-json3-dev)
command -v cmake >/dev/null || missing+=(cmake)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

if [ -z "${EXECUTORCH_DIR:-}" ] && [ "$TARGET" = aarch64 ]; then
  # only the C++ runtime (lib/, include/, share/cmake) of the wheel is unpacked
  CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/edgetl"
  EXECUTORCH_DIR="$CACHE/executorch-$ET_VERSION-aarch64/executorch"
  if [ ! -f "$EXECUTORCH_DIR/share/cmake/executorch-config.cmake" ]; then
    mkdir -p "$CACHE/wheels"
    WHEEL="$(ls "$CACHE/wheels"/executorch-"$ET_VERSION"-*manylinux*aarch64.whl 2>/dev/null | head -1 || true)"
    if [ -z "$WHEEL" ]; then
      echo "== downloading the aarch64 executorch $ET_VERSION wheel (pip)" >&2
      "$PY" -m pip download -q --disable-pip-version-check "executorch==$ET_VERSION" --platform manylinux_2_28_aarch64 \
        --only-binary=:all: --no-deps --python-version 3.11 -d "$CACHE/wheels" >&2 || {
        echo "build.sh: could not download the aarch64 executorch $ET_VERSION wheel with $PY -m pip" >&2; exit 2; }
      WHEEL="$(ls "$CACHE/wheels"/executorch-"$ET_VERSION"-*manylinux*aarch64.whl | head -1)"
    fi
    "$PY" - "$WHEEL" "$(dirname "$EXECUTORCH_DIR")" <<'PYEOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.split("/")[:2] in (["executorch", "lib"], ["executorch", "include"], ["executorch", "share"])])
PYEOF
  fi
fi
if [ -z "${EXECUTORCH_DIR:-}" ]; then
  # find_spec does not import executorch (whose Python parts would want torch)
  EXECUTORCH_DIR="$("$PY" -c 'import importlib.util as u; s = u.find_spec("executorch"); print(list(s.submodule_search_locations)[0])' 2>/dev/null)" || {
    echo "build.sh: executorch not found by $PY; pip install executorch==1.5.1 --no-deps, or set EXECUTORCH_DIR" >&2; exit 2; }
fi
if [ ! -f "$EXECUTORCH_DIR/share/cmake/executorch-config.cmake" ]; then
  echo "build.sh: $EXECUTORCH_DIR has no share/cmake/executorch-config.cmake (executorch 1.5+ wheel needed)" >&2; exit 2
fi

CROSS=()
[ "$TARGET" = aarch64 ] && CROSS=(-DCMAKE_TOOLCHAIN_FILE="$HERE/cmake/aarch64-linux-gnu.cmake")
mkdir -p "$BUILD"
if ! cmake -S "$HERE" -B "$BUILD" "${CROSS[@]}" -DEXECUTORCH_DIR="$EXECUTORCH_DIR" -DCMAKE_BUILD_TYPE=Release >"$BUILD/configure.log" 2>&1; then
  cat "$BUILD/configure.log" >&2; exit 1
fi
if ! cmake --build "$BUILD" -j "$(nproc)" >"$BUILD/build.log" 2>&1; then
  cat "$BUILD/build.log" >&2; exit 1
fi
echo "$BUILD/edgetl-device"
