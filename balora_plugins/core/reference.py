"""The pre-trained reference for the consistency term, without a second copy of the base model (docs/method.md §2).

* ``adapter_snapshot`` — for PiSSA-like inits, whose frozen base is the residual W_res = W − s·B₀A₀: a frozen
  copy of the *initial* adapter is added as a second PEFT adapter (its config says ``init_lora_weights=True``
  so PEFT runs no SVD and leaves the base alone); switching it on gives W_res + s·B₀A₀ = W.
* ``disabled_adapter`` — for ordinary LoRA init, the base weights are untouched: switch the adapter off.
* ``model`` — a separate reference model the user supplies.

Which base the adapter sits on is decided once, before step 1, by :func:`adapter_start` (the one predicate the
reference choice, the exports, the demo and the axolotl plugin share; docs/method.md §3.4): from the adapter's
config where PEFT rewrote the base itself, else from the adapter's behaviour at the start (does it add anything?
is it a PiSSA pair on its residual?). :func:`prepare_reference` records the decision on the model, so a later
call (after training moved the adapter) gives the same answer.

:func:`reference_mode` runs a forward in reference mode: no grad, every module in eval mode (no dropout, no
gradient checkpointing), the adapter switched by assigning the layers' active-adapter state directly (PEFT's
``set_adapter`` would also flip ``requires_grad``), and everything restored afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
from collections.abc import Collection, Iterator
from typing import Any

import torch
from torch import nn

from . import distributed
from .quantized import dequantized_weight, is_4bit_layer

REF_ADAPTER = "balora_ref"
# PEFT's LoRA inits that rewrite the frozen base weight when the adapter is created (peft 0.20 - 0.21,
# LoraLayer.update_layer): W_res = W - s·B0A0 for PiSSA, OLoRA, CorDA and LoRA-GA; LoftQ replaces W by its
# quantised Q(W) with Q(W) + s·B0A0 only *approximating* W. Every other init leaves the base untouched.
REWRITING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
APPROXIMATE_INITS = ("loftq",)
_START_ATTR = "_balora_adapter_start"  # the decision of prepare_reference, kept on the PeftModel
# Threshold of pissa_signature (0 for a PiSSA pair on its base, ~1 for an unrelated adapter). Measured on
# SmolLM2-135M's projections, r = 8 and 128: <= 4e-6 with W_res in fp32, ~2e-3 in bf16; 0.5 - 1.3 for the adapter
# of another pissa_niter_4 run or a random one.
_PISSA_SIGNATURE_TOL = 0.05
# On a 4-bit residual Q(W_res) = W_res + E the signature is about the relative rounding error ‖E‖/‖W_res‖ (B0ᵀ·E
# does not vanish). Measured on a random width-64 Llama (r = 4, 16): QPiSSA pairs nf4 0.06 - 0.11, fp4 0.09 - 0.15;
# a random adapter on the same 4-bit bases 0.5 - 1.24. On SmolLM2-135M's projections (pissa_niter_4): nf4 r = 8
# 0.06 - 0.15, r = 128 0.08 - 0.11; fp4 r = 8 0.09 - 0.20; a random adapter 0.64 - 1.22.
_PISSA_SIGNATURE_TOL_4BIT = 0.3


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


def init_rewrites_base(init: Any) -> bool:
    """Whether PEFT rewrites the frozen base weight when it creates an adapter with ``init_lora_weights=init``.

    The config-level half of :func:`adapter_start`; the export uses it on adapters read from disk.
    """
    return isinstance(init, str) and init.lower().startswith(REWRITING_INITS)


def init_is_approximate(init: Any) -> bool:
    """Whether the init's base plus its initial adapter only approximates the pre-trained model (LoftQ)."""
    return isinstance(init, str) and init.lower().startswith(APPROXIMATE_INITS)


# ---------------------------------------------------------------------------------------------- the start
@dataclasses.dataclass(frozen=True)
class AdapterStart:
    """What the trained adapter's frozen base is, decided before step 1.

    Attributes:
        init: the adapter config's ``init_lora_weights``.
        rewritten: True when the frozen base is *not* the pre-trained model W (it is W − s·B₀A₀, so the
            reference is the snapshot of the initial adapter and the served adapter must be converted); False
            when it is W (the reference is the disabled adapter); None when the model alone cannot tell.
        reason: one sentence saying how it was decided (used in errors).
    """

    init: Any
    rewritten: bool | None
    reason: str


