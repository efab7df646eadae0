"""The one generator of the ``balora_*`` settings, for every door: argument parsers (``HfArgumentParser`` /
``TrlParser`` scripts and their ``--config`` YAML files), TRL's ``SFTConfig`` (``balora_plugins.trl``), and
axolotl's YAML keys and ``TrainingArguments`` (``balora_plugins/axolotl/args.py``).

Every setting is a :class:`~balora_plugins.BALoRAConfig` dataclass field ``x`` offered as ``balora_x``
(:func:`settings`): its type, its allowed values (``FIELD_CHOICES``, a ``Literal`` that argparse lists and pydantic
checks), its help text (``metadata["help"]``) — so a new ``BALoRAConfig`` field is a setting on every door at
once. ``balora_preset`` picks the preset the other settings override; an unset (None) setting takes the preset's
value. ``task`` is not a setting: the preset fixes it. A :class:`Door` says which tasks it can train; a field is
offered where one of its tasks (``metadata["tasks"]``) can run, so the NLU-only ``reference_cache`` and
``reference_head`` are settings of :data:`ANY_TASK` (the :class:`BALoRAArguments` of callback scripts, which train
classifiers too) but not of the causal-LM doors :data:`TRL` and :data:`AXOLOTL`. :func:`config_from_settings`
builds the ``BALoRAConfig`` a door's values describe, with the ``balora_*`` names in its errors.

One field is not a ``BALoRAConfig`` setting: ``balora_init`` (``adapter_init=True``, the TRL door only), the PEFT
initialisation of the adapter a trainer builds from a ``peft_config``. It belongs to the door that creates the
adapter, not to the regularizers: the callback receives an adapter already initialised, axolotl has its own key
(``peft_init_lora_weights``), and ``balora_config.json`` describes the terms while the adapter's own
``adapter_config.json`` records its initialisation.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any, Literal, get_type_hints

from .config import FIELD_CHOICES, PRESETS, TASKS, BALoRAConfig

__all__ = [
    "ANY_TASK",
    "AXOLOTL",
    "BALoRAArguments",
    "BALoRAFields",
    "DEFAULT_PRESET",
    "Door",
    "INIT_FIELD",
    "PRESET_KEY",
    "Setting",
    "TRL",
    "add_balora_fields",
    "balora_dataclass",
    "balora_field_names",
    "config_from_settings",
    "parse_adapter_init",
    "settings",
]

PREFIX = "balora_"
PRESET_KEY = "balora_preset"
DEFAULT_PRESET = "iclr2026-nlg"
FIXED_BY_PRESET = ("task",)  # not a setting: the preset fixes it
INIT_FIELD = "balora_init"
PAPER_INIT = "pissa_niter_16"
NAMED_INITS = ("pissa", "olora", "gaussian")
INIT_HELP = (
    f"BA-LoRA: PEFT initialisation of the LoRA adapter the trainer builds from peft_config: `{PAPER_INIT}` (the "
    "paper's recipe), `pissa_niter_N`, `pissa` (exact SVD), `olora`, `gaussian`, or `lora` (PEFT's default, "
    "init_lora_weights=True). Unset: the peft_config's own init_lora_weights (and a warning when that is plain "
    "LoRA)."
)


@dataclasses.dataclass(frozen=True, eq=False)
class Door:
    """One way into BA-LoRA and what it can train.

    Attributes:
        name: how messages name it (``"axolotl"``).
        tasks: the ``BALoRAConfig.task`` values it trains; it offers the presets and the fields of these tasks.
        trains: the same in words, for messages (``"causal LMs"``).
        refused: per field, the choice values it cannot run (axolotl cannot hand over a second model).
        default_preset: the preset of an unset ``balora_preset`` (None: the caller's, see
            :func:`config_from_settings`).
    """

    name: str
    tasks: tuple[str, ...]
    trains: str
    refused: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    default_preset: str | None = DEFAULT_PRESET

    @property
    def presets(self) -> tuple[str, ...]:
        """The presets of this door's tasks, in :data:`~balora_plugins.PRESETS` order."""
        return tuple(name for name, values in PRESETS.items() if values["task"] in self.tasks)

    @property
    def limits(self) -> str:
        """Why a preset or field of another task is not here ("" when the door trains every task)."""
        return "" if set(TASKS) <= set(self.tasks) else f"{self.name} trains {self.trains} only, "

    @property
    def preset_help(self) -> str:
        default = f" Unset: {self.default_preset!r}." if self.default_preset else ""
        return f"BA-LoRA preset, one of {list(self.presets)}, that the other balora_* settings override.{default}"


