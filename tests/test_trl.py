"""`BALoRASFTTrainer` against TRL's own `SFTTrainer` and against counts made here (TRL 1.9 and 1.16).

Every run is a tiny random llama on CPU for a few steps; the numbers compared are losses, adapter weights,
row counts and logits, each against an independent computation.
"""

from __future__ import annotations

import json
import os
import random
import sys

import pytest
import torch

pytest.importorskip("trl")

from conftest import FakeHub, lora, lora_config, sft_args, tiny_llama, tiny_tokenizer  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, PeftModel  # noqa: E402
from trl import SFTTrainer  # noqa: E402

from balora_plugins import BALoRAConfig  # noqa: E402
from balora_plugins.core.reference import REF_ADAPTER, adapter_state  # noqa: E402
from balora_plugins.trl import BALoRASFTConfig, BALoRASFTTrainer  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
WORDS = [chr(ord("a") + i) for i in range(26)] + [str(i) for i in range(10)]
# Constant schedules, so every term is on from step 1.
ALL_ON = dict(
    lambda_consistency=0.5,
    lambda_diversity=0.1,
    lambda_svd=0.1,
    consistency_schedule="constant",
    regularizer_schedule="constant",
)
ALL_OFF = dict(lambda_consistency=0.0, lambda_diversity=0.0, lambda_svd=0.0)


# ---------------------------------------------------------------------------------------------- helpers
def _words(r: random.Random, lo: int, hi: int) -> str:
    return " ".join(r.choices(WORDS, k=r.randint(lo, hi)))


def prompt_completion(n: int = 16, seed: int = 0) -> Dataset:
    r = random.Random(seed)
    return Dataset.from_list(
        [{"prompt": _words(r, 2, 5), "completion": " " + _words(r, 2, 6)} for _ in range(n)]
    )


def conversations(n: int = 8, seed: int = 0) -> Dataset:
    r = random.Random(seed)
    return Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": _words(r, 2, 5)},
                    {"role": "assistant", "content": _words(r, 2, 6)},
                ]
            }
            for _ in range(n)
        ]
    )


def texts(n: int = 12, seed: int = 0) -> Dataset:
    r = random.Random(seed)
    return Dataset.from_list([{"text": _words(r, 3, 8)} for _ in range(n)])


def peft_config(init="pissa", targets=TARGETS) -> LoraConfig:
    return lora_config(init, targets=targets)


def trainer(out, *, balora=ALL_ON, init="pissa", dataset=None, host=False, wrapped=False, **kw):
    """A BALoRASFTTrainer (or, with ``host=True``, TRL's SFTTrainer) on a fresh tiny llama, given a
    ``peft_config`` (or, with ``wrapped=True``, an existing PeftModel of the same config)."""
    train, eval_ = kw.pop("train_dataset", dataset or prompt_completion()), kw.pop("eval_dataset", None)
    ref_model = kw.pop("ref_model", None)
    model = lora(tiny_llama(), init=init, r=4, alpha=8, targets=TARGETS) if wrapped else tiny_llama()
    common = dict(
        args=sft_args(out, **kw),
        train_dataset=train,
        eval_dataset=eval_,
        processing_class=tiny_tokenizer(),
        peft_config=None if wrapped else peft_config(init),
    )
    if host:
        return SFTTrainer(model, **common)
    return BALoRASFTTrainer(model, balora_config=balora, ref_model=ref_model, **common)


def losses(tr) -> list[float]:
    return [h["loss"] for h in tr.state.log_history if "loss" in h]


def adapter(tr, name="default") -> dict[str, torch.Tensor]:
    return adapter_state(tr.model, name)


