"""Facts about the model BA-LoRA trains: where the decoder backbone and the output head are, and whether the
model can be trained correctly at all (checked before step 1, with errors that name the problem and the fix).

The NLG terms read the decoder backbone's final hidden states (the stable place every TRL / transformers version
computes, whatever loss the host runs) and send them through the frozen output head (:class:`OutputHead`).
Two checks on behaviour guard that path, on one probe forward of a few tokens at preparation
(:func:`replay_backbone`): the reference replays the backbone's inputs, so nothing trained may run before it
(a VLM's vision tower, projector or embedding with an adapter: the whole multimodal backbone is replayed
instead); and the fused head must reproduce the model's own logits (:func:`check_head_reproduces_logits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import BALoRAConfig
from . import distributed
from . import reference as ref
from .fused import OutputHead
from .quantized import check_quantised_pissa, quantized_layer_types


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


# ---------------------------------------------------------------------------------------------- the replayed backbone
def _in_adapter(param_name: str, adapter: str) -> bool:
    return f".{adapter}." in param_name or param_name.endswith(f".{adapter}")


def check_trained_parameters(peft_model: nn.Module, adapter: str = "default") -> None:
    """Every trainable parameter must belong to the trained adapter: the reference switches adapters, so a trained
    *base* parameter (PEFT's ``bias='all'`` / ``'lora_only'``, layers unfrozen by hand) would move the reference
    along with the student. Needed for the snapshot and disabled-adapter references (not for a separate model)."""
    bad = [n for n, p in peft_model.named_parameters() if p.requires_grad and not _in_adapter(n, adapter)]
    if bad:
        raise ValueError(
            f"BA-LoRA's reference is the trained model with its adapter switched, but {len(bad)} trainable "
            f"parameter(s) belong to no adapter (e.g. {bad[:3]}); they would change the reference along with the "
            "model, which is then not the pre-trained one. Freeze them (LoraConfig(bias='none'), no unfrozen base "
            "layers) and train extra modules through modules_to_save, or pass the pre-trained model as ref_model=."
        )


@dataclass
class Probe:
    """One forward of a few tokens: the model's logits (1, n, V), the backbone's final hidden states (1, n, d), and
    the trained modules that ran outside the backbone's forward (their effect would not be replayed)."""

    logits: torch.Tensor
    hidden: torch.Tensor
    ran_outside: list[str]
    scaled_logits: torch.Tensor | None = None
    scaled_hidden: torch.Tensor | None = None


def _probe_ids(base: nn.Module, n: int = 8) -> torch.Tensor:
    """(1, n) ordinary token ids: the lowest ids that no ``*_token_id`` / ``*_token_index`` of the config names (a
    VLM's image token would ask for pixel values)."""
    special: set[int] = set()
    cfgs = [base.config]
    if hasattr(base.config, "get_text_config"):
        cfgs.append(base.config.get_text_config())
    for cfg in cfgs:
        for key, value in cfg.to_dict().items():
            if key.endswith(("token_id", "token_index", "token_ids")):
                for v in value if isinstance(value, list | tuple) else [value]:
                    if isinstance(v, int):
                        special.add(v)
    vocab = base.get_output_embeddings().weight.shape[0]
    ids = [i for i in range(vocab) if i not in special][:n]
    return torch.tensor([ids])


PROBE_LOGITS = 1e3
"""The size the second probe forward drives the logits to: beyond the soft-caps and scales models use (30, 50)."""


def probe(peft_model: nn.Module, backbone: nn.Module, watched: dict[str, nn.Module]) -> Probe:
    """Run the model (adapter as it is) on a few tokens, no grad, every module in eval mode; restores the modules'
    train/eval flags and the RNG. ``watched`` modules are checked to run inside ``backbone``'s forward.

    A second forward multiplies the backbone's final hidden states by c = max(1, PROBE_LOGITS / max|logits|), so the
    head sees inputs whose logits reach the regime where a soft-cap or a logit scale shows, whatever the dtype
    (``scaled_hidden``, ``scaled_logits``).
    """
    base = peft_model.get_base_model()
    device = next(p.device for p in base.parameters())
    ids = _probe_ids(base).to(device)
    depth, seen, outside, factor = [0], {}, [], [1.0]

    def enter(module, args):
        depth[0] += 1

    def leave(module, args, output):
        depth[0] -= 1
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        if factor[0] != 1.0:
            hidden = hidden * factor[0]
            if hasattr(output, "last_hidden_state"):
                output.last_hidden_state = hidden  # a ModelOutput keeps its key and attribute in step
            else:
                output = (hidden, *output[1:])
        seen["hidden"] = hidden
        return output

    def watch(name):
        def hook(module, args):
            if depth[0] == 0 and name not in outside:
                outside.append(name)

        return hook

    handles = [backbone.register_forward_pre_hook(enter), backbone.register_forward_hook(leave)]
    handles += [m.register_forward_pre_hook(watch(n)) for n, m in watched.items()]
    training = [(m, m.training) for m in peft_model.modules()]
    cuda = sorted({p.device.index or 0 for p in peft_model.parameters() if p.device.type == "cuda"})
    try:
        peft_model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            out = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            result = Probe(logits=out.logits, hidden=seen["hidden"], ran_outside=list(outside))
            peak = float(out.logits.detach().float().abs().max())
            if peak > 0 and peak < PROBE_LOGITS:
                factor[0] = PROBE_LOGITS / peak
                out = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
                result.scaled_logits, result.scaled_hidden = out.logits, seen["hidden"]
    finally:
        for h in handles:
            h.remove()
        for m, flag in training:
            m.training = flag
    return result


def _trained_modules(base: nn.Module, adapter: str) -> dict[str, nn.Module]:
    """Modules (named relative to ``base``) that apply the adapter or hold a trainable parameter: the PEFT layer
    (LoRA layer, ``modules_to_save`` wrapper) around an adapter parameter, else the parameter's own module."""
    modules = dict(base.named_modules())
    tuners = {n for n, m in modules.items() if hasattr(m, "_active_adapter")}
    owners = set()
    for name, p in base.named_parameters():
        if not (p.requires_grad or _in_adapter(name, adapter) or _in_adapter(name, ref.REF_ADAPTER)):
            continue
        parts = name.split(".")[:-1]
        prefixes = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
        owners.add(next((q for q in prefixes if q in tuners), ".".join(parts)))
    return {n: modules[n] for n in owners if n in modules}


def probe_possible(base: nn.Module) -> bool:
    """A probe forward needs materialised weights: not on the meta device, not ZeRO-3 partitioned placeholders."""
    return not any(p.device.type == "meta" or hasattr(p, "ds_id") for p in base.parameters())


def replay_backbone(peft_model: nn.Module, adapter: str = "default") -> tuple[str, nn.Module, Probe | None]:
    """The module whose forward the NLG reference replays, its path in the base model, and its probe.

    The reference re-runs this module on the inputs the student's forward gave it, so every trained module must
    run inside it. The decoder (``get_decoder()``) is tried first (cheapest); when an adapter, ``modules_to_save``
    or a trainable parameter lies outside it or runs before it — a VLM's vision tower, projector or input
    embedding — the base model's whole backbone (``base_model_prefix``, e.g. ``LlavaModel``: vision + projector
    + language model) is replayed instead. Checked on behaviour with :func:`probe` (None when the weights are
    not materialised, e.g. ZeRO-3 placeholders: then by module containment only).
    """
    base = peft_model.get_base_model()
    inner = decoder_of(base)
    outer = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    candidates = [inner]
    if isinstance(outer, nn.Module) and outer is not inner and any(m is inner for m in outer.modules()):
        candidates.append(outer)
    names = {id(m): n for n, m in base.named_modules()}
    watched = _trained_modules(base, adapter)
    runnable = probe_possible(base)
    for cand in candidates:
        path = names[id(cand)]
        if any(not (n == path or n.startswith(path + ".")) for n in watched):
            continue
        result = probe(peft_model, cand, watched) if runnable else None
        if result is None or not result.ran_outside:
            return path, cand, result
    trained = sorted(watched)
    raise ValueError(
        f"BA-LoRA replays {type(base).__name__}'s backbone ({', '.join(names[id(c)] for c in candidates)}) for the "
        f"reference, but trained modules run outside it (e.g. {trained[:3]}): their effect on the backbone's "
        "inputs would not be undone, so the reference would not be the pre-trained model. Keep adapters and "
        "modules_to_save inside the decoder (target_modules / modules_to_save), or freeze those modules."
    )


def check_head_reproduces_logits(head: OutputHead, result: Probe, model: nn.Module) -> None:
    """Refuse a model whose own logits the fused head does not reproduce (on the probe: same forward, adapter as it
    is, and again with the hidden states scaled so the logits reach ~:data:`PROBE_LOGITS`, where a soft-cap or a
    scale shows beyond bf16 rounding). The fused head copies the head's weight and bias, ``logit_scale`` /
    ``logits_scaling`` and the final soft-cap from the config; a model that transforms its logits otherwise (its
    own multipliers, a soft-cap under another name) would have the terms act on other logits than its own."""
    rtol = 1e-4 if head.weight.dtype == torch.float32 else 2e-2  # bf16/fp16 logits are rounded to ~3 digits
    pairs = [(result.logits, result.hidden)]
    if result.scaled_logits is not None:
        pairs.append((result.scaled_logits, result.scaled_hidden))
    for logits, hidden in pairs:
        z = logits.detach().float()
        hidden = hidden.detach()
        fused = head.logits(hidden.reshape(-1, hidden.shape[-1])).reshape(z.shape)
        err, scale = float((fused - z).abs().max()), float(z.abs().max())
        if err > rtol * max(scale, float(fused.abs().max())) + 1e-6:
            break
    else:
        return
    inner = model.get_base_model() if ref.is_peft_model(model) else model
    raise ValueError(
        f"{type(inner).__name__} is not supported by BA-LoRA's fused path: its logits are not the output head's "
        f"(weight{' + bias' if head.bias is not None else ''}, scale {head.scale:g}, soft-cap {head.softcap}) applied "
        f"to the decoder's final hidden states — max difference {err:.3g} on logits up to {scale:.3g} on a probe of "
        f"{z.shape[-2]} tokens. The model transforms its logits in a way BA-LoRA does not copy, so the terms would "
        "act on other logits than the model's. Please report the model class; it cannot be trained with BA-LoRA "
        "until then."
    )


# Config keys that transform a causal LM's logits after its head (matched as substrings of the key, lower case),
# and the model types whose transform the fused head copies (OutputHead reads these keys; tests/test_model_families.py).
LOGIT_TRANSFORM_KEYS = ("softcap", "soft_cap", "logits_scal", "logit_scale")
LOGIT_MULTIPLIER_HINTS = (
    "lm_head",
    "logit",
    "output",
)  # a "*multiplier*" key acts on the head when it names it
_NOT_ON_HEAD = ("attn", "attention", "router")
HANDLED_LOGIT_KEYS = {
    "final_logit_softcapping": ("gemma2", "gemma3", "gemma3_text"),
    "logit_scale": ("cohere", "cohere2"),
    "logits_scaling": ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid"),
}


def logit_transform_keys(config: Any) -> dict[str, Any]:
    """``{key: value}`` of the config (and its text config) that set a transform of the logits BA-LoRA's fused head
    does not copy for this model type: a soft-cap (``*softcap*``, ``*soft_cap*``), a scale (``*logits_scal*``,
    ``*logit_scale*``) or a multiplier on the head (``*multiplier*`` naming the head or the logits), set to a value
    that changes the logits (a cap other than None / 0, a factor other than None / 1)."""
    found: dict[str, Any] = {}
    cfgs = [config]
    if hasattr(config, "get_text_config") and config.get_text_config() is not config:
        cfgs.append(config.get_text_config())
    for cfg in cfgs:
        model_type = getattr(cfg, "model_type", "")
        for key, value in cfg.to_dict().items():
            k = key.lower()
            if isinstance(value, dict) or any(x in k for x in _NOT_ON_HEAD):
                continue
            cap = "softcap" in k or "soft_cap" in k
            scale = any(x in k for x in LOGIT_TRANSFORM_KEYS[2:]) or (
                "multiplier" in k and any(x in k for x in LOGIT_MULTIPLIER_HINTS)
            )
            if not (cap or scale) or value is None or value is False:
                continue
            if isinstance(value, int | float) and float(value) == (0.0 if cap else 1.0):
                continue
            if model_type in HANDLED_LOGIT_KEYS.get(key, ()):
                continue
            found[key] = value
    return found


def check_head_config(model: nn.Module) -> None:
    """When the head cannot be probed (weights on the meta device or ZeRO-3 placeholders at preparation), refuse a
    model whose config names a transform of the logits the fused head does not copy (:func:`logit_transform_keys`)."""
    base = model.get_base_model() if ref.is_peft_model(model) else model
    keys = logit_transform_keys(base.config)
    if not keys:
        return
    shown = ", ".join(f"{k}={v!r}" for k, v in keys.items())
    raise ValueError(
        f"{type(base).__name__} cannot be checked by BA-LoRA: its weights are not materialised at preparation (meta "
        f"device or ZeRO-3 partitions), so the probe that compares the fused head with the model's own logits cannot "
        f"run, and its config sets {shown}, which transforms the logits in a way the fused head does not copy for "
        f"model_type {getattr(base.config, 'model_type', None)!r}; the terms would act on other logits than the "
        "model's. Prepare BA-LoRA on a model with materialised weights (loaded without zero.Init or meta device) so "
        "the probe can decide, or report the model class."
    )


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


def _plain_weight(module: nn.Module) -> torch.Tensor | None:
    """The pre-trained weight under a module, looking through PEFT's LoRA layer / ``modules_to_save`` wrapper."""
    if hasattr(module, "get_base_layer"):
        module = module.get_base_layer()
    module = getattr(module, "original_module", module)
    return getattr(module, "weight", None)


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
    if config.task == "nlu":
        problem = getattr(base.config, "problem_type", None)
        if problem == "multi_label_classification":
            raise multi_label_error(type(base).__name__)
        if int(base.config.num_labels) == 1 or problem == "regression":
            raise ValueError(
                f"BALoRAConfig.task='nlu' on a regression head ({type(base).__name__} with "
                f"num_labels={base.config.num_labels}, problem_type={problem!r}, e.g. STS-B): BA-LoRA's NLU terms "
                "are defined on class logits — the softmax consistency KL of one output is identically 0, the "
                "decorrelation of one column has no off-diagonal, and the SVD share of a rank-1 matrix is 1 — and "
                "on regression outputs they would regularise meaningless quantities. BA-LoRA defines no regression "
                "form: train this task without the BA-LoRA terms (plain LoRA / PiSSA)."
            )
    if config.task == "nlg":
        if is_cls or base.get_output_embeddings() is None:
            raise ValueError(
                f"BALoRAConfig.task='nlg' but {type(base).__name__} has no language-model head; use task='nlu' "
                "(preset 'iclr2026-nlu') for classifiers."
            )
        head = base.get_output_embeddings()
        trained = hasattr(head, "base_layer") or hasattr(head, "modules_to_save") or head.weight.requires_grad
        emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
        emb_trained = emb is not None and (
            hasattr(emb, "base_layer") or hasattr(emb, "modules_to_save") or emb.weight.requires_grad
        )
        if trained and emb_trained and _plain_weight(emb) is _plain_weight(head):
            raise ValueError(
                "BA-LoRA computes its terms from the frozen output head, but this model ties the head to the input "
                "embedding (tie_word_embeddings=True) and the embedding is trained, which trains the tied head with "
                "it (LoRA on or modules_to_save of the embedding with ensure_weight_tying=True, or a trainable "
                "embedding weight). Leave the input embedding out of the adapter, or keep the head untied from it "
                "(ensure_weight_tying=False: the embedding's copy is trained, the head keeps the frozen weight)."
            )
        if trained:
            raise ValueError(
                "BA-LoRA computes its terms from the frozen output head, but the head is trained (LoRA on it, "
                "modules_to_save, or trainable lm_head weights). Remove 'lm_head' from target_modules / "
                "modules_to_save and keep the head frozen."
            )
    start = ref.adapter_start(peft_model, adapter)
    if start.rewritten or (start.rewritten is None and config.reference == "adapter_snapshot"):
        quant = quantized_layer_types(base)
        qcfg = getattr(base.config, "quantization_config", None)
        method = (
            qcfg.get("quant_method") if isinstance(qcfg, dict) else getattr(qcfg, "quant_method", None)
        ) or ""
        if not quant and (qcfg is None or str(method).split(".")[-1].lower() in ("gguf", "")):
            return
        init = start.init
        # QPiSSA (docs/qlora.md): a PiSSA adapter — by its config, or a pre-initialised pair recognised on its
        # residual — on a 4-bit bitsandbytes residual; the reference is the step-0 model Q(W_res) + s·B0A0.
        pissa = (isinstance(init, str) and init.lower().startswith("pissa")) or not ref.init_rewrites_base(
            init
        )
        if pissa and quant:
            check_quantised_pissa(
                base, init, bool(getattr(peft_model.peft_config[adapter], "use_dora", False))
            )
            return
        raise ValueError(
            f"init_lora_weights={init!r} on a quantised base ({quant[0] if quant else method}) — "
            f"{start.reason}: its residual cannot be stored exactly in quantised weights and BA-LoRA supports "
            "only PiSSA there (QPiSSA on a 4-bit bitsandbytes base, balora_plugins.core.get_qpissa_model). Load "
            "the base unquantised, use init_lora_weights='pissa' / 'pissa_niter_N' on a 4-bit base, or plain LoRA "
            "init (init_lora_weights=True)."
        )


# ---------------------------------------------------------------------------------------------- classifier heads
def classifier_head(peft_model: nn.Module) -> list[nn.Module]:
    """The trained modules of a classifier that lie outside its pre-trained backbone (``base_model_prefix``, e.g.
    ``bert``): the head — PEFT's ``modules_to_save`` wrapper of ``classifier`` / ``score`` (and of a pooler outside
    the backbone, as DeBERTa's), or a LoRA layer on it. Empty when the head is frozen."""
    base = peft_model.get_base_model()
    backbone = getattr(base, getattr(base, "base_model_prefix", "") or "", None)
    inside = set()
    if isinstance(backbone, nn.Module) and backbone is not base:
        inside = {id(m) for m in backbone.modules()}
    found: list[nn.Module] = []
    covered: set[int] = set()
    for m in base.modules():
        if id(m) in inside or id(m) in covered or not hasattr(m, "_active_adapter"):
            continue
        found.append(m)
        covered.update(id(sub) for sub in m.modules())
    return found


def classifier_head_is_new(base: nn.Module) -> bool:
    """Whether a classifier's head was not in the checkpoint it was loaded from: the checkpoint's config names
    other architectures (``BertModel`` for a ``BertForSequenceClassification``), so transformers initialised the
    head randomly — or the model was built from a config (no architectures recorded)."""
    return type(base).__name__ not in (getattr(base.config, "architectures", None) or [])


def new_head_warning(peft_model: nn.Module, config: BALoRAConfig) -> str | None:
    """The warning for the paper's NLU reference on a new classifier head (None when it does not apply).

    With ``reference_head='initial'`` the reference is the pre-trained backbone with the step-0 head; when that
    head is new (:func:`classifier_head_is_new`) and trained, the consistency term pulls towards a random head.
    """
    base = peft_model.get_base_model()
    if (
        config.task != "nlu"
        or config.reference_head != "initial"
        or not config.lambda_consistency > 0
        or not classifier_head(peft_model)
        or not classifier_head_is_new(base)
    ):
        return None
    archs = getattr(base.config, "architectures", None)
    origin = f"the checkpoint's config names {archs}" if archs else "the model was built from a config"
    weight = config.lambda_consistency * config.consistency_temperature**2
    return (
        f"BA-LoRA: {type(base).__name__}'s classifier head is new ({origin}, so the head started random), and "
        "BALoRAConfig.reference_head='initial' (the paper's formula) reads the reference through that step-0 head. "
        f"The consistency term (weight λ1·T² = {weight:g}) then pulls the predictions towards a near-uniform random "
        "head — a confidence penalty plus that head's random class bias — and cannot preserve pre-trained knowledge "
        "the head never had. To anchor the pre-trained representation instead, set reference_head='current' "
        "(preset 'iclr2026-nlu-current-head'; docs/method.md, Classifiers with a new head)."
    )


def multi_label_error(model_class: str) -> ValueError:
    """The refusal of a multi-label classifier (``problem_type='multi_label_classification'``, or float multi-hot
    labels, from which transformers infers it at the first forward)."""
    return ValueError(
        f"BALoRAConfig.task='nlu' on a multi-label classifier ({model_class} with problem_type="
        "'multi_label_classification' or float multi-hot labels): BA-LoRA's NLU terms assume one softmax over "
        "mutually exclusive classes — the consistency term compares softmax(Z/T) distributions, the decorrelation "
        "and SVD terms treat the class logits as competing scores — while a multi-label head scores each label with "
        "its own sigmoid, so the terms would tie independent labels together. BA-LoRA defines no sigmoid form: "
        "train this task without the BA-LoRA terms (plain LoRA / PiSSA), or, if exactly one label applies per "
        "example, use problem_type='single_label_classification' with integer labels."
    )


def dropout_warning(peft_model: nn.Module, adapter: str = "default") -> str | None:
    """The warning for ``lora_dropout > 0`` on an adapter whose base was rewritten (PiSSA-like; None otherwise).

    PEFT applies LoRA dropout to the adapter's input, so with PiSSA it drops the input of the principal components
    the adapter holds: in training mode the model at step 0 is no longer the pre-trained one (the consistency term
    is not 0 at step 0) and the principal directions train on dropped-out inputs. The paper's recipe and the
    authors' script use 0 (docs/method.md §1).
    """
    dropout = float(getattr(peft_model.peft_config.get(adapter), "lora_dropout", 0.0) or 0.0)
    start = ref.adapter_start(peft_model, adapter)
    if dropout <= 0 or not start.rewritten:
        return None
    return (
        f"BA-LoRA: lora_dropout={dropout:g} with an adapter on a rewritten base ({start.reason}): PEFT's LoRA dropout "
        "drops the input of the principal components the adapter holds, so in training mode the model at step 0 is "
        "not the pre-trained one (the consistency term is not 0 at step 0) and the principal directions train on "
        "dropped-out inputs. The paper's recipe and the authors' script use 0: set LoraConfig(lora_dropout=0.0)."
    )