ANY_TASK = Door("BALoRAArguments", TASKS, "causal LMs and classifiers", default_preset=None)
"""Scripts with the callback (``integrations/transformers/train_nlg.py``, ``train_nlu.py``): every setting."""
TRL = Door("TRL's SFTTrainer", ("nlg",), "causal LMs")
"""``BALoRASFTConfig``: causal LMs."""
AXOLOTL = Door("axolotl", ("nlg",), "causal LMs", refused={"reference": ("model",)})
"""The axolotl plugin's YAML keys and ``TrainingArguments``: causal LMs, without ``reference: model`` (axolotl
cannot hand a second model over)."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """One ``balora_*`` setting of a door: the ``BALoRAConfig`` field it sets and what the door accepts."""

    key: str  # balora_<field>
    field: dataclasses.Field  # the BALoRAConfig field
    hint: Any  # the field's type
    choices: tuple[str, ...] | None  # the allowed values on this door (None: not a choice field)

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def help(self) -> str:
        return self.field.metadata["help"]

    @property
    def annotation(self) -> Any:
        """The type a parser checks: ``Literal[choices]`` for a choice field, else the field's type."""
        return Literal[self.choices] if self.choices is not None else self.hint

    @property
    def numeric(self) -> bool:
        """An int or float setting (where a validator may refuse booleans)."""
        return self.hint in (int, float, float | None)


def offered(f: dataclasses.Field, door: Door) -> bool:
    """Whether ``door`` offers the ``BALoRAConfig`` field ``f`` (one of its ``metadata["tasks"]`` can run)."""
    return f.name not in FIXED_BY_PRESET and bool(set(f.metadata["tasks"]) & set(door.tasks))


@functools.cache
def settings(door: Door) -> tuple[Setting, ...]:
    """The ``balora_*`` settings ``door`` offers, in ``BALoRAConfig`` field order (``balora_preset`` aside)."""
    hints = get_type_hints(BALoRAConfig)
    out = []
    for f in dataclasses.fields(BALoRAConfig):
        if not offered(f, door):
            continue
        choices = FIELD_CHOICES.get(f.name)
        if choices is not None:
            choices = tuple(c for c in choices if c not in door.refused.get(f.name, ()))
        out.append(Setting(PREFIX + f.name, f, hints[f.name], choices))
    return tuple(out)


def balora_field_names(door: Door = ANY_TASK) -> tuple[str, ...]:
    """``balora_preset``, then the key of every setting of ``door``, in field order."""
    return (PRESET_KEY, *(s.key for s in settings(door)))


def not_offered(key: str, door: Door) -> str | None:
    """Why ``door`` has no setting ``key`` when another door has it (None: an unknown key, or offered)."""
    for f in dataclasses.fields(BALoRAConfig):
        if PREFIX + f.name == key and f.name not in FIXED_BY_PRESET and not offered(f, door):
            tasks = "/".join(f.metadata["tasks"])
            return f"{key} applies to task {tasks} only, and {door.name} trains {door.trains}"
    return None


def balora_names(message: str) -> str:
    """``message`` with ``BALoRAConfig.<field>`` renamed to the setting ``balora_<field>`` the user wrote."""
    return re.sub(r"BALoRAConfig\.(\w+)", PREFIX + r"\1", message)


def preset_of(values: Mapping[str, Any], door: Door, default_preset: str = DEFAULT_PRESET) -> str:
    """The preset a door's ``balora_*`` values train: ``balora_preset``, else the door's default, else
    ``default_preset``."""
    return values.get(PRESET_KEY) or door.default_preset or default_preset


def config_from_settings(
    values: Mapping[str, Any], door: Door, default_preset: str = DEFAULT_PRESET
) -> BALoRAConfig:
    """The ``BALoRAConfig`` a door's ``balora_*`` values describe: ``balora_preset`` (else the door's default,
    else ``default_preset``) with every set (not None) setting as an override. Errors name the ``balora_*`` keys."""
    preset = preset_of(values, door, default_preset)
    if preset not in door.presets:
        raise ValueError(
            f"{PRESET_KEY}={preset!r} is not allowed; {door.limits}choose one of {list(door.presets)}."
        )
    overrides = {}
    for s in settings(door):
        value = values.get(s.key)
        if value is None:
            continue
        if s.choices is not None and value in door.refused.get(s.name, ()):
            raise ValueError(
                f"{s.key}={value!r} is not available on {door.name}; choose one of {list(s.choices)}."
            )
        overrides[s.name] = value
    try:
        return BALoRAConfig.from_preset(preset, **overrides)
    except ValueError as exc:  # BALoRAConfig names its fields; the user wrote balora_* settings
        raise ValueError(balora_names(str(exc))) from None


