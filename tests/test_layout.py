"""The package's shape, read from its source (ast, nothing imported): who may import what.

- the engine (``pipeline.engine``) imports only numpy, the standard library and itself:
  it is what a student reads, and it runs wherever numpy does;
- the fast path (``pipeline.fast``) imports the engine, never the edge (``pipeline.app``),
  tracking or figures; the engine never imports the fast path;
- only ``pipeline.tracking`` imports mlflow, and only ``pipeline.app`` imports Hydra;
- no import cycles between modules, function-level imports included;
- no private name (``_x``) imported from another subpackage;
- ``train.py`` stays a thin shell.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> Iterator[tuple[str, str | None]]:
    """(module imported from, name imported or None) for every import in module ``name``."""
    path = MODULES[name]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield base, alias.name


def _subpackage(name: str) -> str:
    return ".".join(name.split(".")[:2])


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _targets(base: str, imported: str | None) -> str | None:
    """The pipeline module an import reaches (``from pipeline.x import y``: y if a module)."""
    if imported and f"{base}.{imported}" in MODULES:
        return f"{base}.{imported}"
    return base if base in MODULES else None


def test_the_engine_imports_only_numpy_the_standard_library_and_itself():
    bad = [f"{m} imports {base}" for m in MODULES if _in(m, "pipeline.engine")
           for base, _ in _imports(m)
           if base.split(".")[0] not in STDLIB | {"numpy"} and not _in(base, "pipeline.engine")]
    assert bad == []


def test_the_fast_path_builds_on_the_engine_and_nothing_above_it():
    above = ("pipeline.app", "pipeline.tracking", "pipeline.viz", "pipeline.estimators",
             "pipeline.data")
    bad = [f"{m} imports {base}" for m in MODULES if _in(m, "pipeline.fast")
           for base, _ in _imports(m) if any(_in(base, a) for a in above)]
    bad += [f"{m} imports {base}" for m in MODULES if _in(m, "pipeline.engine")
            for base, _ in _imports(m) if _in(base, "pipeline.fast")]
    assert bad == []


@pytest.mark.parametrize(("library", "home"), [("mlflow", "pipeline.tracking"),
                                               ("hydra", "pipeline.app"),
                                               ("omegaconf", "pipeline.app")])
def test_only_one_package_imports_each_framework(library, home):
    bad = [f"{m} imports {base}" for m in MODULES for base, _ in _imports(m)
           if base.split(".")[0] == library and not _in(m, home)]
    assert bad == []


def test_no_private_name_crosses_a_subpackage():
    bad = [f"{m} imports {base}.{imported}" for m in MODULES for base, imported in _imports(m)
           if _in(base, "pipeline") and imported and imported.startswith("_")
           and not imported.startswith("__") and _subpackage(base) != _subpackage(m)]
    assert bad == []


def test_no_import_cycles():
    graph = {m: {t for base, imported in _imports(m)
                 if _in(base, "pipeline") and (t := _targets(base, imported)) not in (None, m)}
             for m in MODULES}
    # A package's __init__ that imports its own modules is not a cycle with them.
    cycles, state = [], {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = "open"
        for n in graph[m]:
            if state.get(n) == "open":
                cycles.append(" -> ".join([*trail[trail.index(n):], n]))
            elif n not in state:
                visit(n, [*trail, n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_train_py_is_a_thin_shell():
    lines = (ROOT / "train.py").read_text().splitlines()
    assert len(lines) <= 60


def test_the_mlp_class_fits_in_a_sitting():
    tree = ast.parse(MODULES["pipeline.engine.mlp"].read_text())
    (mlp,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MLP"]
    assert mlp.end_lineno - mlp.lineno + 1 < 350
