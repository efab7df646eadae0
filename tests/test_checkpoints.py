"""Every ``checkpoint-N/`` of a BA-LoRA run has the final output's layout (README "What you get after training"):
its root is the plain LoRA that serves on the untouched base, its ``balora_resume/`` the trainable form; resume,
``resume_from_checkpoint=True`` and ``load_best_model_at_end`` read from there and continue exactly; the Hub card
keeps PEFT's metadata after every push; a run from a pre-initialised PiSSA pair names the base it serves on.

Independent computations: each checkpoint root, loaded with plain PEFT on the untouched base in a process without
balora_plugins, against the trained model's own logits recorded when the checkpoint was saved, and against
``balora export`` (:func:`export_plain_lora`) of the checkpoint's trainable form; resumed losses against an
uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import sys

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(__file__))
from conftest import FakeHub, lora, lora_config, plain_peft_logits, sft_args, tiny_llama  # noqa: E402
from dist_worker import collate, dataset  # noqa: E402
from test_callback import StopAt  # noqa: E402

from balora_plugins import BALoRAConfig  # noqa: E402
from balora_plugins.callback import BALoRACallback  # noqa: E402
from balora_plugins.core.export import (  # noqa: E402
    ADAPTER_CONFIG,
    INITIAL_DIR,
    RESUME_DIR,
    export_plain_lora,
)
from balora_plugins.core.reference import REF_ADAPTER, adapter_state  # noqa: E402

IDS = [[5, 9, 13, 17, 21, 25], [30, 7, 41, 2, 66, 12]]
CFG = BALoRAConfig(
    lambda_consistency=0.5,
    lambda_diversity=0.1,
    lambda_svd=0.1,
    consistency_schedule="cosine",
    regularizer_schedule="constant",
)
TOL = dict(rtol=0, atol=1e-5)


class RecordAtSave(TrainerCallback):
    """The trained model's logits on IDS at every save (the independent truth a checkpoint root must serve)."""

    def __init__(self):
        self.logits: dict[int, torch.Tensor] = {}

    def on_save(self, args, state, control, model=None, **kwargs):
        was_training = model.training
        with torch.no_grad():
            self.logits[state.global_step] = model.eval()(input_ids=torch.tensor(IDS)).logits.detach().clone()
        model.train(was_training)


def _targs(out, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=2e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        save_strategy="steps",
        save_steps=2,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**base, **kw})


def _callback_trainer(out, *, init="pissa", callbacks=(), model=None, **kw) -> Trainer:
    model = model if model is not None else lora(tiny_llama(), init=init)
    return Trainer(
        model=model,
        args=_targs(out, **kw),
        train_dataset=dataset(16),
        eval_dataset=dataset(8) if kw.get("eval_strategy") else None,
        data_collator=collate,
        callbacks=[BALoRACallback(CFG), *callbacks],
    )


def _texts(n: int = 16):
    from datasets import Dataset

    words = [chr(ord("a") + i) for i in range(26)] + [str(i) for i in range(10)]
    r = random.Random(0)
    return Dataset.from_list([{"text": " ".join(r.choices(words, k=r.randint(3, 8)))} for _ in range(n)])


def _trl_trainer(out, *, callbacks=(), **kw):
    pytest.importorskip("trl")
    from conftest import tiny_tokenizer

    from balora_plugins.trl import BALoRASFTTrainer

    args = dict(max_steps=4, save_strategy="steps", save_steps=2, learning_rate=2e-2, **kw)
    return BALoRASFTTrainer(
        tiny_llama(),
        args=sft_args(out, **args),
        train_dataset=_texts(),
        processing_class=tiny_tokenizer(),
        peft_config=lora_config("pissa_niter_2", targets=("q_proj", "v_proj", "up_proj", "down_proj")),
        balora_config=CFG,
        callbacks=list(callbacks),
    )


