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


# ---------------------------------------------------------------------------------------------- doors and core
CORE = PKG / "core"
# the trainer mixin, engines, TRL, callback, axolotl
DOORS = sorted(p for p in LIBRARY if CORE not in p.parents)


def test_the_doors_use_the_core_only_through_its_exports():
    """``trainer_mixin.py``, ``engines.py``, ``trl.py``, ``callback.py``, ``axolotl/*`` import the framework-free
    core only as ``from balora_plugins.core import <name in core.__all__>`` — never a core submodule."""
    import balora_plugins.core as core

    assert len(DOORS) >= 8
    problems = []
    for path in DOORS:
        for mod, names in _imports(path):
            if mod.startswith("balora_plugins.core."):
                problems.append(f"{path.relative_to(PKG)} imports {mod} (use balora_plugins.core)")
            elif mod == "balora_plugins.core":
                problems += [
                    f"{path.relative_to(PKG)} imports {n!r}, not in balora_plugins.core.__all__"
                    for n in names
                    if n not in core.__all__
                ]
    assert not problems, "; ".join(problems)


def test_the_core_holds_no_trainer_or_engine_settings_code():
    """The core sees tensors and modules; accelerate objects and Trainers are the doors' (``engines.py``)."""
    problems = []
    for path in sorted(CORE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for mod, _ in _imports(path):
            host = mod.split(".")[0] in ("accelerate", "trl", "axolotl")
            if host or mod.startswith("transformers.trainer"):
                problems.append(f"core/{path.name} imports {mod}")
        for word in ("accelerator.state", "fsdp_plugin", "deepspeed_plugin", "self.accelerator"):
            if word in text:
                problems.append(f"core/{path.name} reads {word}")
    assert not problems, "; ".join(problems)


# ---------------------------------------------------------------------------------------------- private names
ROOT = PKG.parent
OURS = sorted(
    p for d in ("balora_plugins", "integrations", "tests") for p in (ROOT / d).rglob("*.py") if p.is_file()
)


def _defined_private(tree: ast.AST) -> set[str]:
    """The ``_names`` a module defines: functions, classes, methods, globals, class and ``self._x`` attributes
    (not ``obj._x = ...`` on another library's object, e.g. PEFT's ``_active_adapter``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _private_uses(tree: ast.AST) -> list[tuple[int, str, str]]:
    """(line, name, how) for every ``from X import _name``, ``obj._name`` and ``getattr/setattr(obj, "_name")``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            out += [(node.lineno, a.name, f"imports {a.name} from {node.module}") for a in node.names]
        elif isinstance(node, ast.Attribute):
            out.append((node.lineno, node.attr, f"reads .{node.attr}"))
        elif isinstance(node, ast.Call):
            fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            strings = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if fn in ("getattr", "setattr", "hasattr", "delattr") and strings:
                out.append((node.lineno, strings[0], f'{fn}(..., "{strings[0]}")'))
    return [(line, n, how) for line, n, how in out if n.startswith("_") and not n.startswith("__")]


def _host_names() -> set[str]:
    """Private names the frameworks own that our code sets, overrides or reads (TRL's model-card attributes and
    metric store, the ``Trainer`` methods the mixin overrides, torch's tensor and module internals): theirs."""
    import torch
    import transformers

    hosts = (transformers.Trainer, torch.Tensor, torch.nn.Module)
    return {"_tag_names", "_name", "_paper", "_metrics"} | {n for h in hosts for n in dir(h) if n[:1] == "_"}


def test_no_module_reads_another_modules_private_names():
    """What a module offers another is public: no ``_name`` defined in one of the package's, the recipes' or the
    tests' files is imported, read or overridden in another (the framework's own internals aside). Finds, e.g., a
    door calling the trainer mixin's ``_balora_setup`` or a test reading the callback's ``_host_cls``."""
    host = _host_names()
    trees = {p: ast.parse(p.read_text(encoding="utf-8")) for p in OURS}
    own = {p: _defined_private(t) for p, t in trees.items()}
    owners: dict[str, set[pathlib.Path]] = {}
    for p, names in own.items():
        for n in names:
            owners.setdefault(n, set()).add(p)
    problems = []
    for path, tree in trees.items():
        for line, name, how in _private_uses(tree):
            elsewhere = owners.get(name, set()) - {path}
            if name in own[path] or not elsewhere or name in host:
                continue
            problems.append(f"{path.relative_to(ROOT)}:{line} {how} (defined in {sorted(elsewhere)[0].name})")
    assert not problems, "\n".join(problems)
