"""The package's shape (docs/architecture.md): imports run one way, and importing edgetl changes nothing."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: lower layers first; a module may import its own layer and those below it
LAYERS = {
    **dict.fromkeys(
        ["_files", "_rss", "_format", "_allocator", "errors", "_torchvision_compat", "_torchvision_hook", "_typed_json", "_device_state"], 0
    ),
    "nn": 1,
    "models": 2,
    "data": 2,
    "train": 3,
    "profiler": 4,
    "exporter": 5,
    "fleet": 6,
    "cli": 7,
    "__init__": 8,
    "__main__": 8,
}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_imports_run_one_way_and_never_through_the_package_face():
    upward = []
    for path in (ROOT / "edgetl").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        src = "__init__" if name == "edgetl.__init__" else _layer(name)
        for node in ast.walk(ast.parse(path.read_text())):
            targets = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            targets += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for target in targets:
                if target.split(".")[0] != "edgetl":
                    continue
                if target == "edgetl" and src != "__init__":
                    upward.append(f"{name} imports the package face")
                elif LAYERS[_layer(target)] > LAYERS[src]:
                    upward.append(f"{name} imports {target}")
    assert upward == []


def test_importing_edgetl_loads_nothing_heavy_and_changes_no_environment():
    code = (
        "import os, sys, json; before = dict(os.environ); import edgetl; "
        "print(json.dumps({'torch': 'torch' in sys.modules, 'same_env': dict(os.environ) == before, "
        "'lazy': edgetl.TrainPolicy.__name__}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)})
    assert done.stdout.strip() == '{"torch": false, "same_env": true, "lazy": "TrainPolicy"}', done.stderr[-500:]


def test_the_package_face_names_each_public_name_once():
    """``_EXPORTS`` owns the public names (``__all__`` is made from it), each resolved from its module."""
    import edgetl

    assert edgetl.__all__ == sorted(edgetl._EXPORTS)
    assert all(getattr(importlib.import_module(m), name) is getattr(edgetl, name) for name, m in edgetl._EXPORTS.items())


def test_no_import_cycles_between_modules():
    """Module-level imports inside edgetl form no cycle (a lazy import in a function counts too)."""
    graph: dict[str, set[str]] = {}
    paths = list((ROOT / "edgetl").rglob("*.py"))
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in paths}
    for path in paths:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgetl."):
                # `from edgetl.exporter import _executorch` imports the submodule, not the package's __init__
                subs = {f"{node.module}.{a.name}" for a in node.names}
                targets |= subs & modules or {node.module}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("edgetl.")}
        graph[name] = {t for t in targets if t != name}
    cycles = []
    for a, outs in graph.items():
        for b in outs:
            if a in graph.get(b, set()):
                cycles.append(tuple(sorted((a, b))))
    assert sorted(set(cycles)) == []
