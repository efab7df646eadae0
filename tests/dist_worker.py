"""Worker for tests/test_distributed.py: a few BA-LoRA steps with the shared Trainer mixin.

Run alone (world size 1) or under ``torch.distributed.run --nproc_per_node 2`` (gloo on CPU); writes the
final adapter weights and the logged losses to OUT (rank 0). Argument: OUT PER_DEVICE_BATCH.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch.utils.data import SequentialSampler

sys.path.insert(0, os.path.dirname(__file__))
from conftest import CONSTANT, close_process_group, lora, tiny_llama  # noqa: E402

from balora_plugins import BALoRAConfig  # noqa: E402
from balora_plugins.trainer_mixin import BALoRATrainerMixin  # noqa: E402


def collate(rows):
    t = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    labels = torch.full((len(rows), t), -100)
    attn = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        attn[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}


def dataset(n=16):
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        length = 6 + (i * 5) % 9  # unequal lengths: token normalisation matters
        ids = torch.randint(3, 96, (length,), generator=g).tolist()
        prompt = 2 + i % 3
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def main(out: str, per_device: int, ga: int = 1) -> None:
    from transformers import Trainer, TrainingArguments

    class T(BALoRATrainerMixin, Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    model = lora(tiny_llama(seed=3), init="pissa")
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=ga,
        max_steps=3,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        average_tokens_across_devices=True,
        max_grad_norm=1e9,
        dataloader_drop_last=True,
    )
    cfg = BALoRAConfig(
        lambda_consistency=1.0, lambda_diversity=0.5, lambda_svd=0.0, diversity_top_k=8, **CONSTANT
    )
    trainer = T(model=model, args=args, train_dataset=dataset(), data_collator=collate)
    trainer.balora_setup(cfg)
    initial = {k: v.detach().clone() for k, v in model.named_parameters() if ".default." in k}
    trainer.train()
    if trainer.args.process_index == 0:
        state = {k: v.detach().clone() for k, v in model.named_parameters() if ".default." in k}
        torch.save({"final": state, "initial": initial}, os.path.join(out, "adapter.pt"))
        logs = [h for h in trainer.state.log_history if "loss" in h]
        with open(os.path.join(out, "logs.json"), "w") as f:
            json.dump(logs, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1)
    close_process_group()
