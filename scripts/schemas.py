"""Write deploy/schema/*.schema.json from the Python types that write those files:

    PYTHONPATH=. python scripts/schemas.py [--check]

``--check`` writes nothing and exits 1 when a schema file differs from its type (tests run it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgetl._device_state import state_schema  # noqa: E402
from edgetl.exporter.manifest import manifest_schema  # noqa: E402

SCHEMAS = {"manifest.schema.json": manifest_schema, "state.schema.json": state_schema}


def main(argv: list[str]) -> int:
    stale = []
    for name, build in SCHEMAS.items():
        path = ROOT / "deploy" / "schema" / name
        text = json.dumps(build(), indent=2) + "\n"
        if path.is_file() and path.read_text() == text:
            continue
        if "--check" in argv:
            stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"deploy/schema/{', '.join(stale)} differ from their types: run python scripts/schemas.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