def adapter_start(peft_model: nn.Module, adapter: str = "default") -> AdapterStart:
    """Is the frozen base under ``adapter`` the pre-trained model? The one predicate every part of BA-LoRA uses.

    In this order: the decision :func:`prepare_reference` recorded on the model; an init that makes PEFT rewrite
    the base (:data:`REWRITING_INITS`); an adapter that adds nothing at the start (B₀A₀ = 0: plain LoRA init,
    EVA, ...) sits on the pre-trained base; an adapter that does add something but whose config says a plain init
    was *loaded* — a PiSSA pair on its residual base (PEFT's and the authors' recipe: PiSSA run once, saved with
    ``init_lora_weights=True`` beside the residual, loaded later) is recognised by B₀ᵀ·W_res = 0; anything else
    (a trained LoRA adapter loaded to continue, an OLoRA/CorDA pair saved the same way, an init that does not
    preserve the model such as ``"orthogonal"``) cannot be told from the model alone: ``rewritten=None``.
    Call it before training moves the adapter (or after :func:`prepare_reference` recorded the answer).
    """
    recorded = peft_model.__dict__.get(_START_ATTR, {}).get(adapter)
    if recorded is not None:
        return recorded
    init = lora_init(peft_model, adapter)
    if init_rewrites_base(init):
        return AdapterStart(init, True, f"init_lora_weights={init!r} rewrites the frozen base weights")
    pairs = [p for p in _lora_pairs(peft_model, adapter) if _adds_something(*p[1:3])]
    if not pairs:
        return AdapterStart(
            init,
            False,
            "the adapter adds nothing at the start (B0·A0 = 0), so the base is the pre-trained model",
        )
    worst = _pissa_signature(pairs)
    if worst <= 1.0:
        name, excess = max(((n, fresh_pair_excess(a, b)) for n, a, b, _ in pairs), key=lambda x: x[1])
        if excess <= 1.0:
            return AdapterStart(
                init,
                True,
                f"the adapter was loaded pre-initialised (init_lora_weights={init!r}, lora_B non-zero) and is a "
                "fresh PiSSA pair on its residual base (B0ᵀ·W_res = 0, A0·A0ᵀ = B0ᵀ·B0 diagonal)",
            )
        return AdapterStart(
            init,
            None,
            f"adapter {adapter!r} (init_lora_weights={init!r}) sits on a residual base (B0ᵀ·W_res ≈ 0) but its factors "
            f"are no longer a fresh pair (layer {name!r}: {excess:.3g}× the rounding tolerance of A·Aᵀ = Bᵀ·B "
            "diagonal): a PiSSA adapter already trained, whose step-0 pair, and with it the pre-trained model, is "
            "gone. To continue a BA-LoRA run, resume from its balora_resume/ folder (it keeps the initial adapter)",
        )
    return AdapterStart(
        init,
        None,
        f"adapter {adapter!r} says init_lora_weights={init!r} but its lora_B is non-zero at the start "
        f"(e.g. {pairs[0][0]!r}), and it is not a PiSSA pair on a residual base",
    )


def has_residual_base(peft_model: nn.Module, adapter: str = "default") -> bool:
    """True when the frozen base is not the pre-trained model (:func:`adapter_start` says ``rewritten``)."""
    return adapter_start(peft_model, adapter).rewritten is True


def _lora_pairs(
    peft_model: nn.Module, adapter: str
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, nn.Module]]:
    """(layer name, A, B, layer) for every LoRA layer holding ``adapter`` (A: (r, d_in), B: (d_out, r) for Linear)."""
    for name, m in peft_model.named_modules():
        lora_a, lora_b = getattr(m, "lora_A", None), getattr(m, "lora_B", None)
        if isinstance(lora_a, nn.ModuleDict) and adapter in lora_a and adapter in lora_b:
            yield name, lora_a[adapter].weight, lora_b[adapter].weight, m
        emb_a, emb_b = getattr(m, "lora_embedding_A", None), getattr(m, "lora_embedding_B", None)
        if isinstance(emb_a, nn.ParameterDict) and adapter in emb_a and adapter in emb_b:
            yield name, emb_a[adapter], emb_b[adapter], m


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter: a DTensor is gathered."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _adds_something(a: torch.Tensor, b: torch.Tensor) -> bool:
    with torch.no_grad(), distributed.gathered([a, b]):
        return bool(_full(a).detach().any()) and bool(_full(b).detach().any())


