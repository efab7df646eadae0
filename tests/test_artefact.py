"""What a BA-LoRA run leaves in its output directory (README "What you get after training"): the root loads with
plain PEFT on the untouched base and reproduces the trained model, for every LoRA variant; the trainable form in
balora_resume/ continues training; the model card; push_to_hub uploads the servable root."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
import torch
from transformers import Trainer

sys.path.insert(0, os.path.dirname(__file__))
import conftest  # noqa: E402
from conftest import FakeHub, lora, plain_peft_logits, tiny_llama  # noqa: E402
from dist_worker import collate, dataset  # noqa: E402

from balora_plugins import BALoRAConfig  # noqa: E402
from balora_plugins.core.card import CITATION_KEY  # noqa: E402
from balora_plugins.core.export import ADAPTER_CONFIG, INITIAL_DIR, RESUME_DIR  # noqa: E402
from balora_plugins.core.reference import REF_ADAPTER, adapter_state  # noqa: E402
from balora_plugins.trainer_mixin import BALoRATrainerMixin  # noqa: E402

IDS = [[5, 9, 13, 17, 21, 25], [30, 7, 41, 2, 66, 12]]
NLG = BALoRAConfig(
    lambda_consistency=0.5, lambda_diversity=0.1, lambda_svd=0.1, consistency_schedule="constant"
)
NLU = BALoRAConfig.from_preset("iclr2026-nlu", svd_top_k=2)
# (name, base builder in conftest, its kwargs, LoRA keywords, BA-LoRA config)
VARIANTS = [
    ("pissa", "tiny_llama", {}, dict(init="pissa"), NLG),
    ("pissa_niter", "tiny_llama", {}, dict(init="pissa_niter_2"), NLG),
    ("olora", "tiny_llama", {}, dict(init="olora"), NLG),
    ("dora", "tiny_llama", {}, dict(init="pissa", use_dora=True), NLG),
    (
        "rslora_patterns",
        "tiny_llama",
        {},
        dict(init="pissa", use_rslora=True, alpha=6, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3}),
        NLG,
    ),
    (
        "nlu_modules_to_save",
        "tiny_bert_classifier",
        {},
        dict(init="pissa", targets=("query", "value"), task_type="SEQ_CLS", modules_to_save=["classifier"]),
        NLU,
    ),
    ("plain_init", "tiny_llama", {}, dict(init=True), NLG),
]


class _Trainer(BALoRATrainerMixin, Trainer):
    pass


def _nlu_rows(n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 96, (n, 8), generator=g)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": i % 4}
        for i in range(n)
    ]


def _trainer(out, model, config, *, steps=2, ref_model=None, **kw):
    from transformers import TrainingArguments, default_data_collator

    nlu = config.task == "nlu"
    args = TrainingArguments(
        **{
            "output_dir": str(out),
            "per_device_train_batch_size": 4,
            "max_steps": steps,
            "learning_rate": 2e-2,
            "logging_steps": 1,
            "report_to": [],
            "use_cpu": True,
            "seed": 0,
            "save_strategy": "no",
            **kw,
        }
    )
    trainer = _Trainer(
        model=model,
        args=args,
        train_dataset=_nlu_rows() if nlu else dataset(8),
        data_collator=default_data_collator if nlu else collate,
    )
    trainer.balora_setup(config, ref_model=ref_model)
    return trainer


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(ids)).logits


@pytest.mark.slow
def test_output_dir_serves_with_plain_peft_for_every_lora_variant(tmp_path):
    """For each variant: train, save_model(output_dir), then load output_dir with PeftModel.from_pretrained on the
    untouched base in a process where balora_plugins is not importable: the logits are the trained model's."""
    jobs, trained = [], []
    for name, base, base_kwargs, lora_kw, config in VARIANTS:
        model = lora(getattr(conftest, base)(**base_kwargs), **lora_kw)
        trainer = _trainer(tmp_path / name / "run", model, config)
        trainer.train()
        out = tmp_path / name / "out"
        trainer.save_model(str(out))
        trained.append(_logits(trainer.model))
        jobs.append({"adapter": str(out), "base": base, "base_kwargs": base_kwargs, "input_ids": IDS})
        root = json.loads((out / ADAPTER_CONFIG).read_text())
        # PEFT leaves the base alone on load (no PiSSA/OLoRA re-run), as a server that never runs it does
        assert root["init_lora_weights"] is True, name
        assert (out / "balora_config.json").is_file() and (out / "README.md").is_file()
        assert not (out / INITIAL_DIR).exists()  # no second adapter at the root for tools to trip over
        if name == "plain_init":  # unchanged: the adapter as trained, nothing to convert
            assert not (out / RESUME_DIR).exists() and root["r"] == 4
            continue
        resume = json.loads((out / RESUME_DIR / ADAPTER_CONFIG).read_text())
        assert resume["init_lora_weights"] == lora_kw["init"] and root["r"] == 2 * resume["r"]
        assert (out / RESUME_DIR / INITIAL_DIR / "adapter_model.safetensors").is_file()
        assert (out / RESUME_DIR / "balora_config.json").is_file()
    served = plain_peft_logits(jobs, tmp_path / "logits")
    for (name, base, base_kwargs, *_), want, got in zip(VARIANTS, trained, served, strict=True):
        untouched = _logits(getattr(conftest, base)(**base_kwargs))
        assert (want - untouched).abs().max() > 1e-3, f"{name}: training did not move the model"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def test_continued_training_from_the_final_output(tmp_path):
    """resume_from_checkpoint=<final output> (with the trainer_state.json of trainer.save_state()) loads
    balora_resume/: the trained weights and the saved reference, not the converted root."""
    final = tmp_path / "final"
    first = _trainer(final, lora(tiny_llama(), init="pissa"), NLG)
    first.train()
    first.save_model()
    first.save_state()
    second = _trainer(tmp_path / "b", lora(tiny_llama(), init="pissa"), NLG, steps=3)
    second._load_from_checkpoint(str(final))
    torch.testing.assert_close(_logits(second.model), _logits(first.model), rtol=0, atol=1e-6)
    for name in ("default", REF_ADAPTER):
        a, b = adapter_state(first.model, name), adapter_state(second.model, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert any(p.requires_grad for n, p in second.model.named_parameters() if ".default." in n)
    second.train(resume_from_checkpoint=str(final))  # continues at step 2 of 3
    assert second.state.global_step == 3 and len([h for h in second.state.log_history if "loss" in h]) == 3


def test_separate_reference_model_still_gives_the_servable_output(tmp_path):
    """reference='model' needs no snapshot for the loss, but the final output needs the step-0 adapter."""
    from peft import PeftModel

    trainer = _trainer(tmp_path / "run", lora(tiny_llama(), init="pissa"), NLG, ref_model=tiny_llama())
    assert trainer.balora.mode == "model"
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    assert (tmp_path / "out" / RESUME_DIR / INITIAL_DIR / ADAPTER_CONFIG).is_file()
    served = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out"))
    torch.testing.assert_close(_logits(served), _logits(trainer.model), rtol=1e-4, atol=1e-5)


def test_checkpoints_have_the_final_outputs_layout(tmp_path):
    """A checkpoint is served like the final output (tests/test_checkpoints.py checks the logits)."""
    trainer = _trainer(tmp_path, lora(tiny_llama(), init="pissa"), NLG, save_strategy="steps", save_steps=1)
    trainer.train()
    ckpt = tmp_path / "checkpoint-2"
    assert json.loads((ckpt / ADAPTER_CONFIG).read_text())["init_lora_weights"] is True
    assert json.loads((ckpt / RESUME_DIR / ADAPTER_CONFIG).read_text())["init_lora_weights"] == "pissa"
    assert (ckpt / RESUME_DIR / INITIAL_DIR / ADAPTER_CONFIG).is_file() and not (ckpt / INITIAL_DIR).exists()


def test_push_to_hub_uploads_the_servable_root_with_its_card(tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    hub = FakeHub()
    monkeypatch.setattr("transformers.trainer.hf_api", lambda: hub)
    cfg = BALoRAConfig.from_preset("iclr2026-nlg", lambda_svd=0.01)
    trainer = _trainer(
        tmp_path / "run",
        lora(tiny_llama(), init="pissa"),
        cfg,
        save_strategy="steps",
        save_steps=2,
        hub_model_id="me/tiny-balora",
    )
    trainer.train()
    trainer.push_to_hub()
    (up,) = hub.uploads
    assert up["folder"] == str(tmp_path / "run") and up["repo_id"] == "me/tiny-balora"
    assert up["adapter_config"]["init_lora_weights"] is True and up["adapter_config"]["r"] == 8
    for f in ("adapter_model.safetensors", "balora_config.json", "README.md"):
        assert f in up["files"], f
    assert not any(f.startswith(RESUME_DIR) for f in up["files"])  # hub_strategy every_save: not to resume
    assert not any(f.startswith(("checkpoint-", "_")) for f in up["files"])
    card = ModelCard(up["card"])
    assert {"ba-lora", "peft"} <= set(card.data.tags)
    text = card.text
    assert text.count(CITATION_KEY) == 1 and "2408.04556" in text
    assert "`iclr2026-nlg`, changed: `lambda_svd=0.01`" in text
    assert "| λ1 consistency (KL to the pre-trained model, T = 2) | 0.025, cosine decay to 0.1·λ1 |" in text
    assert "| λ3 SVD (top-10 share of the output spectrum, frobenius norm) | 0.01" in text
    assert 'PeftModel.from_pretrained(base, "me/tiny-balora")' in text
    assert f"`{RESUME_DIR}/`" in text and "never for serving" in text and "is not uploaded" in text
    # the README's table names everything the run left in output_dir, and everything it names is there
    listed = readme_output_table()
    for entry in os.listdir(tmp_path / "run"):
        name = "checkpoint-N/" if entry.startswith("checkpoint-") else entry
        assert (
            name + ("/" if os.path.isdir(tmp_path / "run" / entry) and "/" not in name else "") in listed
        ), entry
    for name in listed - {"checkpoint-N/", "config.json"}:  # config.json: axolotl only
        assert (tmp_path / "run" / name).exists(), name


def readme_output_table() -> set[str]:
    """The names in the first column of the README's "What you get after training" table."""
    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    section = text.split("\n## What you get after training\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| in ")]
    return {name for row in rows for name in re.findall(r"`([^`]+)`", row.split(" | ")[0])}


def test_pushes_during_training_upload_the_servable_adapter(tmp_path, monkeypatch):
    """hub_strategy='every_save' (the default) uploads output_dir at every checkpoint: the plain LoRA, not the
    checkpoint's trainable form; the checkpoints themselves stay trainable."""
    hub = FakeHub()
    monkeypatch.setattr("transformers.trainer.hf_api", lambda: hub)
    trainer = _trainer(
        tmp_path,
        lora(tiny_llama(), init="pissa"),
        NLG,
        save_strategy="steps",
        save_steps=1,
        push_to_hub=True,
        hub_model_id="me/tiny-balora",
    )
    trainer.train()
    assert len(hub.uploads) == 2
    for up in hub.uploads:
        assert up["adapter_config"]["init_lora_weights"] is True and up["adapter_config"]["r"] == 8
        assert not any(f.startswith(("_", "checkpoint-")) for f in up["files"])
    assert not (tmp_path / "_balora_push").exists()
    assert (
        json.loads((tmp_path / "checkpoint-2" / RESUME_DIR / ADAPTER_CONFIG).read_text())["init_lora_weights"]
        == "pissa"
    )


def test_card_update_is_idempotent_and_keeps_the_hosts_card(tmp_path):
    from huggingface_hub import ModelCard

    from balora_plugins.core.card import BEGIN, update_model_card

    (tmp_path / "README.md").write_text(
        "---\ntags:\n- mine\n---\n# My model\n\nIntro.\n\n## Training\n\nDetails.\n"
    )
    lora(tiny_llama(), init=True).peft_config["default"].save_pretrained(tmp_path)  # adapter_config.json
    update_model_card(str(tmp_path), NLG, tags=["trl"])
    once = (tmp_path / "README.md").read_text()
    update_model_card(str(tmp_path), NLG, tags=["trl"])
    assert (tmp_path / "README.md").read_text() == once and once.count(BEGIN) == 1
    card = ModelCard.load(tmp_path / "README.md")
    assert set(card.data.tags) == {"mine", "trl", "ba-lora", "peft", "lora"}  # lora: PEFT's tag
    text = card.text
    assert text.index("Intro.") < text.index(BEGIN) < text.index("## Training")  # before the host's sections
    assert "This folder is a LoRA adapter for the base model" in text and RESUME_DIR not in text
