"""The documentation: a site that builds with warnings as errors, a command-line reference that
documents every flag, and pages that describe what is."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: wording that tells how the work went rather than what is
HISTORY = re.compile(r"\b(no longer|used to|before the fix|this session|fixed since|as before|another engineer|at the time of)\b", re.I)


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_the_cli_reference_documents_every_flag():
    from edgetl.cli import build_parser

    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "cli_reference.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    page = (DOCS / "cli.md").read_text()
    flags = {s for p in _parsers(build_parser()) for a in p._actions for s in a.option_strings if s not in ("-h", "--help")}
    assert len(flags) > 50 and sorted(f for f in flags if f"`{f}`" not in page) == []


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "docs.sh"), str(tmp_path / "site")], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "device.html").is_file()


def test_a_broken_link_fails_the_build(tmp_path):
    """The same build refuses a page linking to a page that does not exist (strict mode is on)."""
    docs = tmp_path / "checkout" / "docs"
    (tmp_path / "checkout" / "scripts").mkdir(parents=True)
    (tmp_path / "checkout" / "deploy").mkdir()
    for src, dst in (
        (ROOT / "scripts" / "docs.sh", "scripts/docs.sh"),
        (ROOT / "mkdocs.yml", "mkdocs.yml"),
        (ROOT / "deploy" / "README.md", "deploy/README.md"),
        (ROOT / "README.md", "README.md"),
    ):
        (tmp_path / "checkout" / dst).write_bytes(src.read_bytes())
    subprocess.run(["cp", "-r", str(DOCS), str(docs)], check=True)
    (docs / "timm.md").write_text((docs / "timm.md").read_text() + "\n[gone](no-such-page.md)\n")
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(tmp_path / "checkout" / "scripts" / "docs.sh"), str(tmp_path / "site")], capture_output=True, text=True, env=env
    )
    assert done.returncode != 0 and "no-such-page.md" in done.stdout + done.stderr


def test_the_pages_describe_what_is():
    found = [
        f"{p.name}:{n}: {line.strip()}"
        for p in [*sorted(DOCS.glob("*.md")), ROOT / "README.md", ROOT / "deploy" / "README.md"]
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if HISTORY.search(line)
    ]
    assert found == []


def test_the_readme_is_a_front_page():
    """README.md is short and leads into every guide the site has."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    linked = set(re.findall(r"\]\((docs/[a-z0-9_-]+\.md|deploy/README\.md)\)", text))
    pages = {f"docs/{p.name}" for p in DOCS.glob("*.md")} | {"deploy/README.md"}
    assert pages <= linked, sorted(pages - linked)