def nudge(tr, scale=0.05) -> None:
    """Move the trained adapter off the reference (after the snapshot), so the consistency term has a gradient."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in tr.model.named_parameters() if p.requires_grad):
            p.add_(scale * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------------------------- a) λ = 0
def test_all_lambdas_zero_reproduce_sft_trainer(tmp_path):
    kw = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2)
    host = trainer(tmp_path / "host", host=True, **kw)
    host.train()
    ours = trainer(tmp_path / "ours", balora=ALL_OFF, **kw)
    ours.train()
    assert len(losses(host)) == 3
    assert losses(ours) == pytest.approx(losses(host), abs=1e-6)
    assert "balora/rows" in ours.state.log_history[0]


# ---------------------------------------------------------------------------------------------- b) GA
@pytest.mark.parametrize("init", ["pissa", True])
def test_token_terms_same_update_for_4x1_and_2x2(tmp_path, init):
    cfg = {**ALL_ON, "lambda_svd": 0.0}
    kw = dict(max_steps=1, optim="sgd", learning_rate=0.5, max_grad_norm=0.0)
    runs = {}
    for name, bs, ga, bal in [("4x1", 4, 1, cfg), ("2x2", 2, 2, cfg), ("off", 4, 1, ALL_OFF)]:
        tr = trainer(
            tmp_path / name,
            balora=bal,
            init=init,
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            **kw,
        )
        nudge(tr)
        start = adapter(tr)
        tr.train()
        runs[name] = {k: v - start[k] for k, v in adapter(tr).items()}  # the update of the one optimizer step
    assert runs["4x1"].keys() == runs["2x2"].keys() and runs["4x1"]
    for k in runs["4x1"]:
        torch.testing.assert_close(runs["2x2"][k], runs["4x1"][k], rtol=1e-5, atol=1e-7, msg=k)
    effect = max((runs["4x1"][k] - runs["off"][k]).abs().max().item() for k in runs["4x1"])
    assert effect > 1e-4, "the terms did not change the update: the comparison would be vacuous"


# ---------------------------------------------------------------------------------------------- c) masks
def _rows_per_epoch(tr) -> float:
    tr.train()
    logged = [h["balora/rows"] for h in tr.state.log_history if "balora/rows" in h]
    assert len(logged) == tr.state.global_step  # one micro-batch per logged step
    return sum(logged)


def _n(text: str) -> int:
    return len(text.split())


def test_rows_completion_only(tmp_path):
    ds = prompt_completion(12)
    tr = trainer(tmp_path, dataset=ds, max_steps=-1, num_train_epochs=1)
    # Each completion and its appended EOS are trained; each such token is predicted by the position before it.
    assert _rows_per_epoch(tr) == sum(_n(c) + 1 for c in ds["completion"])


def test_rows_assistant_only(tmp_path):
    ds = conversations(8)
    tr = trainer(tmp_path, dataset=ds, max_steps=-1, num_train_epochs=1, assistant_only_loss=True)
    # Inside {% generation %}: the assistant's words and its "</s>"; "user : ... </s> assistant :" is not trained.
    assert _rows_per_epoch(tr) == sum(_n(m[1]["content"]) + 1 for m in ds["messages"])


PACKING = {
    "padded": {},
    "packing": dict(packing=True, packing_strategy="bfd"),
    "padding_free": dict(padding_free=True, max_length=None),
}


@pytest.mark.parametrize("mode", list(PACKING))
def test_rows_language_modeling_and_packed_documents(tmp_path, mode):
    ds = texts(12)
    tr = trainer(
        tmp_path, dataset=ds, max_steps=-1, num_train_epochs=1, per_device_train_batch_size=2, **PACKING[mode]
    )
    if mode != "padded":
        batch = next(iter(tr.get_train_dataloader()))
        assert (
            "position_ids" in batch and int((batch["position_ids"] == 0).sum()) > 1
        )  # several documents per row
    # Every token of "<text> </s>" except each document's first is predicted from inside its own document (the
    # shifted mask: an unshifted one would count one more per document); the position before a document start
    # (the previous document's EOS) is never a row.
    assert _rows_per_epoch(tr) == sum(_n(t) for t in ds["text"])


# ---------------------------------------------------------------------------------------------- d) GC, eval
def test_gradient_checkpointing_matches(tmp_path):
    plain = trainer(tmp_path / "plain")
    plain.train()
    gc = trainer(tmp_path / "gc", gradient_checkpointing=True)
    gc.train()
    assert losses(gc) == pytest.approx(losses(plain), abs=1e-6)
    for k, v in adapter(plain).items():
        torch.testing.assert_close(adapter(gc)[k], v, rtol=1e-5, atol=1e-6)


def test_eval_reports_terms_and_keeps_sft_eval_loss(tmp_path):
    ev = prompt_completion(8, seed=1)
    host = trainer(tmp_path / "host", host=True, eval_dataset=ev, per_device_eval_batch_size=4)
    ours = trainer(tmp_path / "ours", eval_dataset=ev, per_device_eval_batch_size=4)
    nudge(host), nudge(ours)  # the same weights, off the reference: every term is non-zero
    m_host, m_ours = host.evaluate(), ours.evaluate()
    assert m_ours["eval_loss"] == pytest.approx(m_host["eval_loss"], abs=1e-6)
    for term in ("consistency", "diversity", "svd"):
        assert abs(m_ours[f"eval_balora/{term}"]) > 0
    assert m_ours["eval_balora/rows"] > 0
    assert not any(k.startswith("balora/") for k in m_ours)
    ours.train()
    assert not any(k.startswith("eval_") for h in ours.state.log_history if "loss" in h for k in h)


def test_bf16_autocast_terms_match_fp32(tmp_path):
    """bf16 autocast (on CPU here; the same autocast path as a GPU): the terms are computed in fp32 from the
    bf16 forward, so they agree with the fp32 run to bf16 activation precision."""
    fp32 = trainer(tmp_path / "fp32", max_steps=1)
    fp32.train()
    bf16 = trainer(tmp_path / "bf16", max_steps=1, bf16=True)
    bf16.train()
    a, b = fp32.state.log_history[0], bf16.state.log_history[0]
    assert a["balora/rows"] == b["balora/rows"]
    for term in ("diversity", "svd"):
        assert b[f"balora/{term}"] == pytest.approx(a[f"balora/{term}"], rel=2e-2)
    assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)


# ---------------------------------------------------------------------------------------------- e) metrics, h) seed
def test_metrics_in_log_history_and_same_seed_same_losses(tmp_path):
    a = trainer(tmp_path / "a")
    a.train()
    b = trainer(tmp_path / "b", wrapped=True)  # the same LoRA, wrapped by the user instead of by TRL
    b.train()
    assert losses(a) == losses(b)  # bitwise: same seed, same CPU kernels
    logs = [h for h in a.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        for term, lam in (("consistency", 0.5), ("diversity", 0.1), ("svd", 0.1)):
            assert h[f"balora/lambda_{term}"] == lam
            assert h[f"balora/{term}_weighted"] == pytest.approx(lam * h[f"balora/{term}"])
    assert logs[0]["balora/consistency"] == pytest.approx(0.0, abs=1e-7)  # the model starts at the reference
    assert logs[-1]["balora/consistency"] > 0


# ---------------------------------------------------------------------------------------------- f) saving
def test_save_model_writes_the_servable_adapter_and_the_trainable_form(tmp_path):
    tr = trainer(tmp_path / "run", max_steps=2, init="pissa_niter_4")  # PEFT's fast (randomised) PiSSA SVD
    tr.train()
    out = tmp_path / "final"
    tr.save_model(str(out))
    for f in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "balora_config.json",
        "README.md",
        "balora_resume/adapter_model.safetensors",
        f"balora_resume/{REF_ADAPTER}/adapter_config.json",
    ):
        assert (out / f).is_file(), f
    assert BALoRAConfig.from_pretrained(out) == tr.balora.config
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    model = tr.model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        base = (
            tiny_llama()
        )  # untouched pre-trained weights (the PiSSA residual lives only in the trained model)
        before = base(input_ids=ids).logits
        served = PeftModel.from_pretrained(base, str(out)).eval()(input_ids=ids).logits
    assert (trained - before).abs().max() > 1e-3
    torch.testing.assert_close(served, trained, rtol=1e-4, atol=1e-5)


def test_push_to_hub_uploads_the_servable_adapter_with_trls_card_and_ours(tmp_path, monkeypatch):
    """TRL's card (through _tag_names, _name, _paper) plus BA-LoRA's section, on the plain-LoRA root."""
    from huggingface_hub import ModelCard

    monkeypatch.setattr("trl.trainer.base_trainer.get_trackio_space_url", lambda: None, raising=False)
    hub = FakeHub()
    monkeypatch.setattr("transformers.trainer.hf_api", lambda: hub)
    tr = trainer(tmp_path / "run", max_steps=2, hub_model_id="me/tiny-balora")
    tr.train()
    tr.push_to_hub()
    (up,) = hub.uploads
    assert up["folder"] == str(tmp_path / "run") and up["adapter_config"]["init_lora_weights"] is True
    assert not any(f.startswith("balora_resume") for f in up["files"])  # hub_strategy every_save: no resume
    card = ModelCard(up["card"])
    assert {"trl", "sft", "ba-lora", "peft"} <= set(card.data.tags)
    text = card.text
    assert (
        "trained with BA-LoRA, a method introduced in" in text and "huggingface.co/papers/2408.04556" in text
    )
    assert text.count("@inproceedings{chang2026balora") == 1  # TRL's citation block; ours is not repeated
    assert "## BA-LoRA" in text and 'PeftModel.from_pretrained(base, "me/tiny-balora")' in text
    assert "| λ2 diversity (entropy of the top-20 logits) | 0.1 |" in text


# ---------------------------------------------------------------------------------------------- g) resume
def test_resume_restores_reference_and_matches_uninterrupted(tmp_path, monkeypatch):
    # TRL 1.9 writes a model card with every checkpoint and imports trackio (and gradio, ~15 s) for its URL.
    monkeypatch.setattr("trl.trainer.base_trainer.get_trackio_space_url", lambda: None, raising=False)
    # The paper's schedules (cosine λ1; λ2, λ3 off for the first quarter): the resumed run must continue them.
    scheduled = {
        **ALL_ON,
        "consistency_schedule": "cosine",
        "regularizer_schedule": "warmup",
        "warmup_start": 0.25,
    }
    # PEFT's randomised PiSSA SVD on a PeftModel built before the trainer (TRL seeds its own wrapping): the resumed
    # process draws another one (the RNG is moved on below), so its initial adapter and residual base differ
    # from the checkpoint's; resume must restore both.
    kw = dict(
        max_steps=4, save_strategy="steps", save_steps=2, balora=scheduled, init="pissa_niter_2", wrapped=True
    )
    full = trainer(tmp_path / "full", **kw)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert (ckpt / "balora_resume" / REF_ADAPTER / "adapter_model.safetensors").is_file()
    snapshot = adapter(full, REF_ADAPTER)

    build = tiny_llama

    def other_draw(seed: int = 0):
        model = build(seed)
        torch.manual_seed(1234)  # PEFT's randomised SVD, run inside the trainer, draws from here
        return model

    monkeypatch.setitem(globals(), "tiny_llama", other_draw)
    resumed = trainer(tmp_path / "resumed", **kw)
    first = adapter(resumed, REF_ADAPTER)
    assert max(float((first[k] - v).abs().max()) for k, v in snapshot.items()) > 1e-2
    resumed.train(resume_from_checkpoint=str(ckpt))
    for k, v in snapshot.items():
        torch.testing.assert_close(adapter(resumed, REF_ADAPTER)[k], v, rtol=0, atol=0)
    assert len(losses(full)) == 4  # the resumed state carries steps 1-2 from the checkpoint, then logs 3-4
    assert losses(resumed) == pytest.approx(losses(full), abs=1e-6)
    lambdas = [
        {k: v for k, v in h.items() if "lambda" in k}
        for h in (full.state.log_history[-2], resumed.state.log_history[-2])
    ]
    assert lambdas[0] == lambdas[1] and 0 < lambdas[0]["balora/lambda_consistency"] < 0.5
    final = adapter(full)
    for k, v in adapter(resumed).items():  # tolerance: 1e-6 absolute (fp32, same kernels, same data order)
        torch.testing.assert_close(v, final[k], rtol=0, atol=1e-6, msg=k)


# ---------------------------------------------------------------------------------------------- i) bad input
def _peft(model, **kw):
    return lora(model, r=4, alpha=8, targets=TARGETS, **kw)


def _quantised(model):
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    return model


Q = {"reference": "disabled_adapter"}
HEAD_SAVED = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["lm_head"])
BAD = [  # (model factory, peft_config, balora_config, error message pattern)
    pytest.param(tiny_llama, None, None, "needs a PEFT LoRA model", id="no adapter"),
    pytest.param(
        tiny_llama, peft_config(True, TARGETS + ["lm_head"]), None, "output head", id="lm_head targeted"
    ),
    pytest.param(tiny_llama, HEAD_SAVED, None, "output head", id="lm_head in modules_to_save"),
    pytest.param(
        lambda: lora(tiny_llama(), init=True, targets=["q_proj", "lm_head"]),
        None,
        None,
        "head is trained",
        id="PeftModel with LoRA on lm_head",
    ),
    pytest.param(
        tiny_llama, peft_config(), Q, "disabled_adapter", id="disabled adapter + PiSSA via peft_config"
    ),
    pytest.param(lambda: _peft(tiny_llama()), None, Q, "residual", id="disabled adapter + PiSSA PeftModel"),
    pytest.param(
        lambda: _quantised(tiny_llama()),
        peft_config(),
        None,
        "quantised",
        id="quantised + PiSSA via peft_config",
    ),
    pytest.param(
        lambda: _peft(_quantised(tiny_llama())), None, None, "quantised", id="quantised + PiSSA PeftModel"
    ),
    pytest.param(
        lambda: _peft(tiny_llama()), None, "iclr2026", "Unknown BA-LoRA preset", id="unknown preset"
    ),
    pytest.param(
        lambda: _peft(tiny_llama()), None, {"lambda_svd": -1.0}, "lambda_svd", id="bad config value"
    ),
]


@pytest.mark.parametrize(("make_model", "pcfg", "bal", "match"), BAD)
def test_bad_input_refused_at_construction(tmp_path, make_model, pcfg, bal, match):
    model = make_model()
    with pytest.raises(ValueError, match=match):
        BALoRASFTTrainer(
            model,
            args=sft_args(tmp_path),
            train_dataset=prompt_completion(4),
            processing_class=tiny_tokenizer(),
            peft_config=pcfg,
            balora_config={**ALL_ON, **bal} if isinstance(bal, dict) else bal,
        )


# ---------------------------------------------------------------------------------------------- j) BALoRASFTConfig
def balora_sft_args(out, **kw) -> BALoRASFTConfig:
    return sft_args(out, config_class=BALoRASFTConfig, **kw)


def test_balora_sft_config_lambda_zero_reproduces_sft_trainer(tmp_path):
    """The settings in the args instead of balora_config=: λ = 0 gives SFTTrainer's losses, loss for loss."""
    kw = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2)
    host = trainer(tmp_path / "host", host=True, **kw)
    host.train()
    off = {f"balora_{k}": v for k, v in ALL_OFF.items()}
    ours = BALoRASFTTrainer(
        tiny_llama(),
        args=balora_sft_args(tmp_path / "ours", **kw, **off),
        train_dataset=prompt_completion(),
        processing_class=tiny_tokenizer(),
        peft_config=peft_config(),
    )
    assert ours.balora.config == BALoRAConfig.from_preset("iclr2026-nlg", **ALL_OFF)
    ours.train()
    assert len(losses(host)) == 3
    assert losses(ours) == pytest.approx(losses(host), abs=1e-6)
    assert "balora/rows" in ours.state.log_history[0]


