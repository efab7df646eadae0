"""The terms act on the logits the model itself produces: the fused head (decoder's final hidden states → frozen
output head) against ``model(...).logits``, per model family, on tiny random configs built here.

Families whose logits the fused head reproduces train; the others are refused at preparation, naming the class.
A family missing from the installed transformers is skipped.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import CONSTANT, TINY_TEXT, TINY_VISION, perturb
from peft import LoraConfig, get_peft_model

from balora_plugins import BALoRAConfig
from balora_plugins.core import BALoRAObjective, decoder_of, output_head

TEXT = {**TINY_TEXT, "num_hidden_layers": 1, "max_position_embeddings": 64}
# Each transform is set far from 1 (the heads are scaled up below), so a mishandled one shows in the logits.
SUPPORTED = {
    "llama (tied head)": ("Llama", {}),
    "llama (untied head)": ("Llama", {"tie_word_embeddings": False}),
    "qwen2": ("Qwen2", {}),
    "qwen3": ("Qwen3", {"head_dim": 8}),
    "gemma2 (final soft-cap)": ("Gemma2", {"head_dim": 8, "final_logit_softcapping": 2.0}),
    "cohere (logit_scale)": ("Cohere", {"logit_scale": 4.0}),
    "granite (logits_scaling)": ("Granite", {"logits_scaling": 4.0}),
    "minicpm3 (dim_model_base)": (
        "MiniCPM3",
        {
            "q_lora_rank": 16,
            "kv_lora_rank": 8,
            "qk_nope_head_dim": 4,
            "qk_rope_head_dim": 4,
            "v_head_dim": 8,
            "dim_model_base": 8,
        },
    ),
    "phi (head bias)": ("Phi", {}),
}
REFUSED = {
    "falcon_h1 (lm_head_multiplier)": (
        "FalconH1",
        {
            "lm_head_multiplier": 4.0,
            "mamba_d_ssm": 32,
            "mamba_n_heads": 4,
            "mamba_d_head": 8,
            "mamba_d_state": 8,
            "mamba_n_groups": 1,
            "mamba_chunk_size": 8,
            "head_dim": 8,
        },
    ),
    "hyperclovax (logits_scaling multiplies)": ("HyperCLOVAX", {"logits_scaling": 4.0}),
    "recurrent_gemma (logits_soft_cap)": (
        "RecurrentGemma",
        {
            "logits_soft_cap": 2.0,
            "lru_width": 32,
            "attention_window_size": 16,
            "block_types": ["recurrent", "attention"],
            "num_hidden_layers": 2,
            "head_dim": 8,
        },
    ),
    "aya_vision (text logit_scale not applied)": (
        "AyaVision",
        {"image_token_index": 95, "downsample_factor": 1},
    ),
    "cohere2_vision (text logit_scale not applied)": (
        "Cohere2Vision",
        {"image_token_id": 95, "downsample_factor": 1},
    ),
}


def _build(family: str, extra: dict):
    """A tiny random model of ``family`` with its LM head scaled ×20, so logits reach the soft-cap/scale range."""
    names = {
        "AyaVision": ("AyaVisionConfig", "AyaVisionForConditionalGeneration"),
        "Cohere2Vision": ("Cohere2VisionConfig", "Cohere2VisionForConditionalGeneration"),
    }.get(family, (f"{family}Config", f"{family}ForCausalLM"))
    config_cls, model_cls = (getattr(transformers, n, None) for n in names)
    if config_cls is None or model_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {names[1]}")
    torch.manual_seed(0)
    if family in ("AyaVision", "Cohere2Vision"):  # Cohere2 text model (logit_scale in its config) + SigLIP
        text = transformers.Cohere2Config(**TEXT, logit_scale=4.0).to_dict()
        vision = transformers.SiglipVisionConfig(**TINY_VISION).to_dict()
        config = config_cls(text_config=text, vision_config=vision, **extra)
    else:
        config = config_cls(**{**TEXT, **extra})
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.get_output_embeddings().parameters():
            p.mul_(20.0)
    targets = ["q_proj", "v_proj", "o_proj", "q_a_proj", "kv_b_proj", "dense", "down_proj"]  # not Mamba's
    return get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=True)
    )


# the adapter is moved before preparing (the probe sees the student's own logits): its base is untouched
CFG = BALoRAConfig(**CONSTANT, reference="disabled_adapter")


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_fused_head_reproduces_the_models_logits(name):
    model = _build(*SUPPORTED[name])
    perturb(model)  # with the student's adapter active
    BALoRAObjective(CFG).prepare(model)  # the guard passes
    base = model.get_base_model()
    seen = {}
    hook = decoder_of(base).register_forward_hook(lambda m, a, o: seen.update(h=o[0]))
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        hook.remove()
    fused = output_head(base).logits(seen["h"].reshape(-1, seen["h"].shape[-1])).reshape(logits.shape)
    torch.testing.assert_close(fused, logits, rtol=1e-5, atol=1e-5)
    assert logits.abs().max() > 1.0  # the transforms above act on logits of this size


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_model_whose_logits_the_fused_head_misses_is_refused_naming_it(name):
    model = _build(*REFUSED[name])
    cls = type(model.get_base_model()).__name__
    rng, training = torch.get_rng_state(), {n: m.training for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=rf"{cls} is not supported by BA-LoRA's fused path.*max difference"):
        BALoRAObjective(CFG).prepare(model)
    assert list(model.peft_config) == ["default"]  # refused before anything was added
    assert (
        torch.equal(torch.get_rng_state(), rng)
        and {n: m.training for n, m in model.named_modules()} == training
    )


def test_the_probe_restores_modes_and_rng():
    model = _build("Llama", {})
    model.train()
    model.get_base_model().model.layers[0].eval()  # a mixed pattern comes back as it was
    training = {n: m.training for n, m in model.named_modules()}
    rng = torch.get_rng_state()
    BALoRAObjective(CFG).prepare(model)
    assert {n: m.training for n, m in model.named_modules()} == training
    assert torch.equal(torch.get_rng_state(), rng)
