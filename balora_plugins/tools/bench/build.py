"""Set-up: the models (causal LM, classifier), their micro-batches, the PiSSA adapter, the BA-LoRA configs."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .args import NLU_SHAPE, SHAPES, dtype_name

NLG_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NLU_TARGETS = ["query", "key", "value", "dense"]


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def model_shape(args: argparse.Namespace) -> dict[str, int]:
    shape = dict(SHAPES[args.shape])
    for key in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    return shape


def nlu_shape(args: argparse.Namespace) -> dict[str, int]:
    shape = dict(NLU_SHAPE)
    for key in shape:
        if getattr(args, f"nlu_{key}") is not None:
            shape[key] = getattr(args, f"nlu_{key}")
    return shape


def build_model(args: argparse.Namespace, dtype: str | None = None):
    """The pre-trained causal LM (eval mode, on the device, in ``dtype`` or the main dtype): random of
    ``--shape`` or ``--model``."""
    import torch

    dtype = torch_dtype(dtype or dtype_name(args))
    if args.model:
        from balora_plugins.tools.assets import load_causal_lm

        model, _ = load_causal_lm(
            None if args.model == "smollm2" else args.model, dtype=dtype, log=lambda *a: None
        )
        if args.layers is not None:
            model.model.layers = model.model.layers[: args.layers]
            model.config.num_hidden_layers = args.layers
        return model.to(args.device).eval()
    from transformers import LlamaConfig, LlamaForCausalLM

    s = model_shape(args)
    cfg = LlamaConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=max(2048, args.seq_len),
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg._attn_implementation = args.attn
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def build_classifier(args: argparse.Namespace):
    """The pre-trained classifier: a random BERT of :data:`NLU_SHAPE` (overridable), main dtype, eval mode."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    s = nlu_shape(args)
    cfg = BertConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=max(1, s["hidden"] // 32),
        intermediate_size=4 * s["hidden"],
        max_position_embeddings=max(512, args.nlu_seq_len),
        num_labels=s["classes"],
    )
    cfg._attn_implementation = args.attn
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = BertForSequenceClassification(cfg)
    return model.to(torch_dtype(dtype_name(args))).eval()


def make_batch(args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """``batch × seq_len`` random tokens; the first ``prompt_frac`` of each sequence is prompt (label -100)."""
    import torch

    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(3, vocab, (args.batch, args.seq_len), generator=g)
    labels = ids.clone()
    labels[:, : int(args.prompt_frac * args.seq_len)] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(args.device) for k, v in batch.items()}


def make_nlu_batch(args: argparse.Namespace, vocab: int, classes: int) -> dict[str, Any]:
    """``nlu_batch`` random examples of ``nlu_seq_len`` tokens, the last quarter of every other one padding."""
    import torch

    g = torch.Generator().manual_seed(args.seed + 3)
    n, t = args.nlu_batch, args.nlu_seq_len
    ids = torch.randint(3, vocab, (n, t), generator=g)
    mask = torch.ones_like(ids)
    pad = t // 4
    if pad:
        ids[1::2, t - pad :] = 0
        mask[1::2, t - pad :] = 0
    labels = torch.randint(0, classes, (n,), generator=g)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
        "labels": labels,
    }
    return {k: v.to(args.device) for k, v in batch.items()}


def add_pissa(model, args: argparse.Namespace, task: str = "nlg"):
    """Wrap ``model`` with the PiSSA LoRA adapter (dropout 0): all attention and MLP projections of the causal
    LM (r = ``--rank``), or the BERT classifier's query/key/value/dense (r = ``--nlu-rank``, classifier trained).

    The PiSSA SVDs are the slowest part of the set-up on a CPU, so with ``--model-cache`` the first variant
    saves the initialised model's state and the others load it (an identical model: same seed, same init; a
    variant in another dtype loads it cast to its dtype, as if the pre-trained model had been loaded so).
    """
    from peft import LoraConfig, get_peft_model

    init = args.init
    name = "pissa_state.pt" if task == "nlg" else "nlu_pissa_state.pt"
    cache = os.path.join(args.model_cache, name) if args.model_cache else None
    cached = cache is not None and os.path.exists(cache)
    rank = args.rank if task == "nlg" else args.nlu_rank
    cfg = LoraConfig(
        r=rank,
        lora_alpha=(args.alpha if args.alpha is not None else rank) if task == "nlg" else rank,
        lora_dropout=0.0,
        target_modules=NLG_TARGETS if task == "nlg" else NLU_TARGETS,
        init_lora_weights=True if cached else init,
        task_type="CAUSAL_LM" if task == "nlg" else "SEQ_CLS",
    )
    peft_model = get_peft_model(model, cfg)
    if cached:
        import torch

        missing, unexpected = peft_model.load_state_dict(
            torch.load(cache, map_location=args.device), strict=False
        )
        if missing or unexpected:
            raise RuntimeError(
                f"stale --model-cache {cache}: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        peft_model.peft_config["default"].init_lora_weights = init  # the residual base of a PiSSA model
    elif cache is not None:
        import torch

        torch.save(peft_model.state_dict(), cache + ".tmp")
        os.replace(cache + ".tmp", cache)
    peft_model.train()
    return peft_model


def add_qpissa(model, args: argparse.Namespace, dtype: str):
    """QPiSSA of ``model`` (the pre-trained causal LM, deleted by the caller afterwards): it is saved once into
    ``--model-cache`` (or a temporary folder), loaded from there with bitsandbytes 4-bit nf4 (compute dtype
    ``dtype``), and the PiSSA adapter (``--init``, r = ``--rank``) is factorised from the saved full-precision
    weights with the residual re-quantised (``balora_plugins.core.get_qpissa_model``)."""
    import tempfile

    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from balora_plugins.core import get_qpissa_model

    folder = os.path.join(args.model_cache or tempfile.mkdtemp(prefix="balora-bench-q4-"), "q4_base")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        model.save_pretrained(folder + ".tmp")
        os.replace(folder + ".tmp", folder)
    q4 = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype(dtype)
    )
    quantised = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=q4, device_map=str(args.device), dtype=torch_dtype(dtype)
    )
    cfg = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha if args.alpha is not None else args.rank,
        lora_dropout=0.0,
        target_modules=NLG_TARGETS,
        init_lora_weights=args.init,
        task_type="CAUSAL_LM",
    )
    peft_model = get_qpissa_model(quantised, cfg)
    peft_model.train()
    return peft_model


def balora_config(args: argparse.Namespace, task: str = "nlg", **overrides: Any):
    """The preset the variants run (``iclr2026-nlg`` / ``iclr2026-nlu``) with constant schedules."""
    from balora_plugins import BALoRAConfig

    extra = {} if args.chunk_size is None else {"chunk_size": args.chunk_size}
    return BALoRAConfig.from_preset(
        f"iclr2026-{task}",
        consistency_schedule="constant",
        regularizer_schedule="constant",
        **extra,
        **overrides,
    )