def test_trl_parser_reads_balora_keys_from_yaml_and_the_command_line(tmp_path):
    from trl import TrlParser

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "output_dir: out\nuse_cpu: true\nbf16: false\nreport_to: none\n"
        "balora_preset: v5-nlg\nbalora_lambda_svd: 1e-3\nbalora_regularizer_schedule: quadratic_warmup\n"
        "balora_schedule_whole_steps: true\nbalora_consistency_schedule: adaptive\n"
    )
    parser = TrlParser([BALoRASFTConfig])
    (args,) = parser.parse_args_and_config(["--config", str(yaml_file), "--balora_warmup_start", "0.3"])
    expected = BALoRAConfig.from_preset(
        "v5-nlg",
        lambda_svd=1e-3,  # PyYAML reads `1e-3` as a string; argparse converts it with the field's type
        regularizer_schedule="quadratic_warmup",
        schedule_whole_steps=True,
        consistency_schedule="adaptive",
        warmup_start=0.3,
    )
    assert args.to_balora_config() == expected
    # an unset key stays unset in the arguments (None: the preset's value), and the trackers, which log
    # args.to_dict(), record the value that trains
    assert args.balora_lambda_diversity is None and args.to_dict()["balora_lambda_diversity"] == 3e-4
    assert args.to_dict()["balora_preset"] == "v5-nlg" and args.to_dict()["balora_lambda_svd"] == 1e-3
    (bad,) = [a for a in parser._actions if a.dest == "balora_regularizer_schedule"]
    assert "linear_warmup" in bad.choices and bad.help.startswith("BA-LoRA: ")
    with pytest.raises(ValueError, match=r"balora_warmup_ramp=1\.5"):
        parser.parse_args_and_config(["--config", str(yaml_file), "--balora_warmup_ramp", "1.5"])


