"""Facts about the model BA-LoRA trains: where the decoder backbone and the output head are, and whether the
model can be trained correctly at all (checked before step 1, with errors that name the problem and the fix).

The NLG terms read the decoder backbone's final hidden states (the stable place every TRL / transformers version
computes, whatever loss the host runs) and send them through the frozen output head (:class:`OutputHead`).
"""

from __future__ import annotations

from torch import nn

from ..config import BALoRAConfig
from . import distributed
from . import reference as ref
from .fused import OutputHead

QUANT_MODULES = ("Linear4bit", "Linear8bitLt", "QuantLinear", "HQQLinear", "AwqLinear", "QLinear")


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder backbone of a causal LM (the module whose output is the final hidden state)."""
    if hasattr(model, "get_decoder"):
        dec = model.get_decoder()
        if dec is not None and dec is not model:
            return dec
    prefix = getattr(model, "base_model_prefix", "model")
    for name in (prefix, "model", "transformer"):
        dec = getattr(model, name, None)
        if isinstance(dec, nn.Module) and dec is not model:
            return dec
    raise ValueError(
        f"cannot find the decoder backbone of {type(model).__name__}; BA-LoRA's NLG path needs one."
    )


def output_head(model: nn.Module) -> OutputHead:
    """The frozen output projection of a causal LM as an :class:`OutputHead`."""
    lin = model.get_output_embeddings()
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    scale = float(getattr(text_cfg, "logit_scale", None) or 1.0)
    if getattr(text_cfg, "logits_scaling", None):
        scale /= float(text_cfg.logits_scaling)
    softcap = getattr(text_cfg, "final_logit_softcapping", None)
    weight, bias, source = lin.weight, getattr(lin, "bias", None), None
    if distributed.is_sharded(weight):  # ZeRO-3 / FSDP2 / tensor parallel: a full copy for this step only
        source = weight  # the parameter, not the copy, keys the Gram-factor cache
        weight, bias = distributed.gathered_copy(weight, bias)
    return OutputHead(weight=weight, bias=bias, scale=scale, softcap=softcap, source=source)


def check_reference_head(head: OutputHead, ref_model: nn.Module) -> None:
    """The fused NLG path sends the reference's hidden states through the *trained model's* frozen head, so a
    separate reference model must have the same output head (up to dtype rounding)."""
    inner = ref.unwrap(ref_model)
    inner = inner.get_base_model() if ref.is_peft_model(inner) else inner
    lin = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    # a sharded head is gathered: a collective, and every rank runs prepare()
    (other,) = distributed.gathered_copy(getattr(lin, "weight", None))
    mine = head.weight.detach()
    if other is not None and tuple(other.shape) == tuple(mine.shape):
        delta = (other.detach().to(mine.device).float() - mine.float()).norm()
        diff = delta / mine.float().norm().clamp(1e-12)
        if float(diff) <= 1e-2:
            return
        detail = f"relative difference {float(diff):.3g}"
    else:
        detail = f"shape {None if other is None else tuple(other.shape)} vs {tuple(mine.shape)}"
    raise ValueError(
        f"ref_model ({type(inner).__name__}) has a different output head than the trained model ({detail}). "
        "BA-LoRA's NLG path computes the reference logits from the reference's final hidden states through "
        "the trained model's frozen head, so the reference must be the pre-trained base model the adapter was "
        "created on (or omit ref_model to use the adapter snapshot)."
    )


def validate_model(peft_model: nn.Module, config: BALoRAConfig, adapter: str = "default") -> None:
    """Refuse, before step 1, models BA-LoRA cannot train correctly (errors name the problem and the fix)."""
    if not ref.is_peft_model(peft_model):
        raise ValueError(
            f"BA-LoRA needs a PEFT LoRA model, got {type(peft_model).__name__} without an adapter. Wrap it with "
            "peft.get_peft_model(model, LoraConfig(init_lora_weights='pissa', ...)) or pass peft_config= to the trainer."
        )
    cfg = peft_model.peft_config.get(adapter)
    if cfg is None or str(getattr(cfg, "peft_type", "")).split(".")[-1].upper() != "LORA":
        raise ValueError(
            f"BA-LoRA needs a LoRA adapter named {adapter!r}; found adapters "
            f"{ {k: str(getattr(v, 'peft_type', '?')) for k, v in peft_model.peft_config.items()} }."
        )
    base = peft_model.get_base_model()
    is_cls = type(base).__name__.endswith("ForSequenceClassification")
    if config.task == "nlu" and not is_cls:
        raise ValueError(
            f"BALoRAConfig.task='nlu' but the model is a {type(base).__name__}; NLU needs a sequence-classification "
            "model (AutoModelForSequenceClassification). For a causal LM use task='nlg' (e.g. preset 'iclr2026-nlg')."
        )
    if config.task == "nlg":
        if is_cls or base.get_output_embeddings() is None:
            raise ValueError(
                f"BALoRAConfig.task='nlg' but {type(base).__name__} has no language-model head; use task='nlu' "
                "(preset 'iclr2026-nlu') for classifiers."
            )
        head = base.get_output_embeddings()
        if hasattr(head, "base_layer") or hasattr(head, "modules_to_save") or head.weight.requires_grad:
            raise ValueError(
                "BA-LoRA computes its terms from the frozen output head, but the head is trained (LoRA on it, "
                "modules_to_save, or trainable lm_head weights). Remove 'lm_head' from target_modules / "
                "modules_to_save and keep the head frozen."
            )
    if ref.has_residual_base(peft_model, adapter):
        quant = [type(m).__name__ for m in base.modules() if type(m).__name__ in QUANT_MODULES]
        qcfg = getattr(base.config, "quantization_config", None)
        method = (
            qcfg.get("quant_method") if isinstance(qcfg, dict) else getattr(qcfg, "quant_method", None)
        ) or ""
        if quant or (qcfg is not None and str(method).split(".")[-1].lower() not in ("gguf", "")):
            raise ValueError(
                f"init_lora_weights={ref.lora_init(peft_model, adapter)!r} on a quantised base "
                f"({quant[0] if quant else method}): PiSSA's residual cannot be stored exactly in quantised weights, "
                "so the reference is not the pre-trained model. Load the base unquantised, or use plain LoRA init "
                "(init_lora_weights=True)."
            )
