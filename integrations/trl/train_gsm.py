"""Fine-tune SmolLM2-135M-Instruct on GSM-style word problems with BA-LoRA + PiSSA through TRL.

    python integrations/trl/train_gsm.py                          # the bundled SmolLM2-135M-Instruct
    python integrations/trl/train_gsm.py --model path/or/hub-id   # any causal LM (folder, .gguf, cached hub id)
    python integrations/trl/train_gsm.py --tiny                   # tiny random llama, a few steps (CI, seconds)
    python integrations/trl/train_gsm.py --balora_lambda_svd 0.01 --balora_consistency_schedule adaptive
    python integrations/trl/train_gsm.py --config run.yaml        # any of the options below, as YAML keys

The arguments are parsed by TRL's ``TrlParser`` into this script's options, ``BALoRASFTConfig`` (TRL's
``SFTConfig`` with every BA-LoRA setting as a ``balora_*`` option; ``--help`` lists them) — the same keys work
on the command line and in a ``--config`` YAML file. ``--balora_init`` (default here ``pissa_niter_16``, the
paper's; ``--tiny``: ``pissa``; ``lora``: plain LoRA) initialises the adapter. ``--no_balora`` sets every λ to 0:
plain PiSSA, identical to ``trl.SFTTrainer``.

Data: ``reasoning_gym`` ``gsm_symbolic`` problems, generated offline from a seed, as a conversational
prompt-completion dataset (user: the question; assistant: the worked solution ending in ``#### <answer>``), so
TRL trains on the assistant's tokens only. Held-out problems give the eval loss (answer NLL under teacher
forcing) and, with ``--generate N``, greedy exact match scored by the dataset's own scorer. Writes the plain LoRA
adapter that serves on the untouched base model, ``balora_config.json``, the model card and ``balora_resume/``
(the trainable PiSSA form) into ``--output_dir``. Models and data come from ``balora_plugins.tools.assets``
(offline; see docs/assets.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INSTRUCTION = "Solve the problem step by step. End with a line '#### <answer>'."
# TRL's defaults suit a GPU (bf16, gradient checkpointing); these suit this recipe on any machine.
TRAINING_DEFAULTS = dict(
    output_dir="outputs/balora-gsm",
    max_steps=100,
    per_device_train_batch_size=4,
    per_device_eval_batch_size=4,
    gradient_accumulation_steps=4,
    learning_rate=1e-4,
    lr_scheduler_type="cosine",
    warmup_steps=5,
    max_length=384,
    logging_steps=5,
    save_strategy="no",
    report_to="none",
    bf16=False,
    fp16=False,
    gradient_checkpointing=False,
    use_cpu=not torch.cuda.is_available(),
    seed=0,
    balora_init="pissa_niter_16",  # the paper's initialisation (--balora_init lora: plain LoRA)
)
# --tiny: seconds on a CPU
TINY_DEFAULTS = dict(
    max_steps=4,
    per_device_train_batch_size=2,
    per_device_eval_batch_size=2,
    gradient_accumulation_steps=2,
    max_length=192,
    learning_rate=1e-3,
    warmup_steps=0,
    logging_steps=1,
    disable_tqdm=True,
    balora_init="pissa",
)


@dataclass
class ScriptArguments:
    model: str | None = field(
        default=None,
        metadata={
            "help": "causal LM: a folder, a .gguf file or a cached hub id (default: the bundled SmolLM2)"
        },
    )
    tiny: bool = field(
        default=False, metadata={"help": "tiny random llama + a tokenizer trained on the data (CI)"}
    )
    train_size: int = field(default=512, metadata={"help": "training problems"})
    eval_size: int = field(default=32, metadata={"help": "held-out problems"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    no_balora: bool = field(
        default=False, metadata={"help": "all λ = 0: plain PiSSA, identical to trl.SFTTrainer"}
    )
    generate: int = field(default=0, metadata={"help": "greedy exact match on this many held-out problems"})
    max_new_tokens: int = field(default=192, metadata={"help": "generation length for --generate"})


def parse_args(argv: list[str] | None = None):
    """(ScriptArguments, BALoRASFTConfig) from the command line and an optional ``--config`` YAML file."""
    from trl import TrlParser

    from balora_plugins.trl import BALoRASFTConfig

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = TrlParser([ScriptArguments, BALoRASFTConfig])
    known = {
        f.name for f in dataclasses.fields(BALoRASFTConfig)
    }  # gradient_checkpointing: not in every release
    parser.set_defaults(**{k: v for k, v in TRAINING_DEFAULTS.items() if k in known})
    script, training = parser.parse_args_and_config(argv)
    if script.tiny:  # smaller defaults; what the command line or the YAML file sets still wins
        parser.set_defaults(**{k: v for k, v in TINY_DEFAULTS.items() if k in known})
        parser.set_defaults(train_size=16, eval_size=4, lora_r=4, lora_alpha=8)
        script, training = parser.parse_args_and_config(argv)
    if script.no_balora:
        for name in ("lambda_consistency", "lambda_diversity", "lambda_svd"):
            setattr(training, f"balora_{name}", 0.0)
    return script, training


# ---------------------------------------------------------------------------------------------- data
def gsm_dataset(size: int, seed: int):
    """(datasets.Dataset of prompt/completion conversations, the reasoning_gym dataset that scores answers)."""
    from datasets import Dataset

    from balora_plugins.tools.assets import gsm_symbolic

    gym = gsm_symbolic(size, seed=seed)
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


def exact_match(trainer, gym, data, n: int, max_new_tokens: int) -> float:
    """Greedy answers to the first ``n`` prompts of ``data``, scored by the dataset's own scorer."""
    from balora_plugins.tools.assets import extract_answer

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
    return sum(gym.score_answer(extract_answer(t), gym[i]) for i, t in enumerate(texts)) / max(n, 1)


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    script, training = parse_args(argv)
    from peft import LoraConfig

    from balora_plugins.tools.assets import load_causal_lm, tiny_causal_lm
    from balora_plugins.trl import BALoRASFTTrainer

    train, _ = gsm_dataset(script.train_size, training.seed)
    held_out, gym = gsm_dataset(script.eval_size, training.seed + 1_000_003)  # another seed: unseen problems
    if script.tiny:
        texts = [
            m[0]["content"] for col in ("prompt", "completion") for d in (train, held_out) for m in d[col]
        ]
        model, tokenizer = tiny_causal_lm(texts, seed=training.seed)
    else:
        model, tokenizer = load_causal_lm(script.model)
    trainer = BALoRASFTTrainer(
        model,
        args=training,  # holds the balora_* settings: no balora_config= needed
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=script.lora_r,
            lora_alpha=script.lora_alpha,
            lora_dropout=0.0,
            target_modules=TARGETS,
            task_type="CAUSAL_LM",
        ),  # initialised as --balora_init says (BALoRASFTConfig applies it)
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)  # as TRL's own scripts
    metrics = trainer.evaluate()
    if script.generate:
        metrics["exact_match"] = exact_match(trainer, gym, held_out, script.generate, script.max_new_tokens)
    trainer.save_model(training.output_dir)
    summary = {"eval_loss_before": before, **{k: v for k, v in metrics.items() if isinstance(v, float | int)}}
    print(json.dumps(summary, indent=2))
    with open(os.path.join(training.output_dir, "gsm_metrics.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return {"metrics": summary, "log_history": trainer.state.log_history, "trainer": trainer}


if __name__ == "__main__":
    main()
