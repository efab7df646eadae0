"""Faults and user-owned outputs (issue 8): non-finite terms are skipped, weights stay finite, and a second
run never silently overwrites the BA-LoRA checkpoints of a first one."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import lora, tiny_llama  # noqa: E402
from dist_worker import collate, dataset  # noqa: E402

from balora_plugins import BALoRAConfig  # noqa: E402
from balora_plugins.core.hookspecs import hookimpl  # noqa: E402
from balora_plugins.core.terms import ROW, Term  # noqa: E402
from balora_plugins.hf import BALoRATrainerMixin  # noqa: E402


class NaNOnSecondCall(Term):
    """A row term that is finite except on its second evaluation (a fault injected into training)."""

    def __init__(self):
        super().__init__(name="flaky", level=ROW)
        self.calls = 0

    def weight(self, lambdas):
        return 0.1

    def rows(self, logits, ref_logits):
        self.calls += 1
        value = logits.float().pow(2).mean(-1)
        return value * float("nan") if self.calls == 2 else value


class FlakyPlugin:
    def __init__(self):
        self.term = NaNOnSecondCall()

    @hookimpl
    def balora_terms(self, config):
        return [self.term]


def _trainer(tmp_path, cfg, plugins=(), steps=3, save=False):
    from transformers import Trainer, TrainingArguments

    class T(BALoRATrainerMixin, Trainer):
        pass

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=steps,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        save_strategy="steps" if save else "no",
        save_steps=1,
    )
    trainer = T(
        model=lora(tiny_llama(), init="pissa"), args=args, train_dataset=dataset(8), data_collator=collate
    )
    trainer._balora_setup(cfg, extra_plugins=plugins)
    return trainer


def test_nonfinite_term_is_skipped_and_training_continues(tmp_path):
    plugin = FlakyPlugin()
    trainer = _trainer(tmp_path, BALoRAConfig(lambda_svd=0.0), plugins=[plugin])
    with pytest.warns(RuntimeWarning, match="'flaky' is not finite"):
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) for h in logs)
    assert logs[1]["balora/skipped_flaky"] == 1.0 and "balora/skipped_flaky" not in logs[0]
    assert "balora/flaky" in logs[0] and "balora/flaky" in logs[2]  # the term came back the next step
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert plugin.term.calls >= 3


def test_on_nonfinite_raise_stops_training(tmp_path):
    trainer = _trainer(tmp_path, BALoRAConfig(lambda_svd=0.0, on_nonfinite="raise"), plugins=[FlakyPlugin()])
    with pytest.raises(FloatingPointError, match="flaky"):
        trainer.train()


def test_second_run_refuses_to_overwrite_balora_checkpoints(tmp_path):
    first = _trainer(tmp_path, BALoRAConfig(), steps=1, save=True)
    first.train()
    assert os.path.isfile(tmp_path / "checkpoint-1" / "balora_config.json")
    before = (tmp_path / "checkpoint-1" / "adapter_model.safetensors").read_bytes()
    second = _trainer(tmp_path, BALoRAConfig(), steps=1, save=True)
    with pytest.raises(FileExistsError, match="checkpoint-1"):
        second.train()
    assert (tmp_path / "checkpoint-1" / "adapter_model.safetensors").read_bytes() == before
    second.train(resume_from_checkpoint=True)  # resuming is the documented way on


def test_same_seed_same_losses(tmp_path):
    runs = []
    for i in range(2):
        trainer = _trainer(tmp_path / str(i), BALoRAConfig())
        trainer.train()
        runs.append([(h["loss"], h.get("balora/svd")) for h in trainer.state.log_history if "loss" in h])
    assert runs[0] == runs[1]