def test_balora_config_and_args_never_disagree_silently(tmp_path):
    common = dict(
        train_dataset=prompt_completion(4), processing_class=tiny_tokenizer(), peft_config=peft_config()
    )
    args = balora_sft_args(tmp_path / "a", balora_lambda_svd=0.01)
    with pytest.raises(ValueError) as err:
        BALoRASFTTrainer(tiny_llama(), args=args, balora_config="iclr2026-nlg", **common)
    assert "balora_config.lambda_svd=0.005" in str(err.value) and "args.balora_lambda_svd=0.01" in str(
        err.value
    )
    agreeing = BALoRASFTTrainer(
        tiny_llama(),
        args=args,
        balora_config=BALoRAConfig.from_preset("iclr2026-nlg", lambda_svd=0.01),
        **common,
    )
    assert agreeing.balora.config.lambda_svd == 0.01
    # args that set nothing take balora_config=: the user's args stay as they are, and the trainer's arguments
    # (what trackers record) describe the settings that train
    quiet = balora_sft_args(tmp_path / "b")
    v5 = BALoRASFTTrainer(tiny_llama(), args=quiet, balora_config="v5-nlg", **common)
    assert v5.balora.config == BALoRAConfig.from_preset("v5-nlg")
    assert quiet.balora_svd_top_k is None and quiet.to_balora_config() == BALoRAConfig.from_preset(
        "iclr2026-nlg"
    )
    assert v5.args.to_balora_config() == v5.balora.config and v5.args.to_dict()["balora_svd_top_k"] == 3


