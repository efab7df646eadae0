"""Preflight for an axolotl YAML with BA-LoRA: ``python -m balora_plugins.axolotl.check cfg.yml``.

axolotl silently drops keys no loaded plugin declares. When the ``plugins:`` line is missing or misspelled,
none of this package's code runs inside axolotl, so nothing in the plugin can object; this check (run it
before ``axolotl train``; the recipe in ``integrations/axolotl/`` does) fails when ``balora_*`` keys are present
without the plugin, and otherwise runs axolotl's own config validation with the plugin registered.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Mapping
from typing import Any


def check_config(cfg: Mapping[str, Any]):
    """Validate ``cfg`` (a parsed YAML) as ``axolotl train`` would; returns the BALoRAConfig it trains with."""
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    from .args import PLUGIN, balora_config_from_cfg

    plugins = list(cfg.get("plugins") or [])
    keys = sorted(k for k in cfg if isinstance(k, str) and k.startswith("balora"))
    if PLUGIN not in plugins:
        if not keys:
            raise ValueError(f"this config does not use BA-LoRA (no {PLUGIN!r} under `plugins:`).")
        near = difflib.get_close_matches(PLUGIN, [str(p) for p in plugins], n=1, cutoff=0.6)
        raise ValueError(
            f"BA-LoRA keys {keys} are set but {PLUGIN!r} is not listed under `plugins:`"
            + (f" (found {near[0]!r})" if near else "")
            + "; axolotl would drop the keys and train WITHOUT BA-LoRA. Add:\n"
            f"plugins:\n  - {PLUGIN}"
        )
    cfg = DictDefault(dict(cfg))
    prepare_plugins(cfg)
    return balora_config_from_cfg(validate_config(cfg))


def main(argv: list[str] | None = None) -> int:
    import yaml

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m balora_plugins.axolotl.check CONFIG.yml", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    try:
        config = check_config(cfg)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        print(f"{argv[0]}: {exc}", file=sys.stderr)
        return 1
    print(f"{argv[0]}: BA-LoRA is active with {config.to_dict()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