def balora_dataclass_fields(
    door: Door, adapter_init: bool = False
) -> list[tuple[str, Any, dataclasses.Field]]:
    """``(name, type, field)`` of ``balora_preset`` and every setting of ``door`` (and ``balora_init`` with
    ``adapter_init``), each Optional with default None, the help in ``metadata["help"]`` (where
    ``HfArgumentParser`` reads it)."""
    out = [
        (
            PRESET_KEY,
            Literal[door.presets] | None,
            dataclasses.field(default=None, metadata={"help": door.preset_help}),
        )
    ]
    for s in settings(door):
        help_text = f"BA-LoRA: {s.help} Unset: the value of balora_preset."
        out.append(
            (s.key, s.annotation | None, dataclasses.field(default=None, metadata={"help": help_text}))
        )
    if adapter_init:
        out.append((INIT_FIELD, str | None, dataclasses.field(default=None, metadata={"help": INIT_HELP})))
    return out


def balora_dataclass(name: str, door: Door, *, module: str, doc: str) -> type:
    """A dataclass of ``door``'s ``balora_*`` fields alone, e.g. for a host's ``TrainingArguments`` to mix in."""
    return dataclasses.make_dataclass(
        name, balora_dataclass_fields(door), namespace={"__module__": module, "__doc__": doc}
    )


def add_balora_fields(cls: type | None = None, *, door: Door = ANY_TASK, adapter_init: bool = False) -> Any:
    """Class decorator: declare ``door``'s ``balora_*`` fields (:func:`balora_dataclass_fields`) on ``cls``, then
    make it a dataclass that remembers its door (``balora_door``, read by :class:`BALoRAFields`)."""

    def wrap(klass: type) -> type:
        # the class's own annotations only (a class without any would otherwise hand us its parent's dict)
        annotations = dict(klass.__dict__.get("__annotations__", {}))
        for name, kind, f in balora_dataclass_fields(door, adapter_init):
            annotations[name] = kind
            setattr(klass, name, f)
        klass.__annotations__ = annotations
        klass.balora_door = door  # not annotated: a class attribute, not a field
        return dataclasses.dataclass(klass)

    return wrap if cls is None else wrap(cls)


class BALoRAFields:
    """Methods of a dataclass carrying the ``balora_*`` fields (:func:`add_balora_fields`). The fields are what the
    user set; an unset one stays None (= the preset's value), and the settings that train are computed from
    them on demand (:meth:`to_balora_config`)."""

    balora_door: Door = ANY_TASK

    def balora_values(self) -> dict[str, Any]:
        """``balora_preset`` and every ``balora_*`` setting of this door as set (None: unset)."""
        return {k: getattr(self, k) for k in balora_field_names(self.balora_door)}

    def explicit_settings(self) -> tuple[str, ...]:
        """The ``balora_*`` fields the user set (not None), ``balora_preset`` included."""
        return tuple(k for k, v in self.balora_values().items() if v is not None)

    def to_balora_config(self, default_preset: str = DEFAULT_PRESET) -> BALoRAConfig:
        """The :class:`~balora_plugins.BALoRAConfig` these fields describe: ``balora_preset`` (else the door's
        default, else ``default_preset``) with every set field as an override. Errors name the ``balora_*``
        field."""
        return config_from_settings(self.balora_values(), self.balora_door, default_preset)

    def effective_settings(self, default_preset: str = DEFAULT_PRESET) -> dict[str, Any]:
        """Every ``balora_*`` field with the value that trains (unset ones: the preset's), and the preset."""
        values = self.balora_values()
        config = config_from_settings(values, self.balora_door, default_preset)
        preset = preset_of(values, self.balora_door, default_preset)
        return {PRESET_KEY: preset, **{s.key: getattr(config, s.name) for s in settings(self.balora_door)}}

    def adapter_init(self) -> bool | str | None:
        """The PEFT ``init_lora_weights`` that ``balora_init`` asks for (None: unset, or no such field)."""
        return parse_adapter_init(getattr(self, INIT_FIELD, None))


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


@add_balora_fields
class BALoRAArguments(BALoRAFields):
    """The ``balora_*`` arguments on their own, for a script's parser (every setting, NLU ones included)::

        parser = HfArgumentParser([ScriptArguments, TrainingArguments, BALoRAArguments])
        script, training, balora = parser.parse_args_into_dataclasses()
        callback = BALoRACallback(balora.to_balora_config())

    or as a parent of an ``argparse`` parser: ``HfArgumentParser(BALoRAArguments, add_help=False)``.
    """
