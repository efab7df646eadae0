"""The pluggy plugin manager that collects the regularizer terms."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pluggy

from ..config import BALoRAConfig
from . import hookspecs, terms
from .contract import Term

_PM: pluggy.PluginManager | None = None


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with every ``balora_plugins`` entry point loaded.

    The built-in terms arrive through the same entry-point group as third-party ones; when the package runs
    from a source tree without installed metadata the built-in module is registered directly instead.
    """
    global _PM
    if _PM is None:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
        if not pm.is_registered(terms):
            pm.register(terms, name="builtin")
        _PM = pm
    return _PM


def collect_terms(config: BALoRAConfig, extra_plugins: Iterable[Any] = ()) -> list[Term]:
    """All terms for ``config``: from registered plugins, in pluggy's call order (the built-in implementation is
    ``tryfirst``, so its terms lead, in the order it returns them), then from ``extra_plugins`` (objects or
    modules with a ``balora_terms(config)`` method), in the order given."""
    pm = plugin_manager()
    found = [t for group in pm.hook.balora_terms(config=config) for t in (group or [])]
    for plugin in extra_plugins:
        found.extend(plugin.balora_terms(config=config) or [])
    names = [t.name for t in found]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"BA-LoRA terms {dupes} are registered twice; each term needs a unique name.")
    return found
