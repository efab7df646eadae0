"""The wall between the library and its tools: the library never imports ``balora_plugins.tools``; the tools
use only the library's public names (no ``_private`` import, no access to a private attribute the library
defines)."""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "balora_plugins"
TOOLS = PKG / "tools"
LIBRARY = sorted(p for p in PKG.rglob("*.py") if TOOLS not in p.parents)
TOOL_FILES = sorted(TOOLS.rglob("*.py"))


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) for every import statement of ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = _module_name(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            mod = ".".join([*base, *([node.module] if node.module else [])])
            out.append((mod, [a.name for a in node.names]))
    return out


def _library_private_names() -> set[str]:
    """Every ``_name`` the library defines: functions, classes, module globals and ``self._x`` attributes."""
    names = set()
    for path in LIBRARY:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_the_layout_has_both_sides():
    assert len(LIBRARY) > 10 and len(TOOL_FILES) >= 4  # a test that walks nothing cannot fail


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(PKG)))
def test_the_library_never_imports_the_tools(path):
    bad = [
        m
        for m, names in _imports(path)
        if m.startswith("balora_plugins.tools") or (m == "balora_plugins" and "tools" in names)
    ]
    assert not bad, (
        f"{path.relative_to(PKG)} imports {bad}; the library must not depend on balora_plugins.tools"
    )


@pytest.mark.parametrize("path", TOOL_FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_the_tools_use_only_public_names_of_the_library(path):
    private = _library_private_names()
    problems = []
    for mod, names in _imports(path):
        if not mod.startswith("balora_plugins") or mod.startswith("balora_plugins.tools"):
            continue
        if any(part.startswith("_") for part in mod.split(".")):
            problems.append(f"imports private module {mod}")
        problems += [
            f"imports private {mod}.{n}" for n in names if n.startswith("_") and not n.startswith("__")
        ]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr in private:
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if owner not in ("self", "cls"):
                problems.append(f"line {node.lineno}: reads the library's private attribute .{node.attr}")
    assert not problems, f"{path.relative_to(PKG)}: " + "; ".join(problems)


def test_the_objective_never_branches_on_the_task():
    """What differs between NLG and NLU is a strategy chosen once (core/rows.py): core/objective.py reads no
    ``.task`` and threads no ``by_items`` flag."""
    tree = ast.parse((PKG / "core" / "objective.py").read_text(encoding="utf-8"))
    reads = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "task"]
    flags = [
        n.lineno
        for n in ast.walk(tree)
        if (isinstance(n, ast.Name) and n.id == "by_items")
        or (isinstance(n, ast.arg | ast.keyword) and n.arg == "by_items")
    ]
    assert not reads and not flags, (
        f"core/objective.py reads .task on lines {reads} and by_items on lines {flags}; put what differs "
        "between the tasks in core/rows.py"
    )
