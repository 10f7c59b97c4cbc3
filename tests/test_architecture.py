"""The package layering of docs/architecture.md, held by parsing every import (lazy ones inside
functions included): no package imports one above it, and no import cycle exists."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "deepsuite"

# part of deepsuite -> the parts it may import (besides itself); docs/architecture.md draws it
ALLOWED: dict[str, set[str]] = {
    "layers": set(),
    "atomic": set(),
    "host_sync": set(),
    "errors": set(),
    "runlog": {"atomic", "errors"},
    "config": {"layers", "errors"},
    "plotting": {"runlog", "errors"},
    "summary": {"runlog", "errors"},
    "distributed": {"layers", "config", "errors"},
    "data": {"config", "atomic", "layers", "errors"},  # layers.attention.doc_mask: docs/architecture.md
    "models": {"layers", "config", "distributed", "errors"},
    "planner": {"layers", "config", "distributed", "models", "errors"},
    "checkpoint": {"layers", "config", "distributed", "models", "atomic", "errors"},
    "training": {
        "layers", "config", "distributed", "models", "data", "checkpoint", "atomic", "runlog",
        "plotting", "errors",
    },
    "cli": {
        "config", "models", "training", "plotting", "summary", "planner", "checkpoint", "data",
        "errors",
    },
}  # fmt: skip
# the model definition itself: layers and its config only (parallelism is applied from outside)
MODEL_MODULES = ("deepsuite.models.deepseek", "deepsuite.models.aux_heads")
MODEL_ALLOWED = {"layers", "config", "models"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The deepsuite modules ``path`` imports, anywhere in the file (``from x import y`` counts as
    x.y when that is a module, else x; relative imports resolved)."""
    out: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        out.update(n for n in names if n == "deepsuite" or n.startswith("deepsuite."))
    return out


def _part(module: str) -> str:
    """'deepsuite.checkpoint.load' -> 'checkpoint'; 'deepsuite.runlog' -> 'runlog'."""
    return module.split(".")[1] if module.count(".") else ""


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(p, m, known) - {m} for m, p in mods.items()}


def test_every_part_is_in_the_table():
    parts = {_part(m) for m in _modules()} - {""}
    assert parts == set(ALLOWED), "add the new part to ALLOWED and to docs/architecture.md"


def test_no_part_imports_one_above_it():
    bad = []
    for module, deps in _graph().items():
        part = _part(module)
        if not part:  # deepsuite/__init__.py
            assert not deps, f"deepsuite/__init__.py imports {sorted(deps)}"
            continue
        for dep in deps:
            other = _part(dep)
            if other != part and other not in ALLOWED[part]:
                bad.append(f"{module} imports {dep} ({part} may import {sorted(ALLOWED[part])})")
    assert not bad, "\n".join(sorted(bad))


def test_the_model_and_the_layers_stay_pure():
    graph = _graph()
    for module in MODEL_MODULES:
        outside = {d for d in graph[module] if _part(d) not in MODEL_ALLOWED}
        assert not outside, f"{module} imports {sorted(outside)}"
    for module, path in _modules().items():
        if _part(module) == "layers":
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                )  # fmt: skip
                assert not any(n.startswith("torch.distributed") for n in names), module


def test_the_table_is_layered():
    """The allowed imports themselves form no cycle, so the parts can be drawn bottom to top."""
    order: list[str] = []
    left = dict(ALLOWED)
    while left:
        ready = sorted(p for p, deps in left.items() if deps <= set(order))
        assert ready, f"ALLOWED has a cycle among {sorted(left)}"
        order += ready
        for p in ready:
            del left[p]


def test_no_import_cycle_between_modules():
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 finished

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if d not in graph:
                continue
            if state.get(d) == 1:
                cycle = [*path[path.index(d) :], d] if d in path else [m, d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_readme_layout_names_every_part():
    """README's layout section lists every top-level part of the package (and nothing gone)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```")[1]
    parts = {p.stem if p.is_file() else p.name for p in PKG.iterdir() if not p.name.startswith("_")}
    parts -= {"__pycache__"}
    for part in sorted(parts):
        assert part in block, f"README layout does not mention deepsuite/{part}"
    for line in block.splitlines():
        first = line.split()[0] if line.strip() else ""
        if first.startswith(("deepsuite/", "docs/", "tests/", "benchmarks/")):
            assert (ROOT / first).exists(), f"README layout names {first}, which is absent"
