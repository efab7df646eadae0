"""The pre-trained reference for the consistency term, without a second copy of the base model (docs/method.md §2).

* ``adapter_snapshot`` — for PiSSA-like inits, whose frozen base is the residual W_res = W − s·B₀A₀: a frozen
  copy of the *initial* adapter is added as a second PEFT adapter (its config says ``init_lora_weights=True``
  so PEFT runs no SVD and leaves the base alone); switching it on gives W_res + s·B₀A₀ = W.
* ``disabled_adapter`` — for ordinary LoRA init, the base weights are untouched: switch the adapter off.
* ``model`` — a separate reference model the user supplies.

:func:`reference_mode` runs a forward in reference mode: no grad, every module in eval mode (no dropout, no
gradient checkpointing), the adapter switched by assigning the layers' active-adapter state directly (PEFT's
``set_adapter`` would also flip ``requires_grad``), and everything restored afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator

import torch
from torch import nn

from . import distributed

REF_ADAPTER = "balora_ref"
# LoRA initialisations that rewrite the frozen base weight (so "adapter off" is not the pre-trained model).
RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq")


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP/FSDP/accelerate/torch.compile wrappers (``.module`` / ``._orig_mod``)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel) or (
            type(model).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel", "DeepSpeedEngine")
            and hasattr(model, "module")
        ):
            model = model.module
        else:
            return model


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


def lora_init(peft_model: nn.Module, adapter: str = "default"):
    cfg = peft_model.peft_config.get(adapter)
    return getattr(cfg, "init_lora_weights", True) if cfg is not None else True


def has_residual_base(peft_model: nn.Module, adapter: str = "default") -> bool:
    """True when the adapter's init rewrote the base weight (PiSSA, OLoRA, CorDA, LoftQ)."""
    init = lora_init(peft_model, adapter)
    return isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS)


def resolve_mode(
    requested: str, model: nn.Module, ref_model: nn.Module | None, adapter: str = "default"
) -> str:
    """The concrete reference mode for ``requested`` (``auto`` picks snapshot for residual inits)."""
    if ref_model is not None:
        return "model"
    if requested == "model":
        raise ValueError(
            "BALoRAConfig.reference='model' but no reference model was given; pass ref_model=... to the trainer "
            "or callback, or use reference='auto'."
        )
    if requested == "auto":
        return "adapter_snapshot" if has_residual_base(model, adapter) else "disabled_adapter"
    if requested == "disabled_adapter" and has_residual_base(model, adapter):
        raise ValueError(
            f"BALoRAConfig.reference='disabled_adapter' with init_lora_weights={lora_init(model, adapter)!r}: the "
            "disabled adapter leaves the *residual* base W - B0A0, not the pre-trained model, so the consistency "
            "term would pull towards the wrong distribution. Use reference='adapter_snapshot' (or 'auto')."
        )
    return requested


def _tuner_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "_active_adapter") and hasattr(m, "_disable_adapters")]


