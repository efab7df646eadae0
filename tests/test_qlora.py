"""4-bit bases (bitsandbytes on the CPU): QPiSSA through TRL and the callback, the step-0 reference, the served
artefact on the untouched full-precision base, the merged export, and what is refused (docs/qlora.md).

The model is a tiny random Llama of width 64 (bitsandbytes' CPU 4-bit path quantises blocks of 64 values), saved
once per module in full precision and loaded from there in 4 bits, as users load a hub checkpoint.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="QLoRA tests need bitsandbytes (the `test` extra installs it)")

from conftest import VOCAB, lora_config, sft_args, tiny_tokenizer  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from test_callback import Rows, targs  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
)

from balora_plugins import BALoRAConfig  # noqa: E402
from balora_plugins import functional as Fn  # noqa: E402
from balora_plugins.callback import BALoRACallback  # noqa: E402
from balora_plugins.core import adapter_start, export_merged, get_qpissa_model, reference_mode  # noqa: E402
from balora_plugins.core.quantized import dequantized_weight  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
ON = {
    "lambda_consistency": 0.5,
    "lambda_diversity": 0.1,
    "lambda_svd": 0.1,
    "consistency_schedule": "constant",
    "regularizer_schedule": "constant",
}


def tiny_llama64(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp") / "base"
    tiny_llama64().save_pretrained(path)
    return path


def bnb_config(quant_type: str = "nf4") -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=torch.float32
    )


def load_4bit(path, quant_type: str = "nf4"):
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb_config(quant_type), device_map="cpu"
    ).eval()


def load_fp(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def ids(seed: int = 0, n: int = 2, t: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits.float()


def n_linear4bit(model) -> int:
    return sum(
        type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")
        for m in model.modules()
    )


# ---------------------------------------------------------------------------------------------- the recipe
def test_qpissa_is_pissa_of_full_precision_with_the_residual_quantised(fp_dir):
    """Against an independent computation: PEFT's PiSSA on the full-precision model gives (A0, B0, W_res); QPiSSA
    must hold the same A0, B0 and, as its base, bitsandbytes' own 4-bit round trip of that W_res."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    q = get_qpissa_model(load_4bit(fp_dir), lora_config("pissa", targets=TARGETS))
    ref = get_peft_model(load_fp(fp_dir), lora_config("pissa", targets=TARGETS))
    assert n_linear4bit(q) > 0 and q.peft_config["default"].init_lora_weights == "pissa"
    fp_layers = dict(ref.named_modules())
    checked = 0
    for name, m in q.named_modules():
        if not hasattr(m, "lora_A") or type(m.get_base_layer()).__name__ != "Linear4bit":
            continue
        other = fp_layers[name]
        torch.testing.assert_close(m.lora_A["default"].weight, other.lora_A["default"].weight, rtol=0, atol=0)
        torch.testing.assert_close(m.lora_B["default"].weight, other.lora_B["default"].weight, rtol=0, atol=0)
        w_res = other.get_base_layer().weight.detach()
        packed, state = quantize_4bit(w_res, blocksize=64, quant_type="nf4")
        expected = dequantize_4bit(packed, state, quant_type="nf4")
        torch.testing.assert_close(dequantized_weight(m.get_base_layer()), expected, rtol=0, atol=1e-6)
        checked += 1
    assert checked == 2 * len(TARGETS)  # 2 layers


def test_qpissa_refuses_what_it_cannot_do(fp_dir, tmp_path):
    with pytest.raises(ValueError, match=r"needs init_lora_weights='pissa' or 'pissa_niter_N', got 'olora'"):
        get_qpissa_model(load_4bit(fp_dir), lora_config("olora", targets=TARGETS))
    with pytest.raises(ValueError, match=r"use_dora=True with init_lora_weights='pissa' on a 4-bit base"):
        get_qpissa_model(load_4bit(fp_dir), lora_config("pissa", targets=TARGETS, use_dora=True))
    with pytest.raises(ValueError, match=r"has no 4-bit layers"):
        get_qpissa_model(load_fp(fp_dir), lora_config("pissa", targets=TARGETS))
    other = tmp_path / "other"
    tiny_llama64(seed=5).save_pretrained(
        other
    )  # same shapes, other weights: not what the model was quantised from
    with pytest.raises(ValueError, match=r"is not the one this 4-bit layer was quantised from"):
        get_qpissa_model(load_4bit(fp_dir), lora_config("pissa", targets=TARGETS), weights=str(other))


