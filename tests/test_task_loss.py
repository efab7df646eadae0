"""The task loss on its own: ``balora/task_loss`` (``eval_balora/task_loss``) is the host's loss without the
BA-LoRA terms, logged through each host's own metrics (so it reaches ``log_history`` and every ``report_to``).
Checked against the host trainer's own logged ``loss`` / ``eval_loss``: equal, loss for loss, when every λ = 0
(gradient accumulation included), and ``loss`` − ``balora/task_loss`` = the logged weighted terms when λ > 0."""

from __future__ import annotations

import pytest
from conftest import CONSTANT, lora, tiny_llama
from test_callback import Rows, callback_of, targs, tensors
from transformers import Trainer

from balora_plugins import BALoRAConfig
from balora_plugins.callback import BALoRACallback

OFF = dict(lambda_consistency=0.0, lambda_diversity=0.0, lambda_svd=0.0)
ON = dict(lambda_consistency=0.5, lambda_diversity=0.1, lambda_svd=0.1, **CONSTANT)


def train_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


def check(trainer, host_losses: list[float] | None) -> None:
    logs = train_logs(trainer)
    assert logs and all("balora/task_loss" in h for h in logs)
    if host_losses is not None:  # λ = 0: the task loss is the host's loss, loss for loss
        assert [h["balora/task_loss"] for h in logs] == pytest.approx(host_losses, rel=1e-6, abs=1e-6)
        assert [h["loss"] for h in logs] == pytest.approx(host_losses, rel=1e-6, abs=1e-6)


# ---------------------------------------------------------------------------------------------- TRL
@pytest.mark.parametrize("ga", [1, 2])
def test_trl_task_loss_is_the_sft_loss(tmp_path, ga):
    pytest.importorskip("trl")
    from test_trl import prompt_completion, trainer

    kw = dict(
        per_device_train_batch_size=4 // ga, gradient_accumulation_steps=ga, per_device_eval_batch_size=4
    )
    data = dict(dataset=prompt_completion(16), eval_dataset=prompt_completion(8, seed=1))
    host = trainer(tmp_path / "host", host=True, **kw, **data)
    host.train()
    off = trainer(tmp_path / "off", balora=OFF, **kw, **data)
    off.train()
    check(off, [h["loss"] for h in train_logs(host)])
    assert off.evaluate()["eval_balora/task_loss"] == pytest.approx(host.evaluate()["eval_loss"], rel=1e-6)
    if ga == 1:  # one micro-batch per step: loss = task loss + Σ λ·term exactly as logged
        on = trainer(tmp_path / "on", balora=ON, **kw, **data)
        on.train()
        check(on, None)
        for h in train_logs(on):
            assert h["loss"] - h["balora/task_loss"] == pytest.approx(h["balora/loss"], rel=1e-4, abs=1e-6)
            assert abs(h["balora/loss"]) > 1e-4
        evaluation = on.evaluate()  # eval_loss has no terms: it is the task loss
        assert evaluation["eval_balora/task_loss"] == pytest.approx(evaluation["eval_loss"], rel=1e-6)


# ---------------------------------------------------------------------------------------------- callback
@pytest.mark.parametrize("ga", [1, 2])
def test_callback_task_loss_is_the_trainers_loss(tmp_path, ga):
    kw = dict(per_device_train_batch_size=4 // ga, gradient_accumulation_steps=ga, max_steps=2)

    def run(out, config=None):
        callbacks = [BALoRACallback(config)] if config is not None else []
        t = Trainer(
            model=lora(tiny_llama(), init="pissa"),
            args=targs(out, **kw),
            train_dataset=Rows(tensors("nlg")),
            callbacks=callbacks,
        )
        t.train()
        return t

    host = run(tmp_path / "host")
    off = run(tmp_path / "off", BALoRAConfig(**OFF))
    check(off, [h["loss"] for h in train_logs(host)])
    evaluation = off.evaluate(eval_dataset=Rows(tensors("nlg", seed=2)))
    host_eval = host.evaluate(eval_dataset=Rows(tensors("nlg", seed=2)))
    assert evaluation["eval_balora/task_loss"] == pytest.approx(host_eval["eval_loss"], rel=1e-6)
    on = run(tmp_path / "on", BALoRAConfig(**ON))
    check(on, None)
    diffs = [h["loss"] - h["balora/task_loss"] for h in train_logs(on)]
    if ga == 1:
        assert diffs == pytest.approx([h["balora/loss"] for h in train_logs(on)], rel=1e-4, abs=1e-6)
    assert all(abs(d) > 1e-4 for d in diffs)  # the logged loss carries the terms, the task loss does not
    callback_of(on).detach()