def _losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def check_checkpoints(run, recorded: dict[int, torch.Tensor], workdir) -> float:
    """Every checkpoint-N/ of ``run``: the layout, and its root on the untouched base (plain PEFT, no balora_plugins)
    against ``balora export`` of its balora_resume/ and against the trained model at step N. Returns the max
    logit error root vs export."""
    ckpts = sorted(
        (p for p in os.listdir(run) if p.startswith("checkpoint-")), key=lambda p: int(p.split("-")[1])
    )
    assert [int(p.split("-")[1]) for p in ckpts] == sorted(recorded) and ckpts, ckpts
    jobs = []
    for name in ckpts:
        ckpt = os.path.join(run, name)
        root = json.load(open(os.path.join(ckpt, ADAPTER_CONFIG), encoding="utf-8"))
        trainable = json.load(open(os.path.join(ckpt, RESUME_DIR, ADAPTER_CONFIG), encoding="utf-8"))
        assert root["init_lora_weights"] is True and root["r"] == 2 * trainable["r"], name
        assert str(trainable["init_lora_weights"]).startswith("pissa"), name
        assert os.path.isfile(os.path.join(ckpt, RESUME_DIR, INITIAL_DIR, ADAPTER_CONFIG)), name
        assert not os.path.exists(os.path.join(ckpt, INITIAL_DIR)), name  # no second adapter at the root
        for f in ("README.md", "balora_config.json", "trainer_state.json", "optimizer.pt", "rng_state.pth"):
            assert os.path.isfile(os.path.join(ckpt, f)), (name, f)
        card = open(os.path.join(ckpt, "README.md"), encoding="utf-8").read()
        assert "plain LoRA adapter" in card and f"--max-lora-rank N` with N ≥ {root['r']}" in card
        exported = export_plain_lora(os.path.join(ckpt, RESUME_DIR), os.path.join(workdir, "export", name))
        jobs += [
            {"adapter": ckpt, "base": "tiny_llama", "input_ids": IDS},
            {"adapter": exported, "base": "tiny_llama", "input_ids": IDS},
        ]
    served = plain_peft_logits(jobs, os.path.join(workdir, "logits"))
    untouched = tiny_llama()(input_ids=torch.tensor(IDS)).logits.detach()
    worst = 0.0
    for i, name in enumerate(ckpts):
        root, export, want = served[2 * i], served[2 * i + 1], recorded[int(name.split("-")[1])]
        assert (want - untouched).abs().max() > 1e-3, f"{name}: training did not move the model"
        torch.testing.assert_close(root, export, **TOL, msg=name)
        torch.testing.assert_close(root, want, rtol=1e-4, atol=1e-5, msg=name)
        worst = max(worst, float((root - export).abs().max()))
    print(f"max |logit| error, checkpoint roots vs balora export: {worst:.1e}")
    return worst


# ---------------------------------------------------------------------------------------------- every door
def test_callback_checkpoints_serve_and_resume_exactly(tmp_path):
    """Trainer + BALoRACallback: checkpoint-2 and checkpoint-4 serve; a run killed after checkpoint-2 and resumed
    from its path continues to the uninterrupted run's losses and adapter."""
    rec = RecordAtSave()
    full = _callback_trainer(tmp_path / "full", callbacks=[rec])
    full.train()
    check_checkpoints(tmp_path / "full", rec.logits, tmp_path)

    _callback_trainer(tmp_path / "cut", callbacks=[StopAt(2)]).train()
    resumed = _callback_trainer(tmp_path / "cut")
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    want, got = _losses(full), _losses(resumed)
    assert set(got) >= {3, 4} and [got[s] for s in (3, 4)] == pytest.approx(
        [want[s] for s in (3, 4)], abs=1e-6
    )
    for name in ("default", REF_ADAPTER):
        a, b = adapter_state(full.model, name), adapter_state(resumed.model, name)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_trl_checkpoints_serve_and_resume_from_the_last_one(tmp_path, monkeypatch):
    """BALoRASFTTrainer (a randomised PiSSA init): every checkpoint serves; resume_from_checkpoint=True takes the
    last checkpoint's balora_resume/ and ends where the uninterrupted run ends."""
    monkeypatch.setattr("trl.trainer.base_trainer.get_trackio_space_url", lambda: None, raising=False)
    rec = RecordAtSave()
    full = _trl_trainer(tmp_path / "full", callbacks=[rec])
    full.train()
    check_checkpoints(tmp_path / "full", rec.logits, tmp_path)

    _trl_trainer(tmp_path / "cut", callbacks=[StopAt(2)]).train()
    torch.manual_seed(1234)  # the resumed process draws another randomised SVD: resume must restore the base
    resumed = _trl_trainer(tmp_path / "cut")
    resumed.train(resume_from_checkpoint=True)
    want, got = _losses(full), _losses(resumed)
    assert [got[s] for s in (3, 4)] == pytest.approx([want[s] for s in (3, 4)], abs=1e-6)
    final = adapter_state(full.model, "default")
    for k, v in adapter_state(resumed.model, "default").items():
        torch.testing.assert_close(v, final[k], rtol=0, atol=1e-6, msg=k)


