"""pluggy hook specifications: how a regularizer term joins the BA-LoRA objective.

The hooks name only the term contract (:mod:`balora_plugins.core.contract`). The three built-in terms
(:mod:`balora_plugins.core.terms`) are registered exactly like a third-party package's: through the
``balora_plugins`` entry-point group. To add a term without forking (docs/extending.md), ship a module
with a ``@hookimpl``-decorated ``balora_terms`` function and declare it in your ``pyproject.toml``::

    [project.entry-points.balora_plugins]
    my_term = "my_package.my_module"

or register an object at run time with ``balora_plugins.core.plugins.plugin_manager().register(obj)``.
"""

from __future__ import annotations

import pluggy

from ..config import BALoRAConfig
from .contract import Term

PROJECT = "balora_plugins"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def balora_terms(config: BALoRAConfig) -> list[Term] | None:
    """Return the :class:`~balora_plugins.core.contract.Term` objects this plugin adds for ``config``.

    Each term states its level (``"row"``: a per-row function of the logits and reference logits, computed
    chunk by chunk; ``"matrix"``: a per-micro-batch statistic of the whole logits matrix), its weight, and its
    maths. Return ``None`` or ``[]`` to add nothing for this config. The objective orders the terms as pluggy
    calls the implementations: the built-in ones first (their implementation is ``tryfirst``), then the others,
    the last registered first.
    """
