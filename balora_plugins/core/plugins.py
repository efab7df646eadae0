"""The pluggy plugin manager that collects the regularizer terms."""

from __future__ import annotations

import importlib

import pluggy

from . import hookspecs

_PM: pluggy.PluginManager | None = None
_BUILTIN = "balora_plugins.core.terms"


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
        builtin = importlib.import_module(_BUILTIN)
        if not pm.is_registered(builtin):
            pm.register(builtin, name="builtin")
        _PM = pm
    return _PM


def collect_terms(config, extra_plugins=()) -> list:
    """All terms for ``config``: from registered plugins, then from ``extra_plugins`` (objects or modules)."""
    pm = plugin_manager()
    terms = [t for group in pm.hook.balora_terms(config=config) for t in (group or [])]
    for plugin in extra_plugins:
        terms.extend(plugin.balora_terms(config=config) or [])
    names = [t.name for t in terms]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"BA-LoRA terms {dupes} are registered twice; each term needs a unique name.")
    order = {"consistency": 0, "diversity": 1, "svd": 2}
    return sorted(terms, key=lambda t: order.get(t.name, 3))
