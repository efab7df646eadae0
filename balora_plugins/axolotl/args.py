"""The BA-LoRA plugin's YAML keys: a pydantic model axolotl merges into its config schema.

Every :class:`~balora_plugins.config.BALoRAConfig` field ``x`` (except ``task``: axolotl trains causal LMs) is
the key ``balora_x``, with the field's type, help text and allowed values; ``balora_preset`` picks the preset
the other keys override. An unset key takes the preset's value. The after-validator builds the
``BALoRAConfig`` (so its own validation runs at config time, with the YAML key in the message); the
before-validator refuses axolotl settings BA-LoRA cannot train correctly.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import BaseModel, BeforeValidator, Field, create_model, model_validator

from ..config import (
    CONSISTENCY_SCHEDULES,
    FORMULATIONS,
    ON_NONFINITE,
    PRESETS,
    REFERENCES,
    REGULARIZER_SCHEDULES,
    SVD_NORMS,
    BALoRAConfig,
)

PLUGIN = "balora_plugins.axolotl.BALoRAPlugin"
PREFIX = "balora_"
DEFAULT_PRESET = "iclr2026-nlg"
NLG_PRESETS = tuple(name for name, values in PRESETS.items() if values["task"] == "nlg")
EXCLUDED = ("task",)  # axolotl trains causal LMs: always "nlg"
CHOICES: dict[str, tuple[str, ...]] = {
    "formulation": FORMULATIONS,
    "svd_norm": SVD_NORMS,
    "consistency_schedule": CONSISTENCY_SCHEDULES,
    "regularizer_schedule": REGULARIZER_SCHEDULES,
    "reference": tuple(r for r in REFERENCES if r != "model"),  # axolotl cannot hand over a second model
    "on_nonfinite": ON_NONFINITE,
}
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


def _field_type(name: str, hint: Any) -> Any:
    if name in CHOICES:
        return Literal[CHOICES[name]]
    if hint in (int, float, float | None):  # float | None: the adaptive λ1 bounds
        return Annotated[hint, BeforeValidator(_not_bool)]
    return hint


def balora_keys() -> dict[str, dataclasses.Field]:
    """YAML key -> the BALoRAConfig field it sets (``balora_preset`` excluded)."""
    return {PREFIX + f.name: f for f in dataclasses.fields(BALoRAConfig) if f.name not in EXCLUDED}


def balora_config_from_cfg(cfg: Mapping[str, Any]) -> BALoRAConfig:
    """The BALoRAConfig an axolotl config (validated or raw) describes; errors name the YAML key."""
    preset = cfg.get("balora_preset") or DEFAULT_PRESET
    if preset not in NLG_PRESETS:
        raise ValueError(
            f"balora_preset={preset!r} is not allowed; axolotl trains causal LMs, choose one of {list(NLG_PRESETS)}."
        )
    overrides = {f.name: cfg[key] for key, f in balora_keys().items() if cfg.get(key) is not None}
    try:
        return BALoRAConfig.from_preset(preset, **overrides)
    except ValueError as exc:  # BALoRAConfig names its fields; the user wrote YAML keys
        raise ValueError(re.sub(r"BALoRAConfig\.(\w+)", PREFIX + r"\1", str(exc))) from None


def plugin_listed(cfg: Mapping[str, Any]) -> bool:
    """Whether ``cfg`` lists the plugin (axolotl keeps plugins of earlier configs registered in-process)."""
    return PLUGIN in (cfg.get("plugins") or [])


def check_host_settings(data: Mapping[str, Any]) -> None:
    """Refuse axolotl settings with which BA-LoRA would train wrongly or not at all (errors name the key)."""
    known = set(balora_keys()) | {"balora_preset"}
    unknown = sorted(k for k in data if isinstance(k, str) and k.startswith(PREFIX) and k not in known)
    if unknown:
        hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        raise ValueError(
            "unknown BA-LoRA key(s) "
            + ", ".join(f"{k!r}" + (f" (did you mean {m[0]!r}?)" if m else "") for k, m in hints.items())
            + f"; the keys are {sorted(known)}."
        )
    for key in ("rl", "reward_model", "process_reward_model"):
        if data.get(key):
            raise ValueError(
                f"{key}={data[key]!r}: the BA-LoRA plugin supports supervised fine-tuning only (its trainer "
                "subclasses axolotl's SFT trainer); preference/RL and reward-model trainers would run WITHOUT the "
                f"regularizers. Remove `{key}` or remove the plugin and the balora_* keys."
            )
    if data.get("adapter") != "lora":
        raise ValueError(
            f"adapter={data.get('adapter')!r}: BA-LoRA needs `adapter: lora` (PiSSA via `peft_init_lora_weights: "
            "pissa` or `pissa_niter_16`, or plain LoRA init). QLoRA's quantised base cannot hold PiSSA's residual "
            "and full fine-tuning has no adapter to regularize."
        )
    if data.get("relora"):
        raise ValueError(
            "relora=True: ReLoRA merges and re-initialises the adapter during training, which invalidates "
            "BA-LoRA's frozen initial-adapter reference. Remove `relora`."
        )
    for key in ("context_parallel_size", "sequence_parallel_degree"):
        if (data.get(key) or 1) > 1:
            raise ValueError(
                f"{key}={data[key]!r}: each rank then holds a slice of every sequence, while BA-LoRA's reference "
                "forward runs the whole backbone outside axolotl's sequence-parallel attention and its SVD term "
                f"needs whole micro-batches. Remove `{key}`; shard the model with `deepspeed:` (ZeRO-3) or "
                "`fsdp_config:` instead."
            )
    on = [k for k in UNVERIFIED_KERNELS if data.get(k)]
    if on:
        raise ValueError(
            f"{', '.join(f'{k}=True' for k in on)}: {KERNEL_REASON}. Set "
            + ", ".join(f"`{k}: false`" for k in on)
            + " (the plugin sets unset kernel keys to false before axolotl would auto-enable them)."
        )


class _BALoRAArgsBase(BaseModel):
    balora_preset: Literal[NLG_PRESETS] | None = Field(
        default=None,
        description=f"BA-LoRA preset the other balora_* keys override (default {DEFAULT_PRESET!r}).",
    )

    @model_validator(mode="before")
    @classmethod
    def _balora_check_host(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and plugin_listed(data):
            check_host_settings(data)
        return data

    @model_validator(mode="after")
    def _balora_check_config(self) -> Any:
        balora_config_from_cfg({k: getattr(self, k, None) for k in (*balora_keys(), "balora_preset")})
        return self


_HINTS = get_type_hints(BALoRAConfig)
BALoRAArgs = create_model(
    "BALoRAArgs",
    __base__=_BALoRAArgsBase,
    __module__=__name__,
    __doc__="Input args for BA-LoRA (one key per BALoRAConfig field, prefixed `balora_`).",
    **{
        key: (_field_type(f.name, _HINTS[f.name]) | None, Field(default=None, description=f.metadata["help"]))
        for key, f in balora_keys().items()
    },
)