def test_load_best_model_at_end_loads_the_trainable_form(tmp_path):
    """load_best_model_at_end: the host reloads the best checkpoint; the model afterwards is that checkpoint's
    trained model (its balora_resume/ adapter), not the rank-2r root."""
    from safetensors.torch import load_file

    trainer = _callback_trainer(
        tmp_path / "run",
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # the worse of the two: so the loaded checkpoint is not the last one
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2"), best
    saved = load_file(os.path.join(best, RESUME_DIR, "adapter_model.safetensors"))
    live = adapter_state(trainer.model, "default")
    assert saved.keys() == live.keys()
    for k in saved:
        torch.testing.assert_close(live[k], saved[k], rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------------------------------------- the Hub
def _front_matter(card: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(card).data.to_dict()


@pytest.mark.parametrize("strategy", ["every_save", "checkpoint"])
def test_every_push_keeps_peft_metadata_and_uploads_resume_only_to_resume(tmp_path, monkeypatch, strategy):
    """TRL rebuilds the card on push_to_hub (library_name: transformers, no base_model): every upload's card says
    library_name peft, base_model and PEFT's tags, and the serving rank; balora_resume/ goes up only with the
    checkpoint strategies (inside the checkpoint) — and with hub_push_resume."""
    pytest.importorskip("trl")
    from conftest import tiny_tokenizer

    from balora_plugins.trl import BALoRASFTConfig, BALoRASFTTrainer

    monkeypatch.setattr("trl.trainer.base_trainer.get_trackio_space_url", lambda: None, raising=False)
    hub = FakeHub()
    monkeypatch.setattr("transformers.trainer.hf_api", lambda: hub)
    model = tiny_llama()
    model.config._name_or_path = model.name_or_path = "org/tiny-llama"  # a hub id, as from_pretrained sets it
    trainer = BALoRASFTTrainer(
        model,
        args=sft_args(
            tmp_path / "run",
            BALoRASFTConfig,
            max_steps=2,
            save_strategy="steps",
            save_steps=1,
            push_to_hub=True,
            hub_model_id="me/tiny-balora",
            hub_strategy=strategy,
            balora_lambda_svd=0.01,
        ),
        train_dataset=_texts(8),
        processing_class=tiny_tokenizer(),
        peft_config=lora_config("pissa", targets=("q_proj", "v_proj")),
    )
    trainer.train()
    trainer.push_to_hub()
    assert (tmp_path / "run" / RESUME_DIR / ADAPTER_CONFIG).is_file()  # kept locally after the push
    roots = [up for up in hub.uploads if up["folder"] == str(tmp_path / "run")]
    assert len(roots) == 3  # two checkpoints during training, then push_to_hub
    for up in roots:
        meta = _front_matter(up["card"])
        assert meta["library_name"] == "peft" and meta["base_model"] == "org/tiny-llama", meta
        assert {"lora", "base_model:adapter:org/tiny-llama", "ba-lora", "peft", "trl"} <= set(meta["tags"])
        assert (
            up["adapter_config"]["r"] == 8
            and up["adapter_config"]["base_model_name_or_path"] == "org/tiny-llama"
        )
        assert "--max-lora-rank N` with N ≥ 8" in up["card"]
        assert not any(f.startswith(("_", "checkpoint-")) for f in up["files"]), up["files"]
    # during training the root holds no balora_resume/; the final push carries it only to resume from the Hub
    assert not any(f.startswith(RESUME_DIR) for up in roots[:2] for f in up["files"])
    assert (f"{RESUME_DIR}/{ADAPTER_CONFIG}" in roots[2]["files"]) == (strategy == "checkpoint")
    ckpt_uploads = [up for up in hub.uploads if up["folder"] != str(tmp_path / "run")]
    if strategy == "checkpoint":  # the checkpoint goes up whole: servable root plus balora_resume/ to resume
        assert len(ckpt_uploads) == 2
        for up in ckpt_uploads:
            assert f"{RESUME_DIR}/{ADAPTER_CONFIG}" in up["files"] and up["adapter_config"]["r"] == 8
            assert _front_matter(up["card"])["library_name"] == "peft"
    else:
        assert not ckpt_uploads
    hub.uploads.clear()
    trainer.balora.config.hub_push_resume = True  # asked for: the final push carries balora_resume/
    trainer.push_to_hub()
    assert f"{RESUME_DIR}/{ADAPTER_CONFIG}" in hub.uploads[-1]["files"]


# ---------------------------------------------------------------------------------------------- which base
def _preinitialised_pair(tmp_path):
    """PEFT's PiSSA recipe: PiSSA once on the pre-trained model, the residual saved as a model of its own and the
    adapter saved with init_lora_weights=True; then loaded as axolotl loads `base_model: residual/` +
    `lora_model_dir:` (the residual model from its folder, the adapter on it)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pair = lora(tiny_llama(), init="pissa", targets=("q_proj", "v_proj"))
    pair.peft_config["default"].init_lora_weights = True
    pair.peft_config["default"].base_model_name_or_path = None  # PEFT writes the loaded name: none here
    pair.save_pretrained(str(tmp_path / "pissa_init"))
    pair.unload().save_pretrained(str(tmp_path / "residual"))
    residual = AutoModelForCausalLM.from_pretrained(str(tmp_path / "residual"))
    return PeftModel.from_pretrained(residual, str(tmp_path / "pissa_init"), is_trainable=True)


@pytest.mark.parametrize("served_base", [None, "org/tiny-llama"])
def test_a_preinitialised_pair_never_names_the_residual_as_its_base(tmp_path, served_base):
    """Trained from a residual base + pissa_init/ adapter, the root serves on the original model. Its
    base_model_name_or_path and card name served_base when given; otherwise no base, and the card says the
    residual is not it. Every checkpoint alike."""
    from huggingface_hub import ModelCard

    model = _preinitialised_pair(tmp_path)
    residual = str(tmp_path / "residual")
    cfg = BALoRAConfig.from_dict({**CFG.to_dict(), "served_base": served_base})
    trainer = Trainer(
        model=model,
        args=_targs(tmp_path / "run", max_steps=2),
        train_dataset=dataset(8),
        data_collator=collate,
        callbacks=[BALoRACallback(cfg)],
    )
    trainer.train()
    trainer.save_model()
    for folder in (tmp_path / "run", tmp_path / "run" / "checkpoint-2"):
        root = json.loads((folder / ADAPTER_CONFIG).read_text())
        assert root["base_model_name_or_path"] == served_base, folder
        card = ModelCard.load(folder / "README.md")
        assert card.data.base_model == served_base and residual not in str(card.data.tags), folder
        text = card.text
        assert f"**not** on `{residual}`" in text or f"not the residual model `{residual}`" in text
        if served_base:
            assert f'from_pretrained("{served_base}")' in text
        else:
            assert "set `served_base` (`balora_served_base`)" in text
    # and it does serve on the original model (the trained model's logits)
    served = plain_peft_logits(
        [{"adapter": str(tmp_path / "run"), "base": "tiny_llama", "input_ids": IDS}], tmp_path / "logits"
    )[0]
    with torch.no_grad():
        want = trainer.model.eval()(input_ids=torch.tensor(IDS)).logits
    torch.testing.assert_close(served, want, rtol=1e-4, atol=1e-5)