def test_pre_initialised_qpissa_pair_is_recognised(fp_dir, tmp_path):
    """The authors' route: PiSSA run once in full precision, the adapter saved with init_lora_weights=True, the
    residual saved and loaded in 4 bits, the adapter loaded onto it. Its config looks like plain LoRA; the pair is
    recognised on its 4-bit residual. An unrelated adapter on a 4-bit base is not."""
    pissa = get_peft_model(load_fp(fp_dir), lora_config("pissa_niter_4", targets=TARGETS))
    pissa.peft_config["default"].init_lora_weights = True
    pissa.save_pretrained(tmp_path / "pissa_init")
    pissa.unload().save_pretrained(tmp_path / "residual")
    pair = PeftModel.from_pretrained(
        load_4bit(tmp_path / "residual"), tmp_path / "pissa_init", is_trainable=True
    )
    start = adapter_start(pair)
    assert start.rewritten is True and "PiSSA pair" in start.reason
    unrelated = PeftModel.from_pretrained(load_4bit(fp_dir), tmp_path / "pissa_init", is_trainable=True)
    assert adapter_start(unrelated).rewritten is None
    # trains with the step-0 reference and serves as the rank-2r plain LoRA of the full-precision base
    trainer = Trainer(
        model=pair, args=targs(tmp_path / "run"), train_dataset=Rows(_rows()), callbacks=[BALoRACallback(ON)]
    )
    assert trainer.balora.mode == "adapter_snapshot"
    trainer.train()
    assert trainer.state.log_history[0]["balora/consistency"] == pytest.approx(0.0, abs=1e-6)
    trainer.save_model(str(tmp_path / "final"))
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text())["r"] == 8


def test_qpissa_under_zero3_is_refused(fp_dir):
    from types import SimpleNamespace

    from balora_plugins.engines import check_engine

    model = get_qpissa_model(load_4bit(fp_dir), lora_config("pissa_niter_4", targets=TARGETS))
    zero = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}
    accelerator = SimpleNamespace(
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=zero))
    )
    with pytest.raises(ValueError, match=r"DeepSpeed ZeRO-3 with a PiSSA adapter on a 4-bit base \(QPiSSA\)"):
        check_engine(accelerator, model)
    check_engine(accelerator)  # without the model (or with a full-precision one) this check does not apply


# ---------------------------------------------------------------------------------------------- TRL
def _sft_rows(n: int = 16):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    words = [chr(ord("a") + i) for i in range(26)]
    pick = lambda k: " ".join(words[int(i)] for i in torch.randint(0, 26, (k,), generator=g))  # noqa: E731
    return Dataset.from_list([{"prompt": pick(3), "completion": " " + pick(5)} for _ in range(n)])


def test_trl_qpissa_from_a_model_id_trains_and_serves_on_the_full_precision_base(fp_dir, tmp_path):
    """BALoRASFTTrainer given a model path with a 4-bit quantization config and a PiSSA LoraConfig: QPiSSA is
    built in one step, the consistency term is 0 at step 0 (the reference is the step-0 model), and the root of
    the final output is a plain rank-2r LoRA that loads with PEFT on the untouched full-precision base; its merged
    export is that model in full precision.

    Tolerance of served vs trained: the trained model is Q(W_res) + s·BA, the served one W_res + s·BA, so they
    differ by the residual's fixed 4-bit rounding error E = Q(W_res) − W_res. Its effect on the logits at step 0
    is d0 = |f(Q(W_res) + s·B0A0) − f(W)| (the reference adapter after training gives the step-0 model exactly);
    a few small steps move the point where E acts only slightly, so |served − trained| ≤ 2·d0 (measured: 0.98·d0).
    A wrong export (the trained rank-r adapter on the untouched base, i.e. W + s·BA) misses s·B0A0 and falls
    outside it (measured: 3·d0).
    """
    from balora_plugins.trl import BALoRASFTTrainer

    args = sft_args(
        tmp_path / "run",
        max_steps=3,
        learning_rate=2e-2,
        model_init_kwargs={"quantization_config": bnb_config(), "device_map": "cpu", "dtype": "float32"},
    )
    tr = BALoRASFTTrainer(
        str(fp_dir),
        args=args,
        train_dataset=_sft_rows(),
        processing_class=tiny_tokenizer(),
        peft_config=lora_config("pissa_niter_4", targets=TARGETS),
        balora_config=ON,
    )
    assert n_linear4bit(tr.model) == 2 * 7 and tr.balora.mode == "adapter_snapshot"
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert logs[0]["balora/consistency"] == pytest.approx(0.0, abs=1e-6)
    assert logs[-1]["balora/consistency"] > 1e-6

    out = tmp_path / "final"
    tr.save_model(str(out))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True
    assert cfg["base_model_name_or_path"] == str(fp_dir)  # the full-precision checkpoint: where it serves
    card = (out / "README.md").read_text()
    assert "Trained on a 4-bit residual" in card and "nf4" in card

    x = ids()
    model = tr.model.eval()
    trained = logits(model, x)
    with reference_mode(model, "adapter_snapshot"):
        step0 = logits(model, x)
    w = logits(load_fp(fp_dir), x)
    d0 = float((step0 - w).abs().max())
    served = logits(PeftModel.from_pretrained(load_fp(fp_dir), str(out)), x)
    wrong = logits(PeftModel.from_pretrained(load_fp(fp_dir), str(out / "balora_resume")), x)
    assert float((trained - w).abs().max()) > d0  # training moved the model by more than the 4-bit error
    assert float((served - trained).abs().max()) <= 2 * d0 + 1e-5
    assert float((wrong - trained).abs().max()) > 2 * d0 + 1e-5  # the tolerance tells a wrong export apart

    merged_dir = tmp_path / "merged"
    export_merged(str(out), str(merged_dir))  # the base named by the adapter: the full-precision checkpoint
    torch.testing.assert_close(logits(load_fp(merged_dir), x), served, rtol=1e-4, atol=1e-5)
    assert n_linear4bit(load_fp(merged_dir)) == 0
    quantised_base = tmp_path / "saved_4bit"
    shutil.copytree(fp_dir, quantised_base)
    config = json.loads((quantised_base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantised_base / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"merging needs the full-precision base model"):
        export_merged(str(out), str(tmp_path / "merged2"), base=str(quantised_base))


# ---------------------------------------------------------------------------------------------- callback
def _rows(n: int = 8, t: int = 12):
    x = ids(seed=1, n=n, t=t)
    labels = x.clone()
    labels[:, :3] = -100
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels}


