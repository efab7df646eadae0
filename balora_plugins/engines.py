"""The training engines a Trainer runs BA-LoRA under: DeepSpeed, FSDP1, FSDP2 (docs/distributed.md).

What BA-LoRA needs to know about the *engine settings* — the accelerate and DeepSpeed objects a ``Trainer`` (the
shared :class:`~balora_plugins.trainer_mixin.BALoRATrainerMixin`, the axolotl plugin) runs with — in one place,
beside the trainer mixin. How sharded *weights* are read and written is the framework-free core's
(:mod:`balora_plugins.core.distributed`); this module never touches a tensor's shards itself.

* :func:`check_engine` — refuses, at construction, the settings BA-LoRA cannot train or save correctly.
* :func:`full_state_dict_saving` — FSDP saves adapter files also under ``SHARDED_STATE_DICT``.
* :func:`prepare_reference_model` — an explicit ``ref_model=`` placed like TRL places a teacher or reference model
  (``trl.models.utils.prepare_deepspeed``): sharded with the run's ZeRO-3 config, else ZeRO off.
* :func:`zero3_config_for_adapter_init` — lets PEFT's PiSSA init see ZeRO-3-partitioned base weights whole
  (axolotl).
* :func:`zero_stage` / :func:`config_zero_stage` / :func:`fsdp_version` — which engine a run or a config names.

Nothing here imports DeepSpeed or accelerate unless the trainer already uses them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from torch import nn

from .core import is_partitioned, quantized_layer_types

__all__ = [
    "check_engine",
    "config_zero_stage",
    "fsdp_version",
    "full_state_dict_saving",
    "package_version",
    "prepare_reference_model",
    "zero3_config_for_adapter_init",
    "zero_stage",
]


def _has_4bit_residual(model: nn.Module) -> bool:
    """A 4-bit base under a PiSSA-type adapter (its config names a pissa init; docs/qlora.md)."""
    configs = getattr(model, "peft_config", None) or getattr(
        getattr(model, "module", None), "peft_config", {}
    )
    pissa = any(
        str(getattr(c, "init_lora_weights", "")).lower().startswith("pissa") for c in configs.values()
    )
    return pissa and "Linear4bit" in quantized_layer_types(model)


def zero_stage(accelerator: Any) -> int | None:
    """The DeepSpeed ZeRO stage of a run prepared by ``accelerator`` (None without DeepSpeed)."""
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if plugin is None:
        return None
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0) or 0)


def config_zero_stage(config: Any) -> int | None:
    """The ZeRO stage a DeepSpeed config names: a dict, a JSON file path (axolotl's ``deepspeed:``), or None.
    None when there is no config or the file cannot be read (axolotl reports a missing file itself)."""
    if isinstance(config, str):
        if not os.path.isfile(config):
            return None
        with open(config, encoding="utf-8") as f:
            config = json.load(f)
    if not isinstance(config, dict):
        return None
    return int((config.get("zero_optimization") or {}).get("stage", 0) or 0)


def fsdp_version(accelerator: Any) -> int | None:
    """1 or 2 when ``accelerator`` runs FSDP, else None."""
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    return None if plugin is None else int(getattr(plugin, "fsdp_version", 1) or 1)


def check_engine(accelerator: Any, model: nn.Module | None = None) -> None:
    """Refuse, before step 1, engine settings BA-LoRA cannot train or save correctly (docs/distributed.md).

    Every message names the engine, the setting and what to use instead. ``model``: the trained model, for the
    checks that depend on it (a 4-bit QPiSSA residual under ZeRO-3).
    """
    stage = zero_stage(accelerator)
    if stage == 3 and model is not None and _has_4bit_residual(model):
        raise ValueError(
            "DeepSpeed ZeRO-3 with a PiSSA adapter on a 4-bit base (QPiSSA): its re-quantised residual lives in "
            "bitsandbytes' packed 4-bit storage, which ZeRO-3 partitions; this is not supported. Use ZeRO-2 "
            "(the authors' setup), DDP, or QLoRA with plain init under ZeRO-3 (docs/qlora.md)."
        )
    if stage == 3:
        zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        key = "stage3_gather_16bit_weights_on_model_save"
        gather = zero.get(key, zero.get("gather_16bit_weights_on_model_save", False))
        if str(gather).lower() != "true":
            raise ValueError(
                f"DeepSpeed ZeRO-3 with zero_optimization.{key}={gather!r}: the trainer then saves no adapter weights "
                "(only DeepSpeed's sharded checkpoint), so BA-LoRA has no adapter to convert to plain LoRA. Set "
                f'"{key}": true in the DeepSpeed config (axolotl\'s zero3*.json do), or use ZeRO-2.'
            )
    if fsdp_version(accelerator) == 1:
        plugin = accelerator.state.fsdp_plugin
        if str(getattr(plugin, "use_orig_params", True)).lower() == "false":
            raise ValueError(
                "FSDP1 with use_orig_params=false: the LoRA layers' parameters become flat shards, so BA-LoRA can "
                "neither switch to its reference adapter nor save it. Set fsdp_config use_orig_params: true "
                "(accelerate's default), or use FSDP2 (fsdp_version: 2)."
            )
        peft = package_version("peft")
        if peft is not None and peft >= (0, 21):
            raise ValueError(
                f"FSDP1 (fsdp_version: 1) with PEFT {'.'.join(map(str, peft))}: PEFT 0.21 saves an empty adapter "
                "under FSDP1 (it matches the adapter's keys against module names that still carry FSDP1's wrapper "
                "prefix), so the trained adapter and its plain-LoRA conversion would be lost. Use FSDP2 "
                "(fsdp_version: 2), DeepSpeed, or PEFT 0.20."
            )
    parallel = getattr(accelerator, "parallelism_config", None)
    for flag, name in (
        ("cp_enabled", "context parallelism (cp_size)"),
        ("sp_enabled", "sequence parallelism"),
    ):
        if getattr(parallel, flag, False):
            raise ValueError(
                f"{name} > 1: each rank then holds a slice of every sequence, while BA-LoRA's reference forward runs "
                "the whole backbone outside the host's sequence-sharding context and its SVD term needs whole "
                "micro-batches. Shard the model instead (DeepSpeed ZeRO-3 or FSDP2) and keep cp_size/sp_size at 1."
            )


def package_version(package: str) -> tuple[int, ...] | None:
    """The installed release of ``package`` as (major, minor), or None when it is not installed."""
    try:
        return tuple(int(x) for x in version(package).split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return None


@contextlib.contextmanager
def full_state_dict_saving(accelerator: Any) -> Iterator[None]:
    """Inside, an FSDP run saves full state dicts (the recipe TRL and PEFT give for saving an adapter under FSDP).

    With ``state_dict_type: SHARDED_STATE_DICT`` (accelerate's default for FSDP2) ``Trainer.save_model`` writes no
    adapter at all, so neither the adapter nor BA-LoRA's reference and plain-LoRA export would reach the output
    folder. The checkpoints' resumable model and optimizer shards keep the configured type; only the adapter
    files are written from a full state dict (gathered to the main process on CPU).
    """
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if plugin is None or "FULL_STATE_DICT" in str(plugin.state_dict_type):
        yield
        return
    saved = (plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config)
    plugin.state_dict_config = plugin.optim_state_dict_config = None
    plugin.set_state_dict_type("FULL_STATE_DICT")
    try:
        yield
    finally:
        plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config = saved


def prepare_reference_model(ref_model: nn.Module, accelerator: Any) -> nn.Module:
    """Place an explicit reference model for the run, as TRL places its reference/teacher models.

    DeepSpeed: wrapped by ``deepspeed.initialize`` for inference with the run's config (ZeRO-3: sharded like the
    trained model; ZeRO-1/2: ZeRO off, one copy per rank), optimizer and scheduler blocks removed — TRL's
    ``prepare_deepspeed``. Other engines: moved to the run's device (one copy per rank).
    """
    stage = zero_stage(accelerator)
    if stage is None:
        return ref_model.to(accelerator.device)
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    hidden = getattr(getattr(ref_model, "config", None), "hidden_size", None)
    if stage == 3 and hidden is not None:
        zero = config["zero_optimization"]
        for key, value in (
            ("reduce_bucket_size", hidden * hidden),
            ("stage3_param_persistence_threshold", 10 * hidden),
            ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
        ):
            if zero.get(key, "auto") == "auto":
                zero[key] = value
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    config["zero_optimization"].pop("offload_optimizer", None)
    if stage != 3:
        config["zero_optimization"]["stage"] = 0
    # values transformers fills only when the trained model's engine starts: DeepSpeed's defaults instead
    _drop_auto(config)
    engine, *_ = deepspeed.initialize(model=ref_model, config=config)
    engine.eval()
    return engine


def _drop_auto(config: dict) -> None:
    """Remove every ``"auto"`` value from a DeepSpeed config, in place (nested blocks too)."""
    for key, value in list(config.items()):
        if isinstance(value, dict):
            _drop_auto(value)
        elif value == "auto":
            del config[key]


def zero3_config_for_adapter_init(config: Any, model: nn.Module) -> Any:
    """A registered DeepSpeed config while PEFT initialises adapters on a ZeRO-3-partitioned model, or None.

    PEFT gathers a partitioned base weight for PiSSA's SVD only when transformers reports ZeRO-3
    (``is_deepspeed_zero3_enabled``, which reads a *weak* reference to the live ``HfDeepSpeedConfig``). axolotl
    0.19 - 0.21 loads the model partitioned but drops its config object before the LoRA adapter is created, so
    PiSSA would factorise empty placeholders. The caller keeps the returned object alive for the run.
    """
    if not config or not any(is_partitioned(p) for p in model.parameters()):
        return None
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return None
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    return HfDeepSpeedConfig(config.to_dict() if hasattr(config, "to_dict") else config)
