#!/usr/bin/env bash
# A Debian package of the device runner:  deploy/native/package.sh ARCH OUT_DIR  (ARCH amd64 or arm64)
#   -> OUT_DIR/edgetl-device_VERSION_ARCH.deb
#
# The runner, edgetl's kernel library and ExecuTorch's runtime libraries go to
# /usr/lib/edgetl-device (found through RUNPATH $ORIGIN), /usr/bin/edgetl-device links to the
# runner; it depends on Debian 12 / Raspberry Pi OS Bookworm packages only. On the device:
#   sudo apt install ./edgetl-device_VERSION_arm64.deb
# Built with build.sh (arm64: cross-built, build.sh --target aarch64) into BUILD_DIR (default
# deploy/native/build, or build-aarch64 for arm64); VERSION is edgetl's (edgetl.__version__).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage="usage: package.sh ARCH OUT_DIR (ARCH: amd64 or arm64)"
[ $# -eq 2 ] || { echo "package.sh: $usage" >&2; exit 2; }
ARCH="$1"; OUT="$2"
case "$ARCH" in
  amd64) [ "$(uname -m)" = x86_64 ] || { echo "package.sh: amd64 is built on an x86-64 machine" >&2; exit 2; }
         TARGET=(); BUILD="${BUILD_DIR:-$HERE/build}" ;;
  arm64) if [ "$(uname -m)" = aarch64 ]; then TARGET=(); BUILD="${BUILD_DIR:-$HERE/build}"
         else TARGET=(--target aarch64); BUILD="${BUILD_DIR:-$HERE/build-aarch64}"; fi ;;
  *) echo "package.sh: unknown ARCH '$ARCH'; $usage" >&2; exit 2 ;;
esac
VERSION="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$HERE/../../edgetl/__init__.py" | head -1)"  # the version's one owner
[ -n "$VERSION" ] || { echo "package.sh: no __version__ in edgetl/__init__.py" >&2; exit 2; }
command -v dpkg-deb >/dev/null || { echo "package.sh: dpkg-deb not found (Debian's dpkg)" >&2; exit 2; }

bash "$HERE/build.sh" "${TARGET[@]}" "$BUILD" >/dev/null
mkdir -p "$OUT"
STAGE="$(mktemp -d "$OUT/.package-$ARCH.XXXXXX")"
chmod 755 "$STAGE"
trap 'rm -rf "$STAGE"' EXIT
cmake --install "$BUILD" --prefix "$STAGE/usr" --strip >/dev/null
mkdir -p "$STAGE/usr/bin" "$STAGE/DEBIAN"
ln -s ../lib/edgetl-device/edgetl-device "$STAGE/usr/bin/edgetl-device"
# Bookworm's packages of the libraries outside the private directory; libc6 at the newest glibc
# symbol version the files use (2.34: Bullseye's 2.31 cannot run the runner), libstdc++6 at GCC 9's
# (GLIBCXX_3.4.26)
GLIBC="$(readelf -V "$STAGE"/usr/lib/edgetl-device/* | grep -o 'GLIBC_2\.[0-9]*' | sort -t. -k2 -n | tail -1 | cut -d_ -f2)"
cat > "$STAGE/DEBIAN/control" <<CONTROL
Package: edgetl-device
Version: $VERSION
Architecture: $ARCH
Maintainer: edgetl <edgetl@localhost>
Installed-Size: $(du -sk "$STAGE/usr" | cut -f1)
Depends: libc6 (>= $GLIBC), libstdc++6 (>= 9), libgcc-s1 (>= 3.0), libjpeg62-turbo (>= 1:1.3.1), libpng16-16 (>= 1.6.2), libssl3 (>= 3.0.0)
Section: science
Priority: optional
Homepage: https://github.com/edgetl/edgetl
Description: on-device fine-tuning of edgetl bundles (ExecuTorch runtime)
 edgetl-device classifies images and fine-tunes a network on them with a bundle written by
 'edgetl export --training', on ExecuTorch's C++ runtime (included, in /usr/lib/edgetl-device):
 no Python, no PyTorch.
CONTROL
DEB="$OUT/edgetl-device_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$DEB" >/dev/null
echo "$DEB"
