"""Shared fixtures: tiny random models built in the test (no downloads, seconds each)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 96
TINY_TEXT = dict(  # the decoder every tiny test model uses (Llama-style config keys)
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# a vision tower (CLIP / SigLIP keys) on 8×8 images of 4 patches
TINY_VISION = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=8,
    patch_size=4,
)
CONSTANT = {
    "consistency_schedule": "constant",
    "regularizer_schedule": "constant",
}  # every term on from step 1


def tiny_llama(seed: int = 0, vocab: int = VOCAB, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY_TEXT, "vocab_size": vocab}, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def tiny_llava(seed: int = 0):
    """A tiny Llava (CLIP vision tower, projector, the tiny Llama): one 8×8 image is 4 patches of 4×4, its
    placeholder token id 95."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**TINY_VISION),
        text_config=LlamaConfig(**TINY_TEXT),
        image_token_index=95,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(cfg).eval()


def perturb(model, adapter: str = "default", seed: int = 1, scale: float = 0.05) -> None:
    """Stand-in for optimizer steps: move every parameter of ``adapter``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{adapter}." in n:
                p.add_(scale * torch.randn(p.shape, generator=g))


def tiny_tokenizer(vocab: int = VOCAB):
    """A word-level tokenizer built in memory: <pad>=0, <s>=1, </s>=2, then 'a'..'z', digits, words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = (
        ["<pad>", "<s>", "</s>", "<unk>"]
        + [chr(ord("a") + i) for i in range(26)]
        + [str(i) for i in range(10)]
    )
    words += [f"w{i}" for i in range(vocab - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    # Renders "<role> : <content> </s> " per message; {% generation %} marks the assistant's content and its </s>
    # (what TRL's assistant_only_loss trains on).
    fast.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{{ m['role'] }} : {% generation %}{{ m['content'] }} </s>{% endgeneration %} "
        "{% else %}{{ m['role'] }} : {{ m['content'] }} </s> {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    return fast


def tiny_bert_classifier(seed: int = 0, num_labels: int = 4):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


def lora(
    model,
    init="pissa",
    r=4,
    alpha=8,
    targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    **kw,
):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), init_lora_weights=init, **kw
    )
    return get_peft_model(model, cfg)


def batch(b=2, t=12, seed=0, vocab=VOCAB, prompt=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    attn = torch.ones_like(ids)
    if b > 1:  # right padding on the last row
        ids[-1, -3:] = 0
        labels[-1, -3:] = -100
        attn[-1, -3:] = 0
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def pissa_llama():
    return lora(tiny_llama(), init="pissa")
