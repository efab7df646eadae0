"""TRL's script style with BA-LoRA: ``TrlParser((ScriptArguments, BALoRASFTConfig, ModelConfig))`` +
``get_peft_config(model_args)``, exactly as TRL's own ``trl/scripts/sft.py`` parses and builds a run — the
initialisation flag ``--balora_init``, the plain-init warning, and the refusal to start over in an ``output_dir``
holding an earlier run's checkpoints (before any model or data loads)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

pytest.importorskip("trl")

from conftest import sft_args, tiny_llama, tiny_tokenizer  # noqa: E402
from test_trl import prompt_completion  # noqa: E402
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config  # noqa: E402

from balora_plugins.core.reference import REF_ADAPTER, unwrap  # noqa: E402
from balora_plugins.trl import BALoRASFTConfig, BALoRASFTTrainer  # noqa: E402


def argv(out, *extra: str) -> list[str]:
    """A TRL command line of the tiny runs: CPU, fp32, LoRA on q/v without dropout, all terms on from step 1."""
    return [
        *("--output_dir", str(out), "--use_cpu", "true", "--bf16", "false", "--report_to", "none"),
        *("--max_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "4"),
        *("--max_length", "32", "--learning_rate", "1e-2", "--save_strategy", "no", "--disable_tqdm", "true"),
        *("--gradient_checkpointing", "false", "--use_peft", "--lora_r", "4", "--lora_alpha", "8"),
        *("--lora_dropout", "0", "--lora_target_modules", "q_proj", "v_proj"),
        *("--balora_consistency_schedule", "constant", "--balora_regularizer_schedule", "constant"),
        *extra,
    ]


def script(argv_: list[str], record: list | None = None):
    """What a TRL script does with ``argv_``: parse, build the trainer on a tiny llama; returns the trainer (and
    appends the warnings raised while it was built to ``record``)."""
    parser = TrlParser((ScriptArguments, BALoRASFTConfig, ModelConfig))
    _, training_args, model_args = parser.parse_args_and_config(argv_)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = BALoRASFTTrainer(
            tiny_llama(),
            args=training_args,
            train_dataset=prompt_completion(8),
            processing_class=tiny_tokenizer(),
            peft_config=get_peft_config(model_args),
        )
    if record is not None:
        record.extend(w for w in caught if issubclass(w.category, UserWarning))
    return trainer


def plain_init_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "plain initialisation" in str(w.message)]


def test_init_flag_gives_a_pissa_run_from_the_command_line(tmp_path):
    caught: list = []
    trainer = script(argv(tmp_path / "out", "--balora_init", "pissa_niter_4"), caught)
    peft_model = unwrap(trainer.model)
    assert peft_model.peft_config["default"].init_lora_weights == "pissa_niter_4"
    assert trainer.balora.rewrites_base and REF_ADAPTER in peft_model.peft_config
    # PiSSA rewrote the base: the frozen q_proj weight is the residual, not the pre-trained weight
    base_q = tiny_llama().model.layers[0].self_attn.q_proj.weight
    residual = peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert float((residual - base_q).detach().abs().max()) > 1e-3
    assert not plain_init_warnings(caught)
    trainer.train()
    first = trainer.state.log_history[0]
    # step 0: the trained model is the pre-trained one, so the consistency term is 0 (a wrong reference — the
    # residual model — would give a large KL here)
    assert first["balora/consistency"] == pytest.approx(0.0, abs=1e-6)
    assert trainer.state.log_history[1]["balora/consistency"] > 1e-6  # and it moves once the adapter does
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert "| LoRA initialisation | `pissa_niter_4`" in card


def test_without_the_flag_a_plain_init_run_warns_once_naming_the_flag(tmp_path):
    caught: list = []
    trainer = script(argv(tmp_path / "out"), caught)
    assert unwrap(trainer.model).peft_config["default"].init_lora_weights is True
    (message,) = plain_init_warnings(caught)  # exactly once, at construction
    assert "NOT the paper's method" in message and "--balora_init pissa_niter_16" in message
    assert "iclr2026-nlg" in message
    with warnings.catch_warnings(record=True) as during:
        warnings.simplefilter("always")
        trainer.train()
    assert not plain_init_warnings(during)  # not again per step
    # asking for plain LoRA explicitly is a choice, not a mistake: no warning
    caught = []
    explicit = script(argv(tmp_path / "lora", "--balora_init", "lora"), caught)
    assert unwrap(explicit.model).peft_config["default"].init_lora_weights is True
    assert not plain_init_warnings(caught)


def test_bad_or_conflicting_init_is_refused_naming_the_field(tmp_path):
    parser = TrlParser((ScriptArguments, BALoRASFTConfig, ModelConfig))
    with pytest.raises(ValueError, match=r"balora_init='pisa' is not allowed; choose pissa_niter_16"):
        parser.parse_args_and_config(argv(tmp_path / "a", "--balora_init", "pisa"))
    from conftest import lora, lora_config

    args = sft_args(tmp_path / "b", config_class=BALoRASFTConfig, balora_init="pissa")
    common = dict(args=args, train_dataset=prompt_completion(4), processing_class=tiny_tokenizer())
    with pytest.raises(ValueError, match=r"balora_init='pissa' but peft_config.init_lora_weights='olora'"):
        BALoRASFTTrainer(tiny_llama(), peft_config=lora_config("olora"), **common)
    with pytest.raises(
        ValueError, match=r"already a PeftModel whose adapter was initialised with init_lora_w"
    ):
        BALoRASFTTrainer(lora(tiny_llama(), init=True), **common)
    with pytest.raises(ValueError, match="no peft_config was given: pass one"):
        BALoRASFTTrainer(tiny_llama(), **common)


def test_recipe_uses_the_flag(tmp_path):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integrations", "trl"))
    try:
        import train_gsm
    finally:
        sys.path.pop(0)
    _, training = train_gsm.parse_args(["--tiny", "--output_dir", str(tmp_path)])
    assert training.balora_init == "pissa"
    _, training = train_gsm.parse_args(["--output_dir", str(tmp_path)])
    assert training.balora_init == "pissa_niter_16"
    _, training = train_gsm.parse_args(["--output_dir", str(tmp_path), "--balora_init", "lora"])
    assert training.adapter_init() is True


# ---------------------------------------------------------------------------------------------- output_dir reuse
def test_command_line_refuses_an_earlier_run_before_loading_anything(tmp_path):
    out = tmp_path / "out"
    for step in (2, 10):  # an earlier BA-LoRA run's checkpoints; 10 is the latest (numeric order)
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "balora_config.json").write_text("{}")
    parser = TrlParser((ScriptArguments, BALoRASFTConfig, ModelConfig))
    with pytest.raises(FileExistsError) as err:
        parser.parse_args_and_config(argv(out))  # the arguments alone: no model, no data yet
    message = str(err.value)
    assert "already holds BA-LoRA checkpoints of an earlier run (checkpoint-2, checkpoint-10)" in message
    assert f"--resume_from_checkpoint {out / 'checkpoint-10'}" in message
    assert (
        "trainer.train(resume_from_checkpoint=" in message and "--balora_overwrite_output_dir true" in message
    )
    # resuming, or the explicit opt-out, parses
    _, args, _ = parser.parse_args_and_config(
        argv(out, "--resume_from_checkpoint", str(out / "checkpoint-10"))
    )
    assert args.resume_from_checkpoint == str(out / "checkpoint-10")
    _, args, _ = parser.parse_args_and_config(argv(out, "--balora_overwrite_output_dir", "true"))
    assert args.balora_overwrite_output_dir is True and args.to_balora_config().overwrite_output_dir is True


def test_python_api_refuses_at_train_and_the_opt_out_overwrites(tmp_path):
    """A plain SFTConfig (settings in balora_config=): the refusal comes at train(), naming the Python form; with
    overwrite_output_dir the new run trains and replaces the earlier checkpoint."""
    from conftest import lora_config

    def build(out, **balora):
        return BALoRASFTTrainer(
            tiny_llama(),
            args=sft_args(out, max_steps=1, save_strategy="steps", save_steps=1),
            train_dataset=prompt_completion(8),
            processing_class=tiny_tokenizer(),
            peft_config=lora_config("pissa", targets=("q_proj", "v_proj")),
            balora_config={"lambda_svd": 0.0, **balora},
        )

    build(tmp_path).train()
    ckpt = tmp_path / "checkpoint-1" / "adapter_model.safetensors"
    before = ckpt.read_bytes()
    with pytest.raises(FileExistsError) as err:
        build(tmp_path).train()
    assert "trainer.train(resume_from_checkpoint=True)" in str(err.value)
    assert "--resume_from_checkpoint" in str(err.value) and "overwrite_output_dir" in str(err.value)
    assert ckpt.read_bytes() == before
    again = build(tmp_path, overwrite_output_dir=True, lambda_consistency=0.3)
    again.train()
    assert ckpt.read_bytes() != before  # overwritten, as asked
    assert os.path.isfile(tmp_path / "checkpoint-1" / "balora_config.json")
    assert torch.isfinite(torch.tensor(again.state.log_history[0]["loss"]))
