"""The layout's rules, read from the source with ast (nothing is imported):

- no module imports another module's private name (``_name``), and a private module
  (``_scratch.py``) is imported only from inside its own package;
- the cpift import graph (every import, lazy ones inside functions included) has no cycle;
- data flows one way: kernels/ imports nothing of cpift, merge/ nothing of training/ or cli/;
- no source file is over 400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOTS = {"cpift": ROOT / "src" / "cpift"}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for name, folder in ROOTS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            found[".".join([name, *rel])] = path
    return found


MODULES = _modules()


def _package(module: str) -> str:
    path = MODULES[module]
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _nodes(tree: ast.AST):
    """Every node, less the bodies of ``if TYPE_CHECKING:`` (imports for type checkers only)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement of ``module``."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    out = []
    for node in _nodes(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package(module).split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, [a.name for a in node.names], node.lineno))
    return out


def _edges(module: str) -> set[str]:
    """The cpift modules ``module`` imports (a name that is a submodule counts as that module), and
    the packages above each, whose ``__init__`` Python runs first."""
    edges = set()
    for target, names, _ in _imports(module):
        if not target.startswith("cpift"):
            continue
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
        if subs:
            edges.update(subs)
        if target in MODULES and len(subs) < len(names) or not names:
            edges.add(target)
    for e in list(edges):
        parts = e.split(".")
        edges.update(".".join(parts[:i]) for i in range(1, len(parts)))
    edges = {e for e in edges if e in MODULES and not module.startswith(e + ".") and e != module}
    return edges


def _private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def test_the_scan_sees_every_room() -> None:
    for module in ("cpift.merge.io.stream", "cpift.merge.methods.delta", "cpift.merge.cpi.cores",
                   "cpift.kernels.backend", "cpift.errors", "cpift.cli._options"):
        assert module in MODULES
    assert "cpift.merge.io.checkpoint" in _edges("cpift.merge.engine")


def test_no_module_imports_another_modules_private_name() -> None:
    bad = []
    for module in MODULES:
        for target, names, line in _imports(module):
            if not target.startswith("cpift"):
                continue
            where = f"{MODULES[module].relative_to(ROOT)}:{line}"
            private_modules = [p for p in target.split(".") if _private(p)]
            for n in names:
                sub = f"{target}.{n}"
                if _private(n) and sub not in MODULES:
                    bad.append(f"{where}: {n} from {target}")
                elif _private(n) and _package(sub) != _package(module):
                    bad.append(f"{where}: private module {sub} from outside its package")
            if private_modules and target in MODULES and _package(target) != _package(module):
                bad.append(f"{where}: private module {target} from outside its package")
    assert not bad, "\n".join(bad)


def test_import_graph_has_no_cycle() -> None:
    graph = {m: _edges(m) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                cycle = visit(n)
                if cycle:
                    return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("package, forbidden", [
    ("cpift.kernels", ("cpift.merge", "cpift.training", "cpift.cli", "cpift.errors")),
    ("cpift.merge", ("cpift.training", "cpift.cli")),
    ("cpift.training", ("cpift.cli",)),
])
def test_imports_flow_one_way(package: str, forbidden: tuple[str, ...]) -> None:
    bad = [f"{m} imports {e}" for m in MODULES if m == package or m.startswith(package + ".")
           for e in _edges(m) if e.startswith(forbidden)]
    assert not bad, "\n".join(bad)


def test_no_source_file_is_over_400_lines() -> None:
    sources = list(MODULES.values()) + sorted((ROOT / "benchmarks").rglob("*.py"))
    long = {str(p.relative_to(ROOT)): n for p in sources if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"
