"""deploy/native is held to the same bar as the Python: warning-free with -Wall -Wextra -Werror (the
build, deploy/native/CMakeLists.txt, which tests/conftest.py's runner fixture runs) and formatted as
.clang-format says (Debian's clang-format)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("src", "kernels", "tools") for p in (ROOT / "deploy" / "native" / d).glob("*") if p.suffix in (".cpp", ".h"))
CLANG_FORMAT = next(
    (shutil.which(n) for n in ("clang-format", "clang-format-14", "clang-format-16", "clang-format-19") if shutil.which(n)), None
)


def test_every_target_builds_with_warnings_as_errors():
    cmake = (ROOT / "deploy" / "native" / "CMakeLists.txt").read_text()
    targets = [line for line in cmake.splitlines() if line.startswith("target_compile_options(")]
    assert targets and all("-Wall -Wextra -Werror" in line for line in targets), targets


@pytest.mark.skipif(CLANG_FORMAT is None, reason="clang-format is not installed (scripts/setup.sh installs it)")
def test_the_native_sources_are_formatted():
    done = subprocess.run([CLANG_FORMAT, "--dry-run", "--Werror", *map(str, SOURCES)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, f"run: clang-format -i deploy/native/{{src,kernels,tools}}/*.{{cpp,h}}\n{done.stderr[:2000]}"
