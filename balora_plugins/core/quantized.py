"""4-bit bases: QPiSSA, PiSSA on the full-precision weights with the residual quantised back (docs/qlora.md).

The authors train QPiSSA with ``bits=4``: the PiSSA factorisation of the *full-precision* W (A₀, B₀: the top-r
singular part), the residual W_res = W − s·B₀A₀ quantised to 4 bits, the adapter trained on Q(W_res). PEFT refuses
PiSSA on a quantised layer ("initialize PiSSA under float32 ... then re-quantize the residual"), and a model loaded
in 4 bits no longer holds W. :func:`get_qpissa_model` does the whole recipe in one call on a 4-bit model: it puts a
plain-init LoRA on the model (PEFT), then for every LoRA layer reads W from a full-precision source — the checkpoint
the model was loaded from (its ``config._name_or_path``), another path, or a full-precision model — runs PEFT's own
``pissa_init`` on W, and quantises W_res into the layer with the layer's own bitsandbytes settings.

The model at step 0 is Q(W_res) + s·B₀A₀, not W: 4 bits cannot hold W. BA-LoRA's default reference is that step-0
model (the frozen snapshot of the initial adapter; no second model); an explicit full-precision ``ref_model=``
compares with W itself, as the authors do. ``python -m balora_plugins.tools.qpissa_kl`` measures the step-0
models' distance from W on SmolLM2 (docs/qlora.md: KL per token 0.121 for QPiSSA r = 128, 0.296 for Q(W)).

bitsandbytes is never imported here: its layers and parameters are recognised by class name and re-created through
the parameter's own class (as PEFT's ``olora_init`` does), so the core imports without it.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from typing import Any

import torch
from peft.utils.integrations import dequantize_module_weight
from torch import nn

FOUR_BIT_LAYERS = ("Linear4bit",)
QUANT_MODULES = ("Linear4bit", "Linear8bitLt", "QuantLinear", "HQQLinear", "AwqLinear", "QLinear")
# dequant(Q(W)) against W, relative Frobenius error, for a source to count as this model's full-precision weights.
# Measured on a random width-64 Llama: nf4 0.089 - 0.095, fp4 0.120 - 0.127; another seed's weights 1.40 - 1.44.
# SmolLM2-135M's projections: nf4 0.092 - 0.102, fp4 0.122 - 0.147.
_SOURCE_TOL = 0.35

WeightSource = Callable[[str], torch.Tensor]


def is_4bit_layer(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` (matched by class name: bitsandbytes stays an optional dependency; PEFT's LoRA
    wrapper of the same name, which has a ``base_layer``, is not one)."""
    return type(module).__name__ in FOUR_BIT_LAYERS and not hasattr(module, "base_layer")


def quantized_layer_types(model: nn.Module) -> list[str]:
    """Class names of the quantised layers in ``model`` (:data:`QUANT_MODULES`), each once, in order found."""
    found: list[str] = []
    for m in model.modules():
        name = type(m).__name__
        if name in QUANT_MODULES and name not in found and not hasattr(m, "base_layer"):
            found.append(name)
    return found


def quantization_note(model: nn.Module) -> str | None:
    """How ``model``'s 4-bit layers are quantised, for the model card (e.g. ``"bitsandbytes 4-bit nf4, block
    size 64"``); None when it has none."""
    layer = next((m for m in model.modules() if is_4bit_layer(m)), None)
    if layer is None:
        return None
    w = layer.weight
    return f"bitsandbytes 4-bit {getattr(w, 'quant_type', '?')}, block size {getattr(w, 'blocksize', '?')}"


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The (d_out, d_in) weight of a plain or bitsandbytes ``Linear`` as a dense fp32 tensor (a copy for 4 bits)."""
    return dequantize_module_weight(layer).detach().float()


def quantize_into(layer: nn.Module, weight: torch.Tensor) -> None:
    """Replace the 4-bit ``layer``'s weight by ``weight`` (d_out, d_in) quantised with the layer's own settings
    (quant type, block size, storage, double quantisation), on the layer's device."""
    old = layer.weight
    dtype = getattr(layer, "compute_dtype", None) or torch.float32
    new = old.__class__(
        weight.detach().to(dtype).cpu().contiguous(),
        requires_grad=False,
        quant_type=old.quant_type,
        quant_storage=old.quant_storage,
        compress_statistics=old.compress_statistics,
        blocksize=old.blocksize,
        module=old.module,
    )
    layer.weight = new.to(old.device)


