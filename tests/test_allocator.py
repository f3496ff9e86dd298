"""The process's malloc (edgetl/_allocator.py): choosing it, the environment that selects it, the
``edgetl`` command's re-execution, and what it does to a measured step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import edgetl._allocator as _allocator
from edgetl._allocator import EAGER_CONF, MARK, Allocator, reexec_argv, resolve
from edgetl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
JEMALLOC = _allocator.find_jemalloc()
needs_jemalloc = pytest.mark.skipif(JEMALLOC is None, reason="jemalloc is not installed (scripts/setup.sh installs libjemalloc2)")


def test_unknown_allocator_is_one_line():
    with pytest.raises(ConfigError, match=r"unknown allocator 'tcmalloc'; expected one of auto, glibc, jemalloc, jemalloc-eager"):
        resolve("tcmalloc")


def test_auto_falls_back_to_glibc_with_a_note_and_jemalloc_is_refused_where_missing(monkeypatch, capsys):
    monkeypatch.setattr(_allocator, "find_jemalloc", lambda: None)
    auto = resolve("auto")
    assert auto.name == "glibc" and "libjemalloc2" in auto.note
    for name in ("jemalloc", "jemalloc-eager"):
        with pytest.raises(ConfigError, match="not installed.*apt-get install libjemalloc2"):
            resolve(name)
    assert resolve("glibc") == Allocator("glibc")
    # the command logs the fallback with the run (stdout's header line), and refuses jemalloc in one line
    from edgetl.cli import main

    assert main(["finetune", "--allocator", "auto", "--data", "/nonexistent-edgetl", "--out", "/nonexistent-edgetl/out"]) == 2
    assert "(malloc: glibc; jemalloc is not installed" in capsys.readouterr().out
    assert main(["finetune", "--allocator", "jemalloc", "--data", "/nonexistent-edgetl", "--out", "/nonexistent-edgetl/out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgetl: error: allocator 'jemalloc' needs the jemalloc library, which is not installed"), err
    assert err.count("\n") == 1, err


@needs_jemalloc
def test_auto_is_jemalloc_where_installed_and_the_default_is_glibc():
    assert resolve("auto") == Allocator("jemalloc", JEMALLOC) and resolve() == Allocator("glibc")


def test_environment_selects_the_allocator_and_keeps_the_users_other_preloads():
    base = {"LD_PRELOAD": "/opt/libfoo.so /old/libjemalloc.so.2", "PATH": "/bin", "MALLOC_CONF": EAGER_CONF}
    je = Allocator("jemalloc", "/lib/libjemalloc.so.2").env(base)
    assert je["LD_PRELOAD"] == "/lib/libjemalloc.so.2 /opt/libfoo.so"  # one jemalloc, first; the user's library kept
    assert "MALLOC_CONF" not in je and je[MARK] == "jemalloc" and je["PATH"] == "/bin"  # an inherited eager setting dropped
    eager = Allocator("jemalloc-eager", "/lib/libjemalloc.so.2").env({"MALLOC_CONF": "narenas:1"})
    assert eager["LD_PRELOAD"] == "/lib/libjemalloc.so.2" and eager["MALLOC_CONF"] == EAGER_CONF
    glibc = Allocator("glibc").env(base)
    assert glibc["LD_PRELOAD"] == "/opt/libfoo.so" and glibc[MARK] == "glibc"
    assert "LD_PRELOAD" not in Allocator("glibc").env({"LD_PRELOAD": "libjemalloc.so.2"})
    assert base["LD_PRELOAD"] == "/opt/libfoo.so /old/libjemalloc.so.2"  # the caller's mapping is untouched


def test_reexec_only_when_needed_and_never_twice(monkeypatch):
    je = Allocator("jemalloc", "/lib/libjemalloc.so.2")
    monkeypatch.delenv(MARK, raising=False)
    monkeypatch.setattr(_allocator, "active", lambda: "glibc")
    assert reexec_argv(je, ["finetune", "--blocks", "2"]) == [sys.executable, "-m", "edgetl", "finetune", "--blocks", "2"]
    assert reexec_argv(Allocator("glibc"), ["finetune"]) is None
    monkeypatch.setenv(MARK, "jemalloc")  # re-executed once already, and the loader refused the library: no loop
    assert reexec_argv(je, ["finetune"]) is None


def _finetune_header(*argv: str, env: dict[str, str]) -> str:
    """The first line of an ``edgetl finetune`` that stops at once (a missing data folder)."""
    cmd = [sys.executable, "-m", "edgetl", "finetune", "--data", "/nonexistent-edgetl", "--out", "/nonexistent-edgetl/out", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 2 and "data folder not found" in done.stderr, done.stderr[-500:]
    return done.stdout.splitlines()[0]


@needs_jemalloc
def test_finetune_command_reexecutes_itself_on_the_allocator_it_names():
    env = {k: v for k, v in os.environ.items() if k not in (MARK, "LD_PRELOAD", "MALLOC_CONF")}
    # started on glibc, the command moves itself to eager jemalloc before torch loads (one process:
    # torch's import is most of this test's time; the other choices' environments are tested above)
    assert _finetune_header("--allocator", "jemalloc-eager", env=env).endswith("(malloc: jemalloc-eager)")
