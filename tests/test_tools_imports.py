"""The tools import one way: no cycle among the modules of ``balora_plugins.tools``, counting every import
statement (one inside a function too: such an import does not remove a cycle, it hides it), and the demo's method
labels are defined once."""

from __future__ import annotations

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parent.parent / "balora_plugins"
TOOLS = PKG / "tools"


def _module(path: pathlib.Path, pkg: pathlib.Path) -> str:
    parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: pathlib.Path = TOOLS, pkg: pathlib.Path = PKG) -> dict[str, set[str]]:
    """``{module: modules of the same tree it imports}`` over every ``*.py`` under ``root``; ``from pkg import
    name`` counts as importing ``pkg.name`` when that is a module of the tree, else ``pkg``."""
    files = {_module(p, pkg): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                source = ".".join([*base, *([node.module] if node.module else [])])
                targets = [
                    f"{source}.{a.name}" if f"{source}.{a.name}" in files else source for a in node.names
                ]
            else:
                continue
            graph[mod] |= {t for t in targets if t in files and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (one per strongly connected component of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "balora_plugins" / "tools"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from balora_plugins.tools.a import y\n")
    (pkg / "c.py").write_text("from . import a\n")
    graph = import_graph(pkg, pkg=tmp_path / "balora_plugins")
    assert graph["balora_plugins.tools.c"] == {"balora_plugins.tools.a"}
    assert cycles(graph) == [["balora_plugins.tools.a", "balora_plugins.tools.b"]]


def test_the_tools_have_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 10 and any(graph.values())  # a walk over nothing cannot fail
    assert not cycles(graph), "import cycles among the tools: " + "; ".join(
        " <-> ".join(c) for c in cycles(graph)
    )


def test_the_demo_labels_are_defined_once():
    defined = [
        f"{path.relative_to(PKG)}:{node.lineno}"
        for path in sorted(TOOLS.rglob("*.py"))
        for node in ast.parse(path.read_text(encoding="utf-8")).body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "LABELS" for t in node.targets)
    ]
    assert [d.split(":")[0] for d in defined] == ["tools/demo/settings.py"], defined


def test_the_whole_package_has_no_import_cycle():
    """The same rule for the library and the tools together: imports inside functions and under ``TYPE_CHECKING``
    count, so a cycle cannot hide behind either."""
    assert cycles(import_graph(PKG)) == []
