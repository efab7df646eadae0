"""Faults and user-owned outputs: non-finite terms are skipped, weights stay finite, and a second
run never silently overwrites the BA-LoRA checkpoints of a first one."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import lora, plain_peft_logits, tiny_llama  # noqa: E402
from dist_worker import collate, dataset  # noqa: E402

from balora_plugins import BALoRAConfig  # noqa: E402
from balora_plugins.core.hookspecs import hookimpl  # noqa: E402
from balora_plugins.core.terms import ROW, Term  # noqa: E402
from balora_plugins.trainer_mixin import BALoRATrainerMixin  # noqa: E402


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
    trainer.balora_setup(cfg, extra_plugins=plugins)
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


def test_saved_adapters_load_with_plain_peft_without_balora(tmp_path):
    """Every saved adapter (checkpoint, final output, its balora_resume/) loads where balora_plugins is not
    importable; the final output on the untouched base reproduces the trained model."""
    trainer = _trainer(tmp_path / "run", BALoRAConfig(), steps=2, save=True)
    trainer.train()
    trainer.save_model(str(tmp_path / "run" / "final"))
    assert os.path.isfile(tmp_path / "run" / "final" / "balora_config.json")
    ids = [[5, 9, 13, 17, 21, 25]]
    with torch.no_grad():
        expected = trainer.model.eval()(input_ids=torch.tensor(ids)).logits
    subs = ["final", "checkpoint-2", "final/balora_resume"]
    jobs = [{"adapter": str(tmp_path / "run" / sub), "base": "tiny_llama", "input_ids": ids} for sub in subs]
    served, *others = plain_peft_logits(jobs, tmp_path / "logits")
    torch.testing.assert_close(served, expected, rtol=1e-4, atol=1e-5)
    assert all(torch.isfinite(x).all() for x in others)  # every adapter loaded and ran
