"""Every :class:`~balora_plugins.BALoRAConfig` setting as an optional ``balora_*`` dataclass field, for argument
parsers: ``HfArgumentParser`` / ``TrlParser`` scripts, their ``--config`` YAML files, and trackers that record the
training arguments.

The fields are generated from ``BALoRAConfig``'s own dataclass fields (:func:`add_balora_fields`): the type, the
allowed values of a choice field (a ``Literal``, which argparse lists) and the help text in ``metadata["help"]``
(where ``HfArgumentParser`` reads it), so a new setting is an argument at once — as the axolotl YAML keys
(``balora_plugins/axolotl/args.py``) are generated from the same fields. ``balora_preset`` picks the preset the
other fields override; an unset (None) field takes the preset's value. ``task`` is not a field: the preset fixes
it. :class:`BALoRAArguments` is the stand-alone dataclass; ``balora_plugins.trl.BALoRASFTConfig`` is TRL's
``SFTConfig`` with the same fields.

One field is not a ``BALoRAConfig`` setting: ``balora_init`` (``adapter_init=True``, the TRL door only), the PEFT
initialisation of the adapter a trainer builds from a ``peft_config``. It belongs to the door that creates the
adapter, not to the regularizers: the callback receives an adapter already initialised, axolotl has its own key
(``peft_init_lora_weights``), and ``balora_config.json`` describes the terms while the adapter's own
``adapter_config.json`` records its initialisation.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal, get_type_hints

from .config import FIELD_CHOICES, PRESETS, BALoRAConfig

__all__ = [
    "BALoRAArguments",
    "BALoRAFields",
    "INIT_FIELD",
    "add_balora_fields",
    "balora_field_names",
    "parse_adapter_init",
]

PREFIX = "balora_"
DEFAULT_PRESET = "iclr2026-nlg"
EXCLUDED = ("task",)  # the preset fixes the task
INIT_FIELD = "balora_init"
PAPER_INIT = "pissa_niter_16"
NAMED_INITS = ("pissa", "olora", "gaussian")
INIT_HELP = (
    f"BA-LoRA: PEFT initialisation of the LoRA adapter the trainer builds from peft_config: `{PAPER_INIT}` (the "
    "paper's recipe), `pissa_niter_N`, `pissa` (exact SVD), `olora`, `gaussian`, or `lora` (PEFT's default, "
    "init_lora_weights=True). Unset: the peft_config's own init_lora_weights (and a warning when that is plain "
    "LoRA)."
)


def parse_adapter_init(value: str | None) -> bool | str | None:
    """The PEFT ``init_lora_weights`` a ``balora_init`` value names (``lora`` -> True; None stays None)."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text == "lora":
        return True
    if text in NAMED_INITS or re.fullmatch(r"pissa_niter_[1-9][0-9]*", text):
        return text
    raise ValueError(
        f"{INIT_FIELD}={value!r} is not allowed; choose {PAPER_INIT} (the paper's), pissa_niter_N, pissa, olora, "
        "gaussian or lora (plain LoRA init). Initialisations that need more than a name (LoftQ, CorDA, EVA, "
        "LoRA-GA) go into the LoraConfig you pass as peft_config."
    )


def balora_field_names() -> tuple[str, ...]:
    """``balora_preset``, then one ``balora_<name>`` per BALoRAConfig field (``task`` excepted), in field order."""
    return ("balora_preset",) + tuple(
        PREFIX + f.name for f in dataclasses.fields(BALoRAConfig) if f.name not in EXCLUDED
    )


def add_balora_fields(
    cls: type | None = None, *, presets: tuple[str, ...] = tuple(PRESETS), adapter_init: bool = False
) -> Any:
    """Class decorator: declare ``balora_preset`` (one of ``presets``) and the ``balora_*`` fields on ``cls``,
    then make it a dataclass. Every field is Optional with default None (= the preset's value). With
    ``adapter_init``, also ``balora_init`` (for a door that builds the adapter from a ``peft_config``)."""

    def wrap(klass: type) -> type:
        hints = get_type_hints(BALoRAConfig)
        # the class's own annotations only (a class without any would otherwise hand us its parent's dict)
        annotations = dict(klass.__dict__.get("__annotations__", {}))
        annotations["balora_preset"] = Literal[presets] | None
        klass.balora_preset = dataclasses.field(
            default=None,
            metadata={
                "help": f"BA-LoRA preset, one of {list(presets)}, that the other balora_* fields override."
            },
        )
        for f in dataclasses.fields(BALoRAConfig):
            if f.name in EXCLUDED:
                continue
            kind = Literal[FIELD_CHOICES[f.name]] if f.name in FIELD_CHOICES else hints[f.name]
            annotations[PREFIX + f.name] = kind | None
            help_text = f"BA-LoRA: {f.metadata['help']} Unset: the value of balora_preset."
            setattr(klass, PREFIX + f.name, dataclasses.field(default=None, metadata={"help": help_text}))
        if adapter_init:
            annotations[INIT_FIELD] = str | None
            setattr(klass, INIT_FIELD, dataclasses.field(default=None, metadata={"help": INIT_HELP}))
        klass.__annotations__ = annotations
        return dataclasses.dataclass(klass)

    return wrap if cls is None else wrap(cls)


class BALoRAFields:
    """Methods of a dataclass carrying the ``balora_*`` fields (:func:`add_balora_fields`)."""

    def to_balora_config(self, default_preset: str = DEFAULT_PRESET) -> BALoRAConfig:
        """The :class:`~balora_plugins.BALoRAConfig` these fields describe: ``balora_preset`` (else
        ``default_preset``) with every set field as an override. Errors name the ``balora_*`` field."""
        preset = getattr(self, "balora_preset", None) or default_preset
        overrides = {k[len(PREFIX) :]: getattr(self, k) for k in balora_field_names()[1:]}
        try:
            return BALoRAConfig.from_preset(preset, **{k: v for k, v in overrides.items() if v is not None})
        except ValueError as exc:  # BALoRAConfig names its fields; the user wrote balora_* arguments
            raise ValueError(re.sub(r"BALoRAConfig\.(\w+)", PREFIX + r"\1", str(exc))) from None

    def adapter_init(self) -> bool | str | None:
        """The PEFT ``init_lora_weights`` that ``balora_init`` asks for (None: unset, or no such field)."""
        return parse_adapter_init(getattr(self, INIT_FIELD, None))

    def set_balora_fields(self, config: BALoRAConfig, preset: str | None = None) -> None:
        """Write every setting of ``config`` into the ``balora_*`` fields (and ``balora_preset``)."""
        self.balora_preset = preset
        for name in balora_field_names()[1:]:
            setattr(self, name, getattr(config, name[len(PREFIX) :]))


@add_balora_fields
class BALoRAArguments(BALoRAFields):
    """The ``balora_*`` arguments on their own, for a script's parser::

        parser = HfArgumentParser([ScriptArguments, TrainingArguments, BALoRAArguments])
        script, training, balora = parser.parse_args_into_dataclasses()
        callback = BALoRACallback(balora.to_balora_config())

    or as a parent of an ``argparse`` parser: ``HfArgumentParser(BALoRAArguments, add_help=False)``.
    """