def _base_matrix(m: nn.Module) -> torch.Tensor | None:
    """The (d_out, d_in) weight of a LoRA ``Linear``'s plain ``nn.Linear`` / Conv1D base layer (a 4-bit one
    de-quantised), else None."""
    base = m.get_base_layer() if hasattr(m, "get_base_layer") else None
    if base is not None and is_4bit_layer(base) and hasattr(m, "lora_A"):
        return dequantized_weight(base)
    w = getattr(base, "weight", None)
    if w is None or w.dim() != 2 or not w.is_floating_point() or not hasattr(m, "lora_A"):
        return None
    return w.T if getattr(m, "fan_in_fan_out", False) else w


def pissa_signature(a: torch.Tensor, b: torch.Tensor, m: nn.Module) -> float:
    """How far (A, B) is from a PiSSA pair on layer ``m``'s frozen base W_res: 0 for a PiSSA pair, about 1 for an
    adapter unrelated to its base; ``inf`` where it cannot be read (not a Linear LoRA layer).

    PiSSA removes the top-r singular part of W and keeps it in the adapter, so B spans directions absent from
    W_res's columns (Bᵀ·W_res = 0) and A directions absent from its rows (W_res·Aᵀ = 0). The exact SVD gives both;
    PEFT's randomised ``pissa_niter_N`` (torch.svd_lowrank, which works on Wᵀ for a wide W) gives one of them, so
    the smaller of ‖Bᵀ·W_res·X‖·√d_out / (‖B‖·‖W_res·X‖) and ‖Yᵀ·W_res·Aᵀ‖·√d_in / (‖A‖·‖Yᵀ·W_res‖) is taken, for
    fixed random probes X (d_in, 4) and Y (d_out, 4). Measured on SmolLM2-135M: ≤ 4e-6 (fp32), ~2e-3 (W_res in
    bf16); 0.5 - 1.3 for another PiSSA run's adapter or a random one.
    """
    w = _base_matrix(m)
    if w is None or a.dim() != 2 or b.dim() != 2:
        return math.inf
    gen = torch.Generator().manual_seed(0)  # own generator: the training RNG is left alone
    with torch.no_grad(), distributed.gathered([w, a, b]):
        w32, a32, b32 = (_full(t).detach().float() for t in (w, a, b))
        d_out, d_in = w32.shape
        x = torch.randn(d_in, 4, generator=gen).to(w32.device)
        y = torch.randn(4, d_out, generator=gen).to(w32.device)
        wx, yw = w32 @ x, y @ w32
        left_den, right_den = b32.norm() * wx.norm(), a32.norm() * yw.norm()
        if not (left_den > 0 and right_den > 0):
            return math.inf
        left = float((b32.T @ wx).norm() * math.sqrt(d_out) / left_den)
        right = float((yw @ a32.T).norm() * math.sqrt(d_in) / right_den)
    return min(left, right)


def signature_tolerance(m: nn.Module) -> float:
    """The largest :func:`pissa_signature` of a PiSSA pair on layer ``m``'s base: larger on a 4-bit residual,
    whose rounding error B0 does not annihilate."""
    base = m.get_base_layer() if hasattr(m, "get_base_layer") else m
    return _PISSA_SIGNATURE_TOL_4BIT if is_4bit_layer(base) else _PISSA_SIGNATURE_TOL


# Rounding unit of the dtype a factor pair is stored in, read from its values (a pair saved in bf16 and loaded in
# fp32 is still bf16-rounded), and the multiple of it that fresh_pair_excess allows.
_ROUNDING = ((torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11))
_FP32_ROUNDING = 2.0**-24
_FRESH_PAIR_TOL = 2.0  # × the rounding unit, and at least _FRESH_PAIR_FLOOR
_FRESH_PAIR_FLOOR = 1e-4


def _rounding_unit(*tensors: torch.Tensor) -> float:
    """The coarsest rounding unit the tensors' values are consistent with: bf16 if every value is a bf16 number
    (a pair saved in bf16), else fp16, else fp32 (or the tensors' own dtype when coarser)."""
    for dtype, unit in _ROUNDING:
        if all(torch.equal(t, t.to(dtype).to(t.dtype)) for t in tensors):
            return unit
    return _FP32_ROUNDING


