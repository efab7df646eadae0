"""A run that would start over in an ``output_dir`` holding an earlier BA-LoRA run's checkpoints, through the
callback door: refused at ``train()`` (the callback's Trainer is built with the model and data already loaded, and
only ``train(resume_from_checkpoint=...)`` says whether it resumes), naming the Python form and the command-line
flag; ``BALoRAConfig(overwrite_output_dir=True)`` starts over on purpose. (The TRL and axolotl doors refuse
earlier, when their arguments are parsed: tests/test_trl_script.py, tests/test_axolotl.py.)"""

from __future__ import annotations

import pytest
from conftest import lora, tiny_llama
from test_callback import Rows, targs, tensors
from transformers import Trainer

from balora_plugins import BALoRAConfig
from balora_plugins.callback import BALoRACallback


def trainer(out, **config) -> Trainer:
    return Trainer(
        model=lora(tiny_llama(), init="pissa"),
        args=targs(out, max_steps=1, save_strategy="steps", save_steps=1),
        train_dataset=Rows(tensors("nlg")),
        callbacks=[BALoRACallback(BALoRAConfig(**config))],
    )


def test_callback_refuses_an_earlier_run_and_the_opt_out_overwrites(tmp_path):
    trainer(tmp_path).train()
    ckpt = tmp_path / "checkpoint-1" / "adapter_model.safetensors"
    before = ckpt.read_bytes()
    assert BALoRAConfig.from_pretrained(tmp_path / "checkpoint-1").lambda_consistency == 0.025
    with pytest.raises(FileExistsError) as err:
        trainer(tmp_path).train()
    message = str(err.value)
    assert "already holds BA-LoRA checkpoints of an earlier run (checkpoint-1)" in message
    assert "trainer.train(resume_from_checkpoint=True)" in message
    assert f"--resume_from_checkpoint {tmp_path / 'checkpoint-1'}" in message
    assert "BALoRAConfig(overwrite_output_dir=True)" in message
    assert ckpt.read_bytes() == before
    trainer(tmp_path).train(resume_from_checkpoint=True)  # resuming is allowed
    # so is starting over, on purpose: the checkpoint is then the new run's
    trainer(tmp_path, overwrite_output_dir=True, lambda_consistency=0.5).train()
    assert BALoRAConfig.from_pretrained(tmp_path / "checkpoint-1").lambda_consistency == 0.5


def test_overwrite_output_dir_is_validated_and_kept_out_of_the_card():
    from balora_plugins.core.card import nearest_preset

    with pytest.raises(ValueError, match=r"overwrite_output_dir='yes' must be True or False"):
        BALoRAConfig(overwrite_output_dir="yes")
    assert nearest_preset(BALoRAConfig(overwrite_output_dir=True)) == ("iclr2026-nlg", {})