def test_nlu_only_settings_are_offered_only_where_a_classifier_can_train(tmp_path):
    """balora_reference_cache and balora_reference_head (NLU only) are arguments of the generic BALoRAArguments
    (train_nlu.py, the callback), which trains classifiers, but not of BALoRASFTConfig: TRL trains causal LMs."""
    import dataclasses

    from transformers import HfArgumentParser
    from trl import TrlParser

    from balora_plugins.arguments import BALoRAArguments

    nlu_only = {"balora_reference_cache", "balora_reference_head"}
    generic = {f.name for f in dataclasses.fields(BALoRAArguments)}
    trl = {f.name for f in dataclasses.fields(BALoRASFTConfig)}
    assert nlu_only <= generic and not nlu_only & trl
    assert generic - nlu_only <= trl  # every other setting is on both doors
    (nlu,) = HfArgumentParser(BALoRAArguments).parse_args_into_dataclasses(
        ["--balora_preset", "iclr2026-nlu", "--balora_reference_cache", "true"]
    )
    assert nlu.to_balora_config() == BALoRAConfig.from_preset("iclr2026-nlu", reference_cache=True)
    args = balora_sft_args(tmp_path)
    assert not nlu_only & set(args.to_dict())  # nor do trackers record a setting that can only be false
    with pytest.raises(ValueError, match="balora_reference_cache"):
        TrlParser([BALoRASFTConfig]).parse_args_and_config(
            [
                "--output_dir",
                str(tmp_path),
                "--use_cpu",
                "true",
                "--bf16",
                "false",
                "--balora_reference_cache",
                "true",
            ]
        )