def fresh_pair_deviation(a: torch.Tensor, b: torch.Tensor) -> float:
    """How far (A, B) — A (r, d_in), B (d_out, r) — is from the structure of a freshly initialised pair: 0 for one.

    A PiSSA pair carries √S of the same singular values in both factors (A = √S·Vᵀ, B = U·√S, divided by the
    scaling): A·Aᵀ = Bᵀ·B = diag(S/s). An OLoRA pair is Q_r, R_r of W's QR: Bᵀ·B = I and A upper trapezoidal. The
    smaller of the two relative deviations (Frobenius norms): PiSSA, the largest of A·Aᵀ's and Bᵀ·B's
    off-diagonal share and the difference of their diagonals; OLoRA, ‖Bᵀ·B − I‖/√r and A's share below its diagonal.
    Training moves both factors and breaks the structure (measured in tests/test_silent_paths.py).
    """
    with torch.no_grad(), distributed.gathered([a, b]):
        a64, b64 = (_full(t).detach().double() for t in (a, b))
    ga, gb = a64 @ a64.T, b64.T @ b64
    tiny = torch.finfo(torch.float64).tiny

    def offdiag(g: torch.Tensor) -> float:
        return float((g - torch.diag(torch.diag(g))).norm() / g.norm().clamp_min(tiny))

    da, db = torch.diag(ga), torch.diag(gb)
    pissa = max(offdiag(ga), offdiag(gb), float((da - db).norm() / db.norm().clamp_min(tiny)))
    r = gb.shape[0]
    eye = torch.eye(r, dtype=gb.dtype, device=gb.device)
    olora = max(
        float((gb - eye).norm()) / math.sqrt(r),
        float(torch.tril(a64, -1).norm() / a64.norm().clamp_min(tiny)),
    )
    return min(pissa, olora)


def fresh_pair_excess(a: torch.Tensor, b: torch.Tensor) -> float:
    """:func:`fresh_pair_deviation` over its tolerance for the pair's rounding (≤ 1: a fresh pair).

    The tolerance is 2× the rounding unit the factors' values show (bf16: 2⁻⁸, fp16: 2⁻¹¹), at least 1e-4 (fp32).
    """
    with torch.no_grad(), distributed.gathered([a, b]):
        unit = _rounding_unit(_full(a).detach(), _full(b).detach())
    return fresh_pair_deviation(a, b) / max(_FRESH_PAIR_TOL * unit, _FRESH_PAIR_FLOOR)


def _pissa_signature(pairs) -> float:
    """The largest :func:`pissa_signature` over ``pairs`` (``(name, A, B, layer)``), each divided by its layer's
    :func:`signature_tolerance` (so <= 1 means a PiSSA pair everywhere)."""
    return max((pissa_signature(a, b, m) / signature_tolerance(m) for _, a, b, m in pairs), default=0.0)


def _unknown_start(start: AdapterStart, *, with_ref_model: bool = False) -> ValueError:
    how = "pass ref_model=None and tell" if with_ref_model else "Tell"
    return ValueError(
        f"BA-LoRA cannot tell which base this adapter sits on: {start.reason}. {how} BA-LoRA with "
        "BALoRAConfig.reference (axolotl: balora_reference): 'adapter_snapshot' if the adapter was initialised on "
        "a rewritten base (PiSSA/OLoRA/CorDA/LoRA-GA saved with init_lora_weights=True beside its residual model) — "
        "the model as loaded is then the pre-trained one; 'disabled_adapter' if it is a LoRA adapter (already "
        "trained, or an init such as 'orthogonal') on the untouched pre-trained base."
    )


