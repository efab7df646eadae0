"""The BA-LoRA plugin's YAML keys: a pydantic model axolotl merges into its config schema.

The keys come from the shared generator (``balora_plugins/arguments.py``, door :data:`~balora_plugins.arguments.
AXOLOTL`): every :class:`~balora_plugins.config.BALoRAConfig` field ``x`` a causal LM reads is the key
``balora_x``, with the field's type, help text and allowed values (``balora_reference: model`` aside: axolotl
cannot hand over a second model); ``balora_preset`` picks the preset the other keys override. An unset key takes
the preset's value. This module adds axolotl's glue: the pydantic types, the after-validator that builds the
``BALoRAConfig`` (so its own validation runs at config time, with the YAML key in the message), and one
before-validator per rule refusing an axolotl setting BA-LoRA cannot train correctly. The same keys reach the
trainer as fields of :data:`BALoRATrainingArgsMixin` (same generator), which axolotl mixes into its
``TrainingArguments``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, create_model, model_validator

from ..arguments import (
    AXOLOTL,
    PREFIX,
    PRESET_KEY,
    Setting,
    balora_dataclass,
    balora_field_names,
    config_from_settings,
    not_offered,
    settings,
)
from ..config import BALoRAConfig
from ..core import init_is_approximate, init_rewrites_base
from ..engines import config_zero_stage
from ..trainer_mixin import refuse_overwriting_checkpoints
from . import compat

PLUGIN = "balora_plugins.axolotl.BALoRAPlugin"
ADAPTERS = ("lora", "qlora")
KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")
UNVERIFIED_KERNELS = ("lora_mlp_kernel", "lora_embedding_kernel")
KERNEL_REASON = (
    "axolotl's fused LoRA kernels replace PEFT's LoRA forward; BA-LoRA's reference forward switches adapters "
    "through PEFT's layer state, which the qkv/o kernels read per call (tests/test_axolotl.py checks the loss "
    "and gradients against PEFT's forward), while the MLP kernel (Triton SwiGLU/GeGLU, GPU only) and the "
    "embedding kernel are unverified. `lora_qkv_kernel: true` and `lora_o_kernel: true` may be set"
)


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"got the boolean {value!r}; a number is required")
    return value  # numbers, and numeric strings such as YAML's `1e-4` (PyYAML reads it as a string)


def _key_type(setting: Setting) -> Any:
    """The pydantic type of a setting: its parser type, refusing booleans where a number is due."""
    kind = setting.annotation
    return Annotated[kind, BeforeValidator(_not_bool)] if setting.numeric else kind


def balora_keys() -> dict[str, Any]:
    """YAML key -> the BALoRAConfig field (a ``dataclasses.Field``) it sets (``balora_preset`` excluded)."""
    return {s.key: s.field for s in settings(AXOLOTL)}


def balora_config_from_cfg(cfg: Mapping[str, Any]) -> BALoRAConfig:
    """The BALoRAConfig an axolotl config (validated or raw) describes; errors name the YAML key."""
    return config_from_settings(cfg, AXOLOTL)


def plugin_listed(cfg: Mapping[str, Any]) -> bool:
    """Whether ``cfg`` lists the plugin (axolotl keeps plugins of earlier configs registered in-process)."""
    return PLUGIN in (cfg.get("plugins") or [])


def _rule(check):
    """One refusal rule as a before-validator of axolotl's merged config schema, active only when the config lists
    the plugin (axolotl merges the args model of every plugin registered in the process)."""

    def validator(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and plugin_listed(data):
            check(data)
        return data

    validator.__name__ = validator.__qualname__ = f"_balora_{check.__name__}"
    validator.__doc__ = check.__doc__
    return model_validator(mode="before")(classmethod(validator))


def unknown_keys(data: Mapping[str, Any]) -> None:
    """A ``balora_*`` key that is not one of the plugin's (a typo) would be dropped by axolotl without a word."""
    known = set(balora_field_names(AXOLOTL))
    unknown = sorted(k for k in data if isinstance(k, str) and k.startswith(PREFIX) and k not in known)
    elsewhere = {k: not_offered(k, AXOLOTL) for k in unknown}
    if any(elsewhere.values()):
        raise ValueError("; ".join(why for why in elsewhere.values() if why) + ": remove the key.")
    if unknown:
        hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        raise ValueError(
            "unknown BA-LoRA key(s) "
            + ", ".join(f"{k!r}" + (f" (did you mean {m[0]!r}?)" if m else "") for k, m in hints.items())
            + f"; the keys are {sorted(known)}."
        )