def add_snapshot_adapter(peft_model: nn.Module, source: str = "default", name: str = REF_ADAPTER) -> None:
    """Add ``name`` as a frozen copy of adapter ``source`` (its current weights) to ``peft_model``.

    The trainable parameter set and the active adapter are exactly as before the call (PEFT 0.20 leaves
    nothing trainable after ``add_adapter`` with ``inference_mode=True``; 0.21 does not — we restore both).
    """
    if name in peft_model.peft_config:
        copy_adapter_weights(peft_model, source, name)
        return
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    active = [(m, m._active_adapter) for m in _tuner_modules(peft_model)]
    cfg = copy.deepcopy(peft_model.peft_config[source])
    cfg.init_lora_weights = True  # never re-run the PiSSA SVD on the (already residual) base
    cfg.inference_mode = True
    # add_adapter draws a random init that the copy below overwrites: keep the training RNG (dropout) untouched
    cuda = sorted({p.device.index or 0 for p in peft_model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        peft_model.add_adapter(name, cfg)
    for m, a in active:  # whatever add_adapter switched, the trainable adapter stays the active one
        m._active_adapter = a
    copy_adapter_weights(peft_model, source, name)
    for n, p in peft_model.named_parameters():
        p.requires_grad_(n in trainable)


def copy_adapter_weights(peft_model: nn.Module, source: str, target: str) -> int:
    """Copy every parameter of adapter ``source`` onto adapter ``target``; returns how many were copied."""
    params = dict(peft_model.named_parameters())
    n = 0
    both = [
        *distributed.adapter_parameters(peft_model, source),
        *distributed.adapter_parameters(peft_model, target),
    ]
    with torch.no_grad(), distributed.gathered(both, modifier_rank=0):  # ZeRO-3: rank 0's copy reaches all
        for key, p in params.items():
            if f".{source}." not in key:
                continue
            other = params.get(key.replace(f".{source}.", f".{target}."))
            if other is not None and other is not p:
                other.copy_(p)
                other.requires_grad_(False)
                n += 1
    if n == 0:
        raise RuntimeError(f"found no parameters of adapter {source!r} to copy into {target!r}")
    return n


def adapter_state(peft_model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """Detached copy of adapter ``adapter``'s parameters, keyed with the adapter name removed."""
    return {
        k.replace(f".{adapter}.", "."): p.detach().clone()
        for k, p in peft_model.named_parameters()
        if f".{adapter}." in k
    }


@contextlib.contextmanager
def reference_mode(model: nn.Module, mode: str, ref_adapter: str = REF_ADAPTER) -> Iterator[None]:
    """Run the enclosed forward as the pre-trained reference (see module docstring); restores all state."""
    training = [(m, m.training) for m in model.modules()]
    saved = []
    try:
        model.eval()
        if mode == "adapter_snapshot":
            for m in _tuner_modules(model):
                saved.append((m, "_active_adapter", m._active_adapter))
                m._active_adapter = [ref_adapter] if isinstance(m._active_adapter, list) else ref_adapter
        elif mode == "disabled_adapter":
            for m in _tuner_modules(model):
                saved.append((m, "_disable_adapters", m._disable_adapters))
                m._disable_adapters = True
        with torch.no_grad():
            yield
    finally:
        for m, attr, value in saved:
            setattr(m, attr, value)
        for m, flag in training:
            m.training = flag


def _mergeable(m: nn.Module, adapter: str) -> bool:
    """A plain PEFT LoRA ``Linear`` whose only active adapter is ``adapter`` (no DoRA/variant, no LoRA bias,
    nothing merged, not sharded, no forward already patched by someone else)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if not isinstance(m, LoraLinear) or adapter not in m.lora_A or "forward" in m.__dict__:
        return False
    base = m.get_base_layer()
    return (
        type(base) is nn.Linear
        and not m.merged
        and not m.disable_adapters
        and list(m.active_adapters) == [adapter]
        and adapter not in getattr(m, "lora_variant", {})
        and not getattr(m, "use_dora", {}).get(adapter, False)
        and not getattr(m, "fan_in_fan_out", False)
        and m.lora_B[adapter].bias is None
        and not distributed.is_sharded(base.weight)  # read outside its own module's forward: must be whole
    )


@contextlib.contextmanager
def merged_snapshot_forward(model: nn.Module, ref_adapter: str = REF_ADAPTER) -> Iterator[int]:
    """Inside :func:`reference_mode` (snapshot, no grad): each eligible LoRA ``Linear`` computes
    x·(W_res + s·B₀A₀)ᵀ with one matmul instead of x·W_resᵀ + s·(x·A₀ᵀ)·B₀ᵀ, when that is cheaper.

    The merged weight is formed per call and freed after it (the base weights are never modified); it is used
    only when the call has more tokens n than d·d_out/(d + d_out), where forming it (d_out·r·d) costs less than
    the LoRA path (n·r·(d + d_out)) and the transient weight is no larger than the layer's input and output.
    Yields the number of patched modules; every ``forward`` is restored on exit.
    """
    patched = []
    for m in model.modules():
        if _mergeable(m, ref_adapter):
            m.forward = functools.partial(_merged_forward, m, m.forward, ref_adapter)
            patched.append(m)
    try:
        yield len(patched)
    finally:
        for m in patched:
            del m.forward


def _merged_forward(
    m: nn.Module, peft_forward, adapter: str, x: torch.Tensor, *args, **kwargs
) -> torch.Tensor:
    base = m.get_base_layer()
    w = base.weight
    d_out, d = w.shape
    if args or kwargs or torch.is_grad_enabled() or (x.numel() // d) * (d + d_out) <= d * d_out:
        return peft_forward(x, *args, **kwargs)
    a, b = m.lora_A[adapter].weight, m.lora_B[adapter].weight
    merged = (
        w.to(a.dtype, copy=True).addmm_(b, a, alpha=m.scaling[adapter]).to(w.dtype)
    )  # one transient weight
    return torch.nn.functional.linear(x, merged, base.bias)