# ---------------------------------------------------------------------------------------------- full-precision W
def checkpoint_weights(path: str) -> WeightSource:
    """W by module name (relative to the base model, e.g. ``model.layers.0.mlp.up_proj``) from the safetensors
    checkpoint in the local folder ``path`` (one file or an index of shards), read one tensor at a time."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            where = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        single = os.path.join(path, "model.safetensors")
        with safe_open(single, "pt") as f:
            where = dict.fromkeys(f.keys(), single)
    else:
        raise FileNotFoundError(
            f"QPiSSA needs the full-precision weights the 4-bit model was quantised from, and {path!r} holds no "
            "model.safetensors(.index.json). Pass weights=... (a local checkpoint folder or the full-precision "
            "model; axolotl: `base_model:` a local folder)."
        )

    def read(name: str) -> torch.Tensor:
        key = f"{name}.weight"
        if key not in where:
            raise KeyError(
                f"QPiSSA: {key!r} is not in the checkpoint at {path!r} (it names e.g. {sorted(where)[:2]}); pass "
                "the full-precision model as weights=... instead."
            )
        with safe_open(where[key], "pt") as f:
            return f.get_tensor(key).float()

    return read


def model_weights(model: nn.Module) -> WeightSource:
    """W by module name from a full-precision model (a plain ``PreTrainedModel``, not quantised)."""
    modules = dict(model.named_modules())

    def read(name: str) -> torch.Tensor:
        layer = modules.get(name)
        if layer is None or is_4bit_layer(layer) or getattr(layer, "weight", None) is None:
            raise KeyError(f"QPiSSA: the full-precision model has no plain layer {name!r} with a weight.")
        return layer.weight.detach().float()

    return read


def weight_source(model: nn.Module, weights: str | nn.Module | None) -> WeightSource:
    """Where :func:`get_qpissa_model` reads W: ``weights`` (a folder, a hub id in the local cache, or a model), or
    the folder the 4-bit ``model`` was loaded from (``config._name_or_path``)."""
    if isinstance(weights, nn.Module):
        return model_weights(weights)
    path = weights or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        raise ValueError(
            "QPiSSA needs the full-precision weights of the 4-bit model, but the model names no checkpoint "
            "(config._name_or_path is empty). Pass weights=... (a local checkpoint folder or the full-precision model)."
        )
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, allow_patterns=["*.safetensors", "*.json"])
    return checkpoint_weights(path)


# ---------------------------------------------------------------------------------------------- checks
def require_pissa_init(init: Any) -> None:
    """QPiSSA is PiSSA: refuse any other init by name."""
    if not (isinstance(init, str) and init.lower().startswith("pissa")):
        raise ValueError(
            f"get_qpissa_model needs init_lora_weights='pissa' or 'pissa_niter_N', got {init!r}. For plain-init "
            "QLoRA use peft.get_peft_model (the reference is then the disabled adapter, Q(W)); OLoRA, CorDA, "
            "LoRA-GA and LoftQ on a quantised base are not supported."
        )


def check_quantised_pissa(model: nn.Module, init: Any, use_dora: bool) -> None:
    """Refuse, by name, a PiSSA adapter on a quantised base that QPiSSA does not cover: 8-bit and non-bitsandbytes
    quantisation, DoRA, a model without 4-bit layers."""
    kinds = quantized_layer_types(model)
    other = [k for k in kinds if k not in FOUR_BIT_LAYERS]
    if "Linear8bitLt" in other:
        raise ValueError(
            f"init_lora_weights={init!r} on an 8-bit base (Linear8bitLt): QPiSSA is supported on 4-bit bitsandbytes "
            "bases (load_in_4bit=True), the authors' bits=4. LLM.int8 keeps outlier columns in fp16 inside its own "
            "matmul, so a residual written back through Int8Params is not the layer bitsandbytes runs. Load the base "
            "with load_in_4bit=True, or unquantised."
        )
    if other:
        raise ValueError(
            f"init_lora_weights={init!r} on a {other[0]} base: QPiSSA re-quantises the residual with bitsandbytes' "
            "4-bit layers only. Load the base with BitsAndBytesConfig(load_in_4bit=True), or unquantised."
        )
    if not kinds:
        raise ValueError(
            "QPiSSA: the model has no 4-bit layers (bitsandbytes Linear4bit); for an unquantised base use "
            "peft.get_peft_model with the PiSSA LoraConfig directly."
        )
    if use_dora:
        raise ValueError(
            f"use_dora=True with init_lora_weights={init!r} on a 4-bit base: DoRA's magnitude is the column norm "
            "of the base weight, which on a 4-bit residual is the norm of Q(W_res), not of W_res, and bitsandbytes "
            "repacks 4-bit weights on the CPU at their first forward, so the model at step 0 would not be "
            "Q(W_res) + s·B0A0. Use QPiSSA without DoRA, or DoRA on an unquantised base."
        )


def _check_source(name: str, layer: nn.Module, w: torch.Tensor) -> None:
    """W must be the weight this 4-bit layer was quantised from (dequant(Q(W)) ≈ W within 4-bit error)."""
    q = dequantized_weight(layer).to(w.device)
    if tuple(q.shape) != tuple(w.shape):
        raise ValueError(
            f"QPiSSA: full-precision {name!r} has shape {tuple(w.shape)}, the 4-bit layer {tuple(q.shape)}."
        )
    err = float((q - w).norm() / w.norm().clamp_min(1e-12))
    if err > _SOURCE_TOL:
        raise ValueError(
            f"QPiSSA: the full-precision weight read for {name!r} is not the one this 4-bit layer was quantised "
            f"from (relative difference {err:.3g}; 4-bit rounding gives ~0.1). Pass weights=... naming the "
            "checkpoint (or model) the 4-bit model was loaded from."
        )


# ---------------------------------------------------------------------------------------------- QPiSSA
def qpissa_initialize(
    peft_model: nn.Module,
    init_lora_weights: str,
    weights: WeightSource,
    adapter: str = "default",
) -> list[str]:
    """Turn ``adapter`` (freshly created with plain init on a 4-bit model) into QPiSSA; returns the layers done.

    Per LoRA ``Linear``: W (d_out, d_in) from ``weights`` (by the layer's name in the base model), PEFT's own
    ``pissa_init`` run on it (through a temporary ``nn.Linear`` holding W: same SVD, same A₀, B₀ as PiSSA on the
    full-precision model), and W_res = W − s·B₀A₀ quantised into the 4-bit layer. Unquantised LoRA layers (e.g. a
    module bitsandbytes skipped) get PEFT's PiSSA on their own weight. The adapter's config then says
    ``init_lora_weights=init_lora_weights`` (its base is rewritten: docs/method.md §3.4).
    """
    base_model = peft_model.get_base_model()
    names = {id(m): n for n, m in base_model.named_modules()}
    done = []
    with torch.no_grad():
        for module in base_model.modules():
            lora_a = getattr(module, "lora_A", None)
            if not (
                isinstance(lora_a, nn.ModuleDict) and adapter in lora_a and hasattr(module, "pissa_init")
            ):
                continue
            layer = module.get_base_layer()
            if bool(module.lora_B[adapter].weight.any()):
                raise ValueError(
                    f"QPiSSA: layer {names[id(module)]!r} already has a non-zero lora_B: qpissa_initialize needs a "
                    "freshly created plain-init adapter (get_qpissa_model creates one)."
                )
            if not is_4bit_layer(layer):
                module.pissa_init(adapter, init_lora_weights)
                done.append(names[id(module)])
                continue
            name = names[id(layer)].removesuffix(".base_layer")
            w = weights(name).to(layer.weight.device)
            _check_source(name, layer, w)
            tmp = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device)
            tmp.weight = nn.Parameter(w, requires_grad=False)
            module.base_layer = tmp
            try:
                module.pissa_init(adapter, init_lora_weights)  # PEFT's SVD; writes A0, B0 and W_res into tmp
            finally:
                module.base_layer = layer
            quantize_into(layer, tmp.weight)
            done.append(name)
    peft_model.peft_config[adapter].init_lora_weights = init_lora_weights
    return done


def get_qpissa_model(
    model: nn.Module,
    lora_config: Any,
    *,
    weights: str | nn.Module | None = None,
    adapter_name: str = "default",
    **peft_kwargs: Any,
) -> nn.Module:
    """QPiSSA in one call: ``peft.get_peft_model`` for a 4-bit model and a PiSSA ``LoraConfig``.

    Args:
        model: a causal LM loaded with ``BitsAndBytesConfig(load_in_4bit=True, ...)``.
        lora_config: a ``LoraConfig`` with ``init_lora_weights="pissa"`` or ``"pissa_niter_N"``.
        weights: the full-precision weights the model was quantised from: a local checkpoint folder (or a hub id
            in the local cache), or the full-precision model; default: ``model.config._name_or_path``.
        adapter_name, peft_kwargs: as for ``peft.get_peft_model``.

    Returns the ``PeftModel``: adapter (A₀, B₀) = PiSSA of W, base = Q(W − s·B₀A₀). The LoRA config passed in is
    not modified. Raises ``ValueError`` for what QPiSSA cannot do (:func:`check_quantised_pissa`).
    """
    from peft import get_peft_model

    require_pissa_init(lora_config.init_lora_weights)
    check_quantised_pissa(model, lora_config.init_lora_weights, bool(getattr(lora_config, "use_dora", False)))
    source = weight_source(model, weights)
    plain = copy.deepcopy(lora_config)
    plain.init_lora_weights = True
    peft_model = get_peft_model(model, plain, adapter_name=adapter_name, **peft_kwargs)
    qpissa_initialize(peft_model, lora_config.init_lora_weights, source, adapter_name)
    return peft_model


def wants_qpissa(model: Any, peft_config: Any) -> bool:
    """True when a door is given a 4-bit model object and a PiSSA ``LoraConfig`` (so it must run QPiSSA)."""
    init = getattr(peft_config, "init_lora_weights", None)
    return (
        isinstance(model, nn.Module)
        and isinstance(init, str)
        and init.lower().startswith("pissa")
        and bool(quantized_layer_types(model))
    )


__all__ = [
    "QUANT_MODULES",
    "check_quantised_pissa",
    "checkpoint_weights",
    "dequantized_weight",
    "get_qpissa_model",
    "is_4bit_layer",
    "model_weights",
    "qpissa_initialize",
    "quantize_into",
    "quantization_note",
    "quantized_layer_types",
    "require_pissa_init",
    "wants_qpissa",
    "weight_source",
]