def supervised_only(data: Mapping[str, Any]) -> None:
    """Preference/RL and reward-model trainers are not the SFT trainer BA-LoRA's trainer subclasses."""
    for key in ("rl", "reward_model", "process_reward_model"):
        if data.get(key):
            raise ValueError(
                f"{key}={data[key]!r}: the BA-LoRA plugin supports supervised fine-tuning only (its trainer "
                "subclasses axolotl's SFT trainer); preference/RL and reward-model trainers would run WITHOUT the "
                f"regularizers. Remove `{key}` or remove the plugin and the balora_* keys."
            )


def no_kd_trainer(data: Mapping[str, Any]) -> None:
    """axolotl's KD plugin hands out its own trainer: only one plugin's trainer class can run."""
    if data.get("kd_trainer"):
        raise ValueError(
            f"kd_trainer={data['kd_trainer']!r}: axolotl's knowledge-distillation plugin trains with its own "
            "trainer (AxolotlKDTrainer, a distillation loss on a teacher's top-k log-probabilities) and axolotl "
            "runs one plugin's trainer class only, so BA-LoRA or KD would silently not run. Distil and apply "
            "BA-LoRA in separate runs: remove `kd_trainer` (and the KD plugin) here."
        )


def lora_adapter(data: Mapping[str, Any]) -> None:
    """BA-LoRA regularizes a LoRA adapter: ``adapter: lora`` (full-precision base) or ``qlora`` (4-bit base)."""
    if data.get("adapter") not in ADAPTERS:
        raise ValueError(
            f"adapter={data.get('adapter')!r}: BA-LoRA needs `adapter: lora` (PiSSA via `peft_init_lora_weights: "
            "pissa` or `pissa_niter_16`, or plain LoRA init) or `adapter: qlora` (QPiSSA or plain LoRA init on a "
            "4-bit base). Full fine-tuning has no adapter to regularize, and other adapter types have no frozen "
            "reference BA-LoRA can switch to."
        )


def qpissa_on_4bit_only(data: Mapping[str, Any]) -> None:
    """On a quantised base the only residual init is QPiSSA: PiSSA (``pissa`` / ``pissa_niter_N``) with
    ``adapter: qlora`` + ``load_in_4bit`` (bitsandbytes), without DoRA and without DeepSpeed ZeRO-3 (docs/qlora.md)."""
    quantised = [k for k in ("load_in_4bit", "load_in_8bit") if data.get(k)]
    if data.get("adapter") == "qlora" and "load_in_4bit" not in quantised:
        quantised.append("adapter='qlora'")
    init = data.get("peft_init_lora_weights")
    if not quantised or not init_rewrites_base(init) or init_is_approximate(init):  # LoftQ: its own recipe
        return
    given = ", ".join(f"{k}=True" if k.startswith("load") else k for k in quantised)
    pissa = str(init).lower().startswith("pissa")
    if not pissa or "load_in_8bit" in quantised:
        why = (
            "QPiSSA is supported on 4-bit bitsandbytes bases only (the authors' bits=4; LLM.int8 keeps outlier "
            "columns in fp16 inside its own matmul, so a residual written back through Int8Params is not the layer "
            "it runs)"
            if pissa
            else "on a quantised base BA-LoRA supports only PiSSA's residual (QPiSSA), re-quantised from the "
            "full-precision weights"
        )
        raise ValueError(
            f"peft_init_lora_weights={init!r} with {given}: {why}. Use `adapter: qlora`, `load_in_4bit: true` and "
            "`peft_init_lora_weights: pissa_niter_16` (QPiSSA), QLoRA with plain init (remove "
            "`peft_init_lora_weights`), or an unquantised base (`adapter: lora`)."
        )
    if data.get("peft_use_dora"):
        raise ValueError(
            f"peft_use_dora=True with peft_init_lora_weights={init!r} and {given}: DoRA's magnitude is the norm of "
            "the 4-bit residual Q(W_res), not of W_res, so the model at step 0 would not be Q(W_res) + s·B0A0. "
            "Remove `peft_use_dora` (QPiSSA), or use DoRA on an unquantised base."
        )
    if config_zero_stage(data.get("deepspeed")) == 3:
        raise ValueError(
            f"peft_init_lora_weights={init!r} with {given} under DeepSpeed ZeRO-3 (deepspeed: "
            f"{data.get('deepspeed')!r}): QPiSSA writes the re-quantised residual into bitsandbytes' 4-bit "
            "layers, whose packed storage ZeRO-3 partitions; this is not supported. Use ZeRO-2 (the authors' "
            "setup), DDP, or QLoRA with plain init under ZeRO-3."
        )


def no_relora(data: Mapping[str, Any]) -> None:
    """ReLoRA re-initialises the adapter mid-run, so the frozen initial adapter stops being the reference."""
    if data.get("relora"):
        raise ValueError(
            "relora=True: ReLoRA merges and re-initialises the adapter during training, which invalidates "
            "BA-LoRA's frozen initial-adapter reference. Remove `relora`."
        )


