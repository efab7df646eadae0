"""What BA-LoRA needs to know about sharded training engines, in one place (docs/distributed.md).

Under DeepSpeed ZeRO-3 every parameter outside the engine's own forward is a partitioned placeholder (shape (0,),
the rank's slice in ``param.ds_tensor``); under FSDP2 it is a DTensor; under FSDP1 it is a view into the rank's
shard of a flat parameter. BA-LoRA reads three things outside the model's forward — the frozen output head (each
step), the reference adapter (when it is created, saved and restored) and, for ``reference='model'``, a second
model — so it reads them here:

* :func:`gathered` — the full parameters for the enclosed block (ZeRO-3: ``deepspeed.zero.GatheredParameters``;
  FSDP1: ``summon_full_params``). A **collective**: every rank must enter it, in the same order — as every
  function below that reads or writes sharded weights.
* :func:`gathered_copy` — a full copy of sharded tensors for one step (the head); nothing is kept afterwards.
* :func:`unsharded_root` — the root FSDP unit's own parameters (embeddings, head) whole for the reference forward.
* :func:`local_shard` — the storage this rank owns, which identifies a sharded parameter across steps (the
  Gram-factor cache keys on it: a gathered copy is a new tensor every step).
* :func:`full_adapter_state` / :func:`load_adapter_state` — an adapter's weights read whole (for saving
  ``balora_ref/``) and written back shard by shard (on resume).
* :func:`full_state_dict_saving` — FSDP saves adapter files also under ``SHARDED_STATE_DICT``.
* :func:`check_engine` — refuses, at construction, the settings BA-LoRA cannot train or save correctly.
* :func:`prepare_reference_model` — an explicit ``ref_model=`` placed like TRL places a teacher or reference model
  (``trl.models.utils.prepare_deepspeed``): sharded with the run's ZeRO-3 config, else ZeRO off.
* :func:`zero3_config_for_adapter_init` — lets PEFT's PiSSA init see ZeRO-3-partitioned base weights whole.

Nothing here imports DeepSpeed or accelerate unless the model or the trainer already uses them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .quantized import quantized_layer_types


# ---------------------------------------------------------------------------------------------- facts
def is_partitioned(t: Any) -> bool:
    """A DeepSpeed ZeRO-3 parameter (its data is a placeholder outside the engine's forward)."""
    return isinstance(t, torch.Tensor) and hasattr(t, "ds_id")


def is_fsdp1_param(t: Any) -> bool:
    """An original parameter kept by FSDP1 (``use_orig_params``): outside its unit's forward a view of the
    rank's shard of a flat parameter."""
    return (
        isinstance(t, torch.Tensor) and not hasattr(t, "full_tensor") and getattr(t, "_fsdp_flattened", False)
    )


def is_sharded(t: Any) -> bool:
    """A parameter whose full value this rank may not hold: ZeRO-3, a DTensor (FSDP2, tensor parallel), FSDP1."""
    return is_partitioned(t) or hasattr(t, "full_tensor") or is_fsdp1_param(t)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank owns for ``t``: ZeRO-3's ``ds_tensor``, a DTensor's local shard, else ``t``."""
    if is_partitioned(t):
        return t.ds_tensor
    return t.to_local() if hasattr(t, "to_local") else t


def fsdp1_root(model: nn.Module | None) -> nn.Module | None:
    """``model`` when it is an FSDP1 ``FullyShardedDataParallel`` root (the Trainer's wrapped model), else None."""
    if model is None or type(model).__name__ != "FullyShardedDataParallel":
        return None
    return model


# ---------------------------------------------------------------------------------------------- gathering
@contextlib.contextmanager
def gathered(
    params: Iterable[torch.Tensor | None], *, modifier_rank: int | None = None, fsdp1: nn.Module | None = None
) -> Iterator[None]:
    """Full values of ``params`` inside the block (a no-op for parameters that are not partitioned).

    ZeRO-3 parameters are gathered with ``deepspeed.zero.GatheredParameters``: a collective that every rank must
    enter; with ``modifier_rank`` set, that rank's in-place changes are written back to every rank's partition on
    exit. ``fsdp1``: an FSDP1 root whose flat parameters hold ``params`` (gathered with ``summon_full_params``).
    DTensors are not gathered here (read them with :func:`gathered_copy`).
    """
    zero3 = [p for p in params if is_partitioned(p)]
    with contextlib.ExitStack() as stack:
        if zero3:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(zero3, modifier_rank=modifier_rank))
        if fsdp1 is not None:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            stack.enter_context(
                FSDP.summon_full_params(fsdp1, writeback=modifier_rank is not None, recurse=True)
            )
        yield


@contextlib.contextmanager
def unsharded_root(model: nn.Module, *, fsdp2: bool = True) -> Iterator[None]:
    """The root FSDP unit's own parameters — those outside every wrapped layer: embeddings, final norm, output
    head — whole inside the block. FSDP1 always frees them after the forward, FSDP2 with
    ``reshard_after_forward`` too, and a backbone forward called directly (the reference forward) does not
    gather them. FSDP1: ``summon_full_params``; FSDP2 (``fsdp2=True``): ``unshard()`` and ``reshard()`` again,
    when they are sharded. A collective; a no-op for other engines.
    """
    root = fsdp1_root(model)
    if root is not None:
        with root.summon_full_params(root, recurse=False, writeback=False):
            yield
        return
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    embeddings = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    if not (
        fsdp2 and hasattr(model, "unshard") and hasattr(getattr(embeddings, "weight", None), "full_tensor")
    ):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def gathered_copy(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Full, detached copies of sharded ``tensors`` (None and unsharded tensors pass through unchanged).

    Collective for ZeRO-3 parameters and DTensors: every rank must call it. FSDP1 parameters are copied as they
    are: call it inside :func:`unsharded_root`. The copies live as long as the caller holds them (one step for
    the output head) — no full copy is kept by the engine or by BA-LoRA between steps.
    """
    out: list[torch.Tensor | None] = [
        t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone() if is_fsdp1_param(t) else t
        for t in tensors
    ]
    zero3 = [t for t in out if is_partitioned(t)]
    if zero3:
        with gathered(zero3):
            out = [t.detach().clone() if is_partitioned(t) else t for t in out]
    return tuple(out)


def adapter_parameters(peft_model: nn.Module, adapter: str) -> list[torch.Tensor]:
    """The parameters of PEFT adapter ``adapter`` (named ``...<adapter>...``), in module order."""
    return [p for _, p in _adapter_named(peft_model, adapter)]


def _adapter_named(peft_model: nn.Module, adapter: str) -> list[tuple[str, torch.Tensor]]:
    """(key in PEFT's saved layout, parameter) for each parameter of ``adapter``; engine wrapper names removed."""
    out = []
    for name, p in peft_model.named_parameters():
        if f".{adapter}." in name:
            for wrapper in _WRAPPER_PREFIXES:
                name = name.replace(wrapper, "")
            out.append((name.replace(f".{adapter}.", "."), p))
    return out


_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def adapter_is_sharded(peft_model: nn.Module, adapter: str, *, wrapped: nn.Module | None = None) -> bool:
    """Whether an engine shards adapter ``adapter`` (ZeRO-3, FSDP2; FSDP1 when ``wrapped`` is its root)."""
    return fsdp1_root(wrapped) is not None or any(
        is_sharded(p) for p in adapter_parameters(peft_model, adapter)
    )


def full_adapter_state(
    peft_model: nn.Module, adapter: str, *, wrapped: nn.Module | None = None, always: bool = False
) -> dict[str, torch.Tensor] | None:
    """Full CPU copies of adapter ``adapter``'s weights (PEFT's saved key layout) when an engine shards them (or
    ``always``), else None (read them with PEFT). Collective under ZeRO-3, FSDP1 (``wrapped``: the engine's
    model) and FSDP2."""
    if not always and not adapter_is_sharded(peft_model, adapter, wrapped=wrapped):
        return None
    named, fsdp1 = _adapter_named(peft_model, adapter), fsdp1_root(wrapped)
    with gathered([p for _, p in named], fsdp1=fsdp1):
        return {
            key: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
            for key, p in named
        }


def load_adapter_state(
    peft_model: nn.Module, state: dict[str, torch.Tensor], adapter: str, *, wrapped: nn.Module | None = None
) -> bool:
    """Copy full weights ``state`` (PEFT's saved key layout) into adapter ``adapter`` when an engine shards it;
    returns False, having done nothing, when it does not (load with PEFT). Collective like
    :func:`full_adapter_state`: ZeRO-3 writes rank 0's copy to every partition, FSDP1 writes back every shard,
    FSDP2 copies each rank's slice."""
    if not adapter_is_sharded(peft_model, adapter, wrapped=wrapped):
        return False
    named, fsdp1 = _adapter_named(peft_model, adapter), fsdp1_root(wrapped)
    missing = [key for key, _ in named if key not in state]
    if missing:
        raise KeyError(
            f"saved adapter weights lack {len(missing)} tensors of adapter {adapter!r}, e.g. {missing[0]!r}"
        )
    with torch.no_grad(), gathered([p for _, p in named], modifier_rank=0, fsdp1=fsdp1):
        for key, p in named:
            if hasattr(p, "full_tensor"):
                from torch.distributed.tensor import distribute_tensor

                full = state[key].to(device=p.to_local().device, dtype=p.dtype)
                p.copy_(distribute_tensor(full, p.device_mesh, p.placements))
            else:
                p.copy_(state[key].to(device=p.device, dtype=p.dtype))
    return True


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


# ---------------------------------------------------------------------------------------------- engines
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
        import json
        import os

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
        peft = _version("peft")
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


def _version(package: str) -> tuple[int, ...] | None:
    from importlib.metadata import PackageNotFoundError, version

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
    _drop_auto(
        config
    )  # values transformers fills only when the trained model's engine starts: DeepSpeed defaults
    engine, *_ = deepspeed.initialize(model=ref_model, config=config)
    engine.eval()
    return engine


def _drop_auto(config: dict) -> None:
    for key, value in list(config.items()):
        if isinstance(value, dict):
            _drop_auto(value)
        elif value == "auto":
            del config[key]
