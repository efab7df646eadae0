"""How BA-LoRA reads and writes weights that a sharded training engine holds (docs/distributed.md).

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

Framework-free: these functions see tensors and modules only, never a Trainer or an accelerate object (the
engine settings a Trainer runs with are checked and adapted in :mod:`balora_plugins.engines`). Nothing here
imports DeepSpeed unless the model's parameters are already DeepSpeed's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn


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