def whole_sequences(data: Mapping[str, Any]) -> None:
    """Context / sequence parallelism gives each rank a slice of every sequence; the reference forward replays
    the whole backbone outside the sharded attention, and the SVD term needs whole micro-batches."""
    for key in ("context_parallel_size", "sequence_parallel_degree"):
        if (data.get(key) or 1) > 1:
            raise ValueError(
                f"{key}={data[key]!r}: each rank then holds a slice of every sequence, while BA-LoRA's reference "
                "forward runs the whole backbone outside axolotl's sequence-parallel attention and its SVD term "
                f"needs whole micro-batches. Remove `{key}`; shard the model with `deepspeed:` (ZeRO-3) or "
                "`fsdp_config:` instead."
            )


def verified_kernels_only(data: Mapping[str, Any]) -> None:
    """axolotl's fused LoRA kernels must read PEFT's adapter state per call for the reference switch to reach them."""
    on = [k for k in UNVERIFIED_KERNELS if data.get(k)]
    if on:
        raise ValueError(
            f"{', '.join(f'{k}=True' for k in on)}: {KERNEL_REASON}. Set "
            + ", ".join(f"`{k}: false`" for k in on)
            + " (the plugin sets unset kernel keys to false before axolotl would auto-enable them)."
        )


YAML_HINTS = dict(
    resume="set `resume_from_checkpoint: {latest}` (or `auto_resume_from_checkpoints: true`)",
    overwrite="set `balora_overwrite_output_dir: true`",
)


def no_silent_overwrite(cfg: Mapping[str, Any]) -> None:
    """A training run into an output_dir holding BA-LoRA checkpoints of an earlier run resumes it or overwrites it
    on purpose; otherwise ``FileExistsError`` naming both ways (the plugin's ``load_datasets`` hook: training only,
    before axolotl loads the data and the model; ``merge-lora`` / ``inference`` on the same config stay allowed)."""
    if cfg.get("resume_from_checkpoint") or cfg.get("auto_resume_from_checkpoints"):
        return
    overwrite = str(cfg.get("balora_overwrite_output_dir")).strip().lower()  # a YAML bool, or a CLI string
    if overwrite in ("true", "1"):
        return
    refuse_overwriting_checkpoints(str(cfg.get("output_dir") or "./model-out"), **YAML_HINTS)


def supported_release(data: Mapping[str, Any]) -> None:
    """The installed axolotl release is supported, and the config uses none of its settings BA-LoRA does not."""
    compat.check_release()
    problems = compat.unsupported_release_settings(data)
    if problems:
        raise ValueError("; ".join(problems) + ".")


class _BALoRAArgsBase(BaseModel):
    # One before-validator per rule (each names the key, the value and the fix).
    _balora_unknown_keys = _rule(unknown_keys)
    _balora_supervised_only = _rule(supervised_only)
    _balora_no_kd_trainer = _rule(no_kd_trainer)
    _balora_lora_adapter = _rule(lora_adapter)
    _balora_qpissa_on_4bit_only = _rule(qpissa_on_4bit_only)
    _balora_no_relora = _rule(no_relora)
    _balora_whole_sequences = _rule(whole_sequences)
    _balora_verified_kernels_only = _rule(verified_kernels_only)
    _balora_supported_release = _rule(supported_release)

    @model_validator(mode="after")
    def _balora_check_config(self) -> Any:
        balora_config_from_cfg({k: getattr(self, k, None) for k in TRAINING_ARGS})
        return self


# The YAML keys: one per setting the shared generator (balora_plugins/arguments.py) gives axolotl's door.
TRAINING_ARGS = balora_field_names(AXOLOTL)
BALoRAArgs = create_model(
    "BALoRAArgs",
    __base__=_BALoRAArgsBase,
    __module__=__name__,
    __doc__="Input args for BA-LoRA (one key per BALoRAConfig field axolotl can train, prefixed `balora_`).",
    **{PRESET_KEY: (Literal[AXOLOTL.presets] | None, Field(default=None, description=AXOLOTL.preset_help))},
    **{s.key: (_key_type(s) | None, Field(default=None, description=s.help)) for s in settings(AXOLOTL)},
)

# The trainer's side of the same keys, axolotl's idiom for a plugin's trainer settings (as its KD plugin's
# KDTrainingArgsMixin): `get_training_args_mixin` names this dataclass, axolotl mixes it into
# `AxolotlTrainingArguments`, `get_training_args` copies the validated YAML values into it, and the trainer
# builds its BALoRAConfig from `self.args`. The same generator, the same fields as the keys.
BALoRATrainingArgsMixin = balora_dataclass(
    "BALoRATrainingArgsMixin",
    AXOLOTL,
    module=__name__,
    doc="The balora_* settings on axolotl's TrainingArguments.",
)


def training_args_from_cfg(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``BALoRATrainingArgsMixin`` values of a validated axolotl config."""
    return {key: cfg.get(key) for key in TRAINING_ARGS}
