"""The one place where the supported axolotl releases differ, and what the plugin does about each difference.

Supported and tested: axolotl 0.19 (the newest release for Python 3.11; pins transformers 5.16.1, TRL 1.9.0,
PEFT 0.20.0, accelerate 1.13.0, torch 2.13) and axolotl 0.21 (Python >= 3.12; pins transformers 5.20.1,
TRL 1.14.1, PEFT 0.21.2, accelerate 1.15.0, torch 2.13-2.14). Other releases >= 0.19 are accepted with a
warning (untested); older ones are refused at config validation.

| What | 0.19 | 0.21 | The plugin |
|---|---|---|---|
| A listed plugin that fails to import | logged (``ImportError`` only), the run trains WITHOUT it | raised (listed plugins register with ``required=True``) | ``__init__`` turns the failure into a ``RuntimeError``: fatal on both |
| Plugins installed through the ``axolotl.plugins`` entry-point group | not loaded | registered for every config | every hook first checks that the config lists the plugin |
| ``on_config_validation_error`` hook (undo ``register`` side effects) | absent | called after a rejected config | not implemented: ``register`` only writes the kernel keys of the config being validated |
| ``get_training_args_mixin`` / ``get_training_args`` | present | present | the trainer reads its settings from ``self.args`` on both (no fallback needed) |
| ``nf4_backend: torchao`` (QLoRA weights as torchao ``NF4Tensor``) | absent | present | refused at validation, naming 0.21 (see ``UNSUPPORTED_VALUES``) |
| ``axolotl.core.trainers.mamba`` | present | removed | (tests use their own ``AxolotlTrainer`` subclass) |

Model-level differences (transformers 5.16 vs 5.20 on resume) live in the shared trainer mixin.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from typing import Any

from packaging.version import Version

MINIMUM = (0, 19)
TESTED = {(0, 19): "3.11", (0, 21): "3.12"}  # release -> the Python it is tested on
_PLUGIN = '"balora-plugins[axolotl]"'
INSTALL = {  # what the READMEs give per release
    (0, 19): f'pip install {_PLUGIN} "axolotl==0.19.0"  # Python 3.11',
    (0, 21): f'pip install "torch==2.14.1" && pip install {_PLUGIN} "axolotl==0.21.0"  # Python >= 3.12',
}


AXOLOTL_VERSION: str = importlib.metadata.version("axolotl")
RELEASE: tuple[int, int] = tuple(Version(AXOLOTL_VERSION).release[:2])  # (0, 21) for 0.21.0


def release_name(release: tuple[int, int] = RELEASE) -> str:
    return f"{release[0]}.{release[1]}"


def check_release(release: tuple[int, int] = RELEASE, version: str = AXOLOTL_VERSION) -> str | None:
    """Refuse releases older than the oldest supported one; return a warning for untested newer ones."""
    if release < MINIMUM:
        raise ValueError(
            f"axolotl {version}: the BA-LoRA plugin supports axolotl {release_name(MINIMUM)} and newer (tested: "
            f"{', '.join(release_name(r) for r in TESTED)}). Upgrade: {INSTALL[max(TESTED)]}"
        )
    if release not in TESTED:
        return (
            f"axolotl {version} is not a release the BA-LoRA plugin is tested with "
            f"({', '.join(release_name(r) for r in TESTED)}); its hooks are the same, but please report problems."
        )
    return None


# Settings a release offers that BA-LoRA does not support: key -> (value, first release with it, the reason).
UNSUPPORTED_VALUES: dict[str, tuple[Any, tuple[int, int], str]] = {
    "nf4_backend": (
        "torchao",
        (0, 21),
        "BA-LoRA's checks for quantised bases know bitsandbytes' quantised layers, not torchao's NF4Tensor "
        "weights inside plain Linear layers, and QLoRA with BA-LoRA is tested on bitsandbytes only; set "
        "`nf4_backend: bitsandbytes` (the default)",
    ),
}


def unsupported_release_settings(data: Mapping[str, Any]) -> list[str]:
    """Messages for the settings in ``data`` that BA-LoRA does not support, each naming the release."""
    problems = []
    for key, (value, since, reason) in UNSUPPORTED_VALUES.items():
        if data.get(key) == value:
            problems.append(f"{key}={value!r} (axolotl {release_name(since)}+): {reason}")
    return problems


def training_args_accept(names: list[str]) -> bool:
    """Whether axolotl's ``AxolotlTrainingArguments`` has the plugin's fields.

    axolotl merges every registered plugin's ``get_training_args_mixin`` into ``AxolotlTrainingArguments`` when
    ``axolotl.core.training_args`` is first imported (both releases). ``axolotl train`` registers the plugins
    first; a process that imported axolotl's trainer builder before registering the plugin (a notebook, a test)
    has a class without the fields.
    """
    import dataclasses

    from axolotl.core.training_args import AxolotlTrainingArguments

    fields = {f.name for f in dataclasses.fields(AxolotlTrainingArguments)}
    return all(n in fields for n in names)