def test_metrics_go_to_trls_store(tmp_path):
    """One metric store: balora/* values land in TRL's `_metrics` and SFTTrainer.log reduces them; a skip count
    is reported as its latest value, not a mean of counts."""
    tr = trainer(tmp_path)
    for count, value in ((1.0, 0.5), (2.0, 0.7)):
        tr.balora_record({"balora/skipped_svd": count, "balora/svd": value}, "train")
    assert tr._metrics["train"]["balora/svd"] == [0.5, 0.7]
    # the mixin's own store (for hosts without one) stays empty
    assert not any(tr.balora_state.metrics.values())
    tr.model.train()
    tr.log({"loss": 1.0})
    last = tr.state.log_history[-1]
    assert last["balora/skipped_svd"] == 2.0 and last["balora/svd"] == pytest.approx(0.6)


def test_ref_model_by_path_is_loaded_like_the_student(tmp_path):
    """A reference given as a path loads with the student's dtype on its device and trains exactly as the same
    model passed as an object."""
    tiny_llama().save_pretrained(tmp_path / "base")
    runs = {}
    for name, ref in (("object", tiny_llama()), ("path", str(tmp_path / "base"))):
        runs[name] = trainer(tmp_path / name, ref_model=ref, balora={**ALL_ON, "reference": "model"})
        runs[name].train()
    loaded = runs["path"].balora.ref_model
    assert (
        type(loaded).__name__ == "LlamaForCausalLM" and loaded.dtype == torch.float32 and not loaded.training
    )
    assert losses(runs["path"]) == losses(runs["object"])
    assert runs["path"].state.log_history[-2]["balora/consistency"] > 0


# ---------------------------------------------------------------------------------------------- recipe
@pytest.mark.slow
def test_recipe_tiny_runs(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integrations", "trl"))
    try:
        import train_gsm
    finally:
        sys.path.pop(0)
    result = train_gsm.main(["--tiny", "--output-dir", str(tmp_path), "--max-steps", "4"])
    logs, metrics = result["log_history"], result["metrics"]
    assert sum("balora/svd" in h for h in logs) >= 2 and "eval_balora/consistency" in metrics
    assert metrics["eval_loss"] < metrics["eval_loss_before"]  # held-out answer NLL moved down
    assert json.loads((tmp_path / "gsm_metrics.json").read_text()) == pytest.approx(metrics)
    for f in (
        "adapter_model.safetensors",
        "balora_config.json",
        f"balora_resume/{REF_ADAPTER}/adapter_config.json",
    ):
        assert (tmp_path / f).is_file(), f