def test_callback_qpissa_with_the_documented_helper(fp_dir, tmp_path):
    model = get_qpissa_model(load_4bit(fp_dir), lora_config("pissa_niter_4", targets=TARGETS))
    trainer = Trainer(
        model=model, args=targs(tmp_path), train_dataset=Rows(_rows()), callbacks=[BALoRACallback(ON)]
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[0]["balora/consistency"] == pytest.approx(0.0, abs=1e-6)
    trainer.save_model(str(tmp_path / "final"))
    cfg = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and (tmp_path / "final" / "balora_resume" / "balora_ref").is_dir()


def test_explicit_full_precision_reference_measures_the_4bit_distance(fp_dir, tmp_path):
    """With ref_model= the full-precision pre-trained model (the authors' reference), the consistency term at
    step 0 is the distance of the 4-bit step-0 model from W: computed here from full logits of both models."""
    model = get_qpissa_model(load_4bit(fp_dir), lora_config("pissa_niter_4", targets=TARGETS))
    pretrained = load_fp(fp_dir)
    config = BALoRAConfig(**{**ON, "lambda_diversity": 0.0, "lambda_svd": 0.0})
    cb = BALoRACallback(config, ref_model=pretrained)
    trainer = Trainer(model=model, args=targs(tmp_path), callbacks=[cb])
    assert trainer.balora.mode == "model"
    model.train()
    batch = _rows(n=4)
    items = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()))
    host = cb.host_class.compute_loss(trainer, model, dict(batch), num_items_in_batch=items)
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
    fwd = {k: v for k, v in batch.items() if k != "labels"}
    z, zr = logits(model, fwd["input_ids"]), logits(pretrained, fwd["input_ids"])
    kl = Fn.consistency_loss(
        Fn.select_positions(z, batch["labels"]),
        Fn.select_positions(zr, batch["labels"]),
        kind="kl",
        temperature=2.0,
    )
    assert float(kl) > 1e-5  # 4 bits cannot hold W: the step-0 model is not the pre-trained one
    torch.testing.assert_close(loss - host, config.lambda_consistency * kl, rtol=1e-4, atol=1e-7)


def test_card_and_refusals_for_other_quantised_setups():
    """8-bit with PiSSA is refused by name (a stand-in Linear8bitLt; bitsandbytes' int8 path is not exercised)."""
    from balora_plugins.core.quantized import check_quantised_pissa

    class Linear8bitLt(torch.nn.Linear):
        pass

    m = copy.deepcopy(tiny_llama64())
    m.model.layers[0].mlp.extra = Linear8bitLt(2, 2)
    with pytest.raises(ValueError, match=r"on an 8-bit base \(Linear8bitLt\)"):
        check_quantised_pissa(m, "pissa_niter_4", use_dora=False)
