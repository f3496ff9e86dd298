#!/usr/bin/env bash
# Build the documentation site:  scripts/docs.sh OUT_DIR  ->  OUT_DIR/index.html
#
# MkDocs with --strict: a broken link, a missing page or a page left out of the nav fails the build.
# docs/ is staged with README.md as index.md (the front page lives at the top of the checkout) and
# deploy/README.md as device.md (the device guide lives beside the runner); their links into the
# checkout (docs/X.md, deploy/README.md) become the site's.
# Installs the `docs` extra (mkdocs) into the interpreter's environment when it is missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:?usage: scripts/docs.sh OUT_DIR}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

"$PY" -c 'import mkdocs' 2>/dev/null || "$PY" -m pip install -q "mkdocs>=1.6,<2"

STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
cp -r "$ROOT/docs" "$STAGE/docs"
sed -e 's#](docs/#](#g' -e 's#](deploy/README\.md#](device.md#g' "$ROOT/README.md" >"$STAGE/docs/index.md"
sed -e 's#](\.\./docs/#](#g' "$ROOT/deploy/README.md" >"$STAGE/docs/device.md"
cp "$ROOT/mkdocs.yml" "$STAGE/mkdocs.yml"
"$PY" -m mkdocs build --strict -f "$STAGE/mkdocs.yml" -d "$OUT"
echo "docs: $OUT/index.html"