def resolve_mode(
    requested: str, model: nn.Module, ref_model: nn.Module | None, adapter: str = "default"
) -> str:
    """The concrete reference mode for ``requested`` (``auto``: snapshot on a rewritten base, else disabled)."""
    start = adapter_start(model, adapter)
    if ref_model is not None:
        if start.rewritten is None:
            raise _unknown_start(start, with_ref_model=True)
        return "model"
    if requested == "model":
        raise ValueError(
            "BALoRAConfig.reference='model' but no reference model was given; pass ref_model=... to the trainer "
            "or callback, or use reference='auto'."
        )
    if requested == "precomputed":
        # The stored reference is the untouched pre-trained model; which base the adapter sits on still decides
        # the exports (the step-0 adapter is written to disk, not kept in memory) and must be known.
        if start.rewritten is None:
            raise ValueError(
                f"BALoRAConfig.reference='precomputed': {start.reason}, so BA-LoRA cannot tell whether the model at "
                "step 0 is the pre-trained one the store was computed from, nor how to export the adapter. Start "
                "from a fresh adapter (plain LoRA or PiSSA init, or a pre-initialised PiSSA pair), or use "
                "reference='adapter_snapshot' / 'disabled_adapter'."
            )
        return requested
    if requested == "auto":
        if start.rewritten is None:
            raise _unknown_start(start)
        if init_is_approximate(start.init):
            raise ValueError(
                f"init_lora_weights={start.init!r}: LoftQ replaces W by its quantised Q(W), and the snapshot "
                "Q(W) + s·B0A0 only approximates the pre-trained model (LoftQ's fitting error), the disabled adapter "
                "(Q(W)) even less. For an exact reference pass the unquantised pre-trained model as ref_model=...; "
                "to accept the approximation set BALoRAConfig.reference='adapter_snapshot'."
            )
        return "adapter_snapshot" if start.rewritten else "disabled_adapter"
    if requested == "disabled_adapter" and start.rewritten:
        raise ValueError(
            f"BALoRAConfig.reference='disabled_adapter' with init_lora_weights={start.init!r} ({start.reason}): the "
            "disabled adapter leaves the *residual* base W - B0A0, not the pre-trained model, so the consistency "
            "term would pull towards the wrong distribution. Use reference='adapter_snapshot' (or 'auto')."
        )
    return requested


def check_separate_reference(ref_model: nn.Module, peft_model: nn.Module) -> None:
    """Refuse a ``ref_model`` that is (part of) the trained model: its forward would run the trained adapter on
    the (possibly residual) base, and freezing it would freeze the adapter. Checked before anything is changed."""
    inner = unwrap(ref_model)
    mine = set()
    for p in peft_model.parameters():
        with contextlib.suppress(RuntimeError, NotImplementedError):
            if p.numel() and p.device.type != "meta":
                mine.add(p.untyped_storage().data_ptr())
    shared = []
    for n, p in inner.named_parameters():
        with contextlib.suppress(RuntimeError, NotImplementedError):
            if p.numel() and p.device.type != "meta" and p.untyped_storage().data_ptr() in mine:
                shared.append(n)
    if inner is peft_model or shared:
        raise ValueError(
            f"ref_model ({type(inner).__name__}) shares {len(shared)} parameter(s) with the model being trained "
            f"(e.g. {shared[:2]}): it is the trained model's own base (get_base_model() or the model PEFT wrapped "
            "in place), which runs the trained adapter on the residual base and would be frozen with it. Pass a "
            "separately loaded copy of the pre-trained model, or omit ref_model (the adapter snapshot or the "
            "disabled adapter is exact and needs no second model)."
        )


def prepare_reference(
    peft_model: nn.Module,
    reference: str = "auto",
    ref_model: nn.Module | None = None,
    adapter: str = "default",
) -> str:
    """Decide the reference of ``peft_model``'s ``adapter``, record the decision, and add the snapshot adapter.

    The one setup step every door shares (the trainers' objective and the axolotl plugin's ``post_lora_load``).
    ``reference`` is ``BALoRAConfig.reference``. The decision (:func:`adapter_start`, with an explicit
    ``reference`` settling the cases the model cannot tell) is kept on the model, so later calls agree. The frozen
    snapshot of the initial adapter is added whenever the base is rewritten — also with a separate
    ``ref_model``: the exports and resuming need the step-0 adapter — except with ``precomputed``, where the
    trainer writes the step-0 adapter to disk instead (no second adapter in memory). Returns the mode
    (``adapter_snapshot`` / ``disabled_adapter`` / ``model`` / ``precomputed``). Idempotent: an existing snapshot
    is kept as it is.
    """
    if ref_model is not None:
        check_separate_reference(ref_model, peft_model)
    mode = resolve_mode(reference, peft_model, ref_model, adapter)
    start = adapter_start(peft_model, adapter)
    if start.rewritten is None:  # settled by the user's explicit reference
        start = dataclasses.replace(
            start, rewritten=mode == "adapter_snapshot", reason=f"BALoRAConfig.reference={mode!r}"
        )
    peft_model.__dict__.setdefault(_START_ATTR, {})[adapter] = start
    in_memory = mode != "precomputed"
    if (
        in_memory
        and (start.rewritten or mode == "adapter_snapshot")
        and REF_ADAPTER not in peft_model.peft_config
    ):
        add_snapshot_adapter(peft_model, adapter)
    return mode


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


