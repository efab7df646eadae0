"""Worker for tests/test_engines.py: a few BA-LoRA steps through one door under one engine.

Run as one process (``--engine single``) or under ``torch.distributed.run --nproc_per_node 2`` on CPU (gloo):
``--engine zero2|zero3`` (DeepSpeed through ``TrainingArguments(deepspeed=...)``), ``fsdp1|fsdp2``
(``TrainingArguments(fsdp=..., fsdp_config=...)``) or ``ddp``. ``--door callback`` is a plain transformers
``Trainer`` with :class:`BALoRACallback`; ``--door trl`` is :class:`BALoRASFTTrainer`. Both doors train the same
tiny PiSSA Llama on the same token rows in the same order, so every run of the same global batch ends with the
same adapter. Rank 0 writes the final adapter (``final/``, saved through the door's ``save_model``) and the
logged losses (``logs.json``) into OUT.

``--kill-after K`` ends every process right after checkpoint K is written (as a killed job would);
``--resume`` resumes from the last checkpoint in OUT after halving the in-memory reference adapter, so the
run only ends right if the reference is restored from the checkpoint. ``--ref-model`` passes the pre-trained
base as an explicit ``ref_model=``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "cpu_launch")]

from cpu_engines import configure  # noqa: E402

ENGINES = ("single", "ddp", "zero2", "zero3", "fsdp1", "fsdp2")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--engine", choices=ENGINES, default="single")
    p.add_argument("--door", choices=("callback", "trl"), default="callback")
    p.add_argument("--per-device", type=int, default=2)
    p.add_argument("--ga", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--save-steps", type=int, default=0)
    p.add_argument("--kill-after", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--ref-model", action="store_true")
    p.add_argument("--host-only", action="store_true", help="the plain Trainer without BA-LoRA (a control)")
    return p.parse_args(argv)


def deepspeed_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {
            "stage": stage,
            "stage3_gather_16bit_weights_on_model_save": True,
            # partition every parameter of the tiny model (by default ZeRO-3 keeps tensors under 1e5 whole)
            "stage3_param_persistence_threshold": 0,
        },
    }


def fsdp_kwargs(version: int) -> dict:
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": version,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            "state_dict_type": "FULL_STATE_DICT" if version == 1 else "SHARDED_STATE_DICT",
            # FSDP1's broadcast of rank 0's weights looks up a GPU; every rank builds the same model anyway
            "sync_module_states": False,
        },
    }


def token_rows(n: int = 32):
    """Rows of random token ids of unequal length (token normalisation matters); a prompt of 2-4 tokens."""
    import torch

    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        length = 6 + (i * 5) % 9
        ids = torch.randint(3, 96, (length,), generator=g).tolist()
        prompt = 2 + i % 3
        rows.append({"input_ids": ids, "completion_mask": [0] * prompt + [1] * (length - prompt)})
    return rows


def with_labels(rows):
    """The same rows for the plain Trainer: ``labels`` = the ids, -100 on the prompt (TRL's collator does this)."""
    return [
        {
            "input_ids": r["input_ids"],
            "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])],
        }
        for r in rows
    ]


def main(argv=None) -> None:
    a = parse(argv)
    configure("deepspeed" if a.engine.startswith("zero") else "fsdp" if a.engine.startswith("fsdp") else "")
    import torch
    from conftest import lora, tiny_llama, tiny_tokenizer
    from dist_worker import collate
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from balora_plugins import BALoRAConfig
    from balora_plugins.callback import BALoRACallback
    from balora_plugins.core.reference import REF_ADAPTER

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if a.kill_after and state.global_step == a.kill_after:
                if torch.distributed.is_initialized():
                    torch.distributed.barrier()
                os._exit(0)

    class InOrder:  # the same rows in the same order on every engine (a rank takes every world-th batch)
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    common = dict(
        output_dir=a.out,
        per_device_train_batch_size=a.per_device,
        gradient_accumulation_steps=a.ga,
        max_steps=a.steps,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        save_strategy="steps" if a.save_steps else "no",
        save_steps=a.save_steps or 500,
        seed=0,
        average_tokens_across_devices=True,
        max_grad_norm=1e9,
        dataloader_drop_last=True,
        disable_tqdm=True,
    )
    if a.engine in ("zero2", "zero3"):
        common.update(deepspeed=deepspeed_config(int(a.engine[-1])))
    elif a.engine.startswith("fsdp"):
        common.update(**fsdp_kwargs(int(a.engine[-1])))
    else:
        common.update(use_cpu=True)
    cfg = BALoRAConfig(
        lambda_consistency=1.0,
        lambda_diversity=0.5,
        lambda_svd=0.1,
        diversity_top_k=8,
        svd_top_k=2,
        consistency_schedule="constant",
        regularizer_schedule="constant",
    )
    model = lora(tiny_llama(seed=3), init="pissa")
    ref_model = tiny_llama(seed=3) if a.ref_model else None
    rows = token_rows()
    if a.door == "trl":
        from datasets import Dataset
        from trl import SFTConfig

        from balora_plugins.trl import BALoRASFTTrainer

        class SFT(InOrder, BALoRASFTTrainer):
            pass

        trainer = SFT(
            model,
            args=SFTConfig(**common, max_length=64, bf16=False, completion_only_loss=True),
            train_dataset=Dataset.from_list(rows),
            processing_class=tiny_tokenizer(),
            balora_config=cfg,
            ref_model=ref_model,
            callbacks=[Kill()],
        )
        save = trainer.save_model
    else:

        class Plain(InOrder, Trainer):
            pass

        balora = BALoRACallback(cfg, ref_model=ref_model)
        trainer = Plain(
            model=model,
            args=TrainingArguments(**common),
            train_dataset=with_labels(rows),
            data_collator=collate,
            callbacks=[Kill()] if a.host_only else [balora, Kill()],
        )
        save = trainer.save_model if a.host_only else balora.save_model
    if a.engine == "fsdp1":  # see cpu_launch/cpu_engines.py
        from torch.distributed.fsdp import FullStateDictConfig

        trainer.accelerator.state.fsdp_plugin.state_dict_config = FullStateDictConfig()
    if a.resume:
        with torch.no_grad():  # resume must take the reference from the checkpoint, not from memory
            for n, p in model.named_parameters():
                if f".{REF_ADAPTER}." in n:
                    p.mul_(0.5)
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    facts = engine_facts(trainer, model)  # after training: the engine's wrapping is in place
    save(os.path.join(a.out, "final"))
    if trainer.args.process_index == 0:
        logs = [h for h in trainer.state.log_history if "loss" in h]
        with open(os.path.join(a.out, "logs.json"), "w", encoding="utf-8") as f:
            json.dump({"logs": logs, "facts": facts}, f)


def engine_facts(trainer, model) -> dict:
    """What the run really was (so a test cannot pass on an engine that silently fell back to one process)."""
    from balora_plugins import engines
    from balora_plugins.core import distributed

    head = model.get_base_model().get_output_embeddings().weight
    ref_model = trainer.balora.ref_model  # the explicit ref_model as the run placed it (None without one)
    return {
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1],
        "zero_stage": engines.zero_stage(trainer.accelerator),
        "fsdp_version": engines.fsdp_version(trainer.accelerator),
        "head_sharded": distributed.is_sharded(head)
        or distributed.fsdp1_root(trainer.model_wrapped) is not None,
        "ref_model": None if ref_model is None else type(ref_model).__name__,
    }


if __name__ == "__main__":
    main()
    from conftest import close_process_group  # after main(): torch is imported once the engine is configured

    close_process_group()