def restore_residual_base(
    peft_model: nn.Module, before: dict[str, torch.Tensor], adapter: str = REF_ADAPTER, *, rtol: float = 1e-5
) -> list[str]:
    """Put back the residual base a resumed checkpoint's initial adapter was created on; returns the layers fixed.

    On resume the process builds the adapter afresh: with a randomised init (``pissa_niter_N``) its SVD differs
    from the checkpoint's, and so does the residual W_res' it leaves in the base. ``before`` is this process's own
    initial adapter (:func:`adapter_state` of ``adapter`` before the checkpoint's was loaded into it). Both runs
    started from the same pre-trained W, so W = W_res' + s·B₀'A₀' = W_res + s·B₀A₀ and the checkpoint's base is
    W_res = W_res' + s·(B₀'A₀' − B₀A₀). Per layer, checked on behaviour: nothing to do where the two initial
    products agree (relative Frobenius difference ≤ ``rtol``) or where the checkpoint's pair already is a PiSSA
    pair on this base (:func:`pissa_signature`); else the base is rewritten (rounded once to its dtype) and, for
    a PiSSA pair, checked to fit the checkpoint's adapter afterwards. A base that cannot be rewritten in place
    (sharded, quantised, not a plain Linear) or that does not fit afterwards is refused with the fix.
    """

    def refuse(name: str, why: str) -> ValueError:
        return ValueError(
            f"resuming: the checkpoint's initial adapter does not match this run's (layer {name!r}): "
            f"init_lora_weights={lora_init(peft_model)!r} drew another randomised SVD, so the frozen base is not the "
            f"residual the checkpoint was trained on, and {why}. Resume with init_lora_weights='pissa' (exact, "
            "deterministic SVD), or save the residual base model and load it with the adapter."
        )

    fixed = []
    with torch.no_grad():
        for name, a, b, m in _lora_pairs(peft_model, adapter):
            key_a, key_b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
            if key_a not in before or key_b not in before:  # an embedding layer: no init rewrites its base
                continue
            a0, b0 = before[key_a].to(a.device), before[key_b].to(b.device)
            s = m.scaling[adapter]
            new = s * (b.detach().float() @ a.detach().float())
            delta = s * (b0.float() @ a0.float()) - new
            if float(delta.norm()) <= rtol * max(float(new.norm()), 1e-12):
                continue
            if pissa_signature(a, b, m) <= signature_tolerance(m):  # already the checkpoint's base
                continue
            w = m.get_base_layer().weight
            if type(m.get_base_layer()) is not nn.Linear or hasattr(w, "full_tensor") or hasattr(w, "ds_id"):
                raise refuse(
                    name, "this base cannot be corrected in place (sharded, quantised or not a Linear)"
                )
            was_pissa = pissa_signature(a0, b0, m) <= signature_tolerance(m)
            old = w.detach().clone()
            w.copy_((w.float() + delta.to(w.device)).to(w.dtype))
            if was_pissa and pissa_signature(a, b, m) > signature_tolerance(m):
                w.copy_(old)
                raise refuse(
                    name, "this run's adapter was not at its initial values, so the base cannot be restored"
                )
            fixed.append(name)
    return fixed


@contextlib.contextmanager
def reference_mode(
    model: nn.Module, mode: str, ref_adapter: str = REF_ADAPTER, keep: Collection[nn.Module] = ()
) -> Iterator[None]:
    """Run the enclosed forward as the pre-trained reference (see module docstring); restores all state.

    ``keep``: modules (with everything inside them) left on the trained adapter — a classifier's current head
    under ``BALoRAConfig.reference_head='current'``; they still run in eval mode and without gradient.
    """
    kept = {id(sub) for m in keep for sub in m.modules()}
    tuners = [m for m in _tuner_modules(model) if id(m) not in kept]
    training = [(m, m.training) for m in model.modules()]
    saved = []
    try:
        model.eval()
        if mode == "adapter_snapshot":
            for m in tuners:
                saved.append((m, "_active_adapter", m._active_adapter))
                m._active_adapter = [ref_adapter] if isinstance(m._active_adapter, list) else ref_adapter
        elif mode == "disabled_adapter":
            for m in tuners:
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
