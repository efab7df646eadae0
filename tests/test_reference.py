"""The pre-trained reference (docs/method.md §2): snapshot adapter, disabled adapter, separate model; state restored."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, lora, tiny_llama
from conftest import perturb as _perturb
from peft import LoraConfig, get_peft_model

from balora_plugins import BALoRAConfig
from balora_plugins import functional as Fn
from balora_plugins.core.objective import BALoRAObjective
from balora_plugins.core.reference import (
    REF_ADAPTER,
    add_snapshot_adapter,
    has_residual_base,
    reference_mode,
    resolve_mode,
)


def _fwd(inputs):
    return {k: v for k, v in inputs.items() if k != "labels"}


def _state(model):
    return {
        "training": {n: m.training for n, m in model.named_modules()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "active": {n: m.active_adapter for n, m in model.named_modules() if hasattr(m, "_active_adapter")},
        "disabled": {
            n: m.disable_adapters for n, m in model.named_modules() if hasattr(m, "_disable_adapters")
        },
    }


@pytest.fixture
def base_logits():
    inputs = batch()
    with torch.no_grad():
        return inputs, tiny_llama()(**_fwd(inputs)).logits  # the untouched pre-trained model


def test_snapshot_reproduces_pretrained_model_disabled_does_not(base_logits):
    inputs, base = base_logits
    model = lora(tiny_llama(), init="pissa")
    assert has_residual_base(model) and resolve_mode("auto", model, None) == "adapter_snapshot"
    add_snapshot_adapter(model)
    with reference_mode(model, "adapter_snapshot"):
        ref = model(**_fwd(inputs)).logits
    assert not ref.requires_grad
    assert (ref - base).abs().max() < 2e-6
    with reference_mode(model, "disabled_adapter"):
        residual = model(**_fwd(inputs)).logits
    assert (residual - base).abs().max() > 1e-2  # W_res alone is not the pre-trained model
    # the snapshot is a copy: moving the trained adapter leaves the reference on the pre-trained model
    _perturb(model)
    with torch.no_grad():
        moved = model(**_fwd(inputs)).logits
    assert (moved - base).abs().max() > 1e-2
    with reference_mode(model, "adapter_snapshot"):
        assert (model(**_fwd(inputs)).logits - base).abs().max() < 2e-6
    sel = Fn.select_positions
    kl0 = Fn.consistency_loss(sel(ref, inputs["labels"]), sel(base, inputs["labels"]), temperature=2.0)
    assert float(kl0) < 1e-9  # consistency ≈ 0 before any update


def test_add_snapshot_adapter_keeps_trainable_set_and_active_adapter():
    model = lora(tiny_llama(), init="pissa")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    add_snapshot_adapter(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert model.active_adapter == "default"
    assert all(
        m.active_adapter in ("default", ["default"]) for m in model.modules() if hasattr(m, "_active_adapter")
    )
    assert model.peft_config[REF_ADAPTER].init_lora_weights is True  # no second PiSSA SVD on the residual
    assert model.peft_config["default"].init_lora_weights == "pissa"
    snap = {n: p for n, p in model.named_parameters() if f".{REF_ADAPTER}." in n}
    assert snap and not any(p.requires_grad for p in snap.values())
    for n, p in snap.items():
        torch.testing.assert_close(
            p, dict(model.named_parameters())[n.replace(REF_ADAPTER, "default")], rtol=0, atol=0
        )
    # only the trained adapter receives gradients
    out = model(**batch())
    out.loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == trainable
    # calling it again (e.g. prepare() twice) refreshes the copy but adds nothing
    add_snapshot_adapter(model)
    assert list(model.peft_config) == ["default", REF_ADAPTER]


@pytest.mark.parametrize("mode", ["adapter_snapshot", "disabled_adapter"])
def test_reference_mode_restores_state(mode):
    cfg = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"
    )
    model = get_peft_model(tiny_llama(), cfg)
    add_snapshot_adapter(model)
    model.train()
    model.base_model.model.model.layers[0].eval()  # a mixed pattern of flags must come back as it was
    next(p for n, p in model.named_parameters() if "embed_tokens" in n).requires_grad_(True)
    before = _state(model)
    inputs = _fwd(batch())
    base = tiny_llama()(**inputs).logits.detach()
    with reference_mode(model, mode):
        assert not any(m.training for m in model.modules())
        a = model(**inputs).logits
        b = model(**inputs).logits
    assert torch.equal(a, b)  # no dropout
    if mode == "adapter_snapshot":
        assert (a - base).abs().max() < 2e-6
    assert _state(model) == before
    with torch.no_grad():  # dropout is back on in train mode
        assert not torch.equal(model(**inputs).logits, model(**inputs).logits)
    with pytest.raises(RuntimeError, match="boom"), reference_mode(model, mode):
        raise RuntimeError("boom")
    assert _state(model) == before


def test_disabled_adapter_with_pissa_raises():
    model = lora(tiny_llama(), init="pissa")
    with pytest.raises(ValueError, match=r"reference='disabled_adapter'.*'pissa'.*adapter_snapshot"):
        resolve_mode("disabled_adapter", model, None)
    with pytest.raises(ValueError, match="disabled_adapter"):
        BALoRAObjective(BALoRAConfig(reference="disabled_adapter")).prepare(model)
    with pytest.raises(ValueError, match=r"reference='model' but no reference model"):
        resolve_mode("model", model, None)


def test_plain_lora_init_uses_disabled_adapter(base_logits):
    inputs, base = base_logits
    model = lora(tiny_llama(), init=True)
    obj = BALoRAObjective(BALoRAConfig()).prepare(model)
    assert obj.mode == "disabled_adapter" and REF_ADAPTER not in model.peft_config
    _perturb(model)
    with torch.no_grad():
        assert (model(**_fwd(inputs)).logits - base).abs().max() > 1e-2
    with reference_mode(model, obj.mode):
        torch.testing.assert_close(model(**_fwd(inputs)).logits, base, rtol=0, atol=1e-6)


def test_separate_reference_model():
    inputs = batch()
    model = lora(tiny_llama(), init="pissa")
    ref_model = tiny_llama()
    ref_model.train()
    cfg = BALoRAConfig(lambda_diversity=0.0, lambda_svd=0.0, lambda_consistency=1.0)
    obj = BALoRAObjective(cfg, ref_model=ref_model).prepare(model)
    assert obj.mode == "model"
    assert (
        REF_ADAPTER in model.peft_config
    )  # the step-0 adapter is still kept: the exports and resuming need it
    assert not ref_model.training and not any(p.requires_grad for p in ref_model.parameters())
    _perturb(model)
    out = model(**inputs)
    loss, metrics = obj.compute(model, inputs)
    z = Fn.select_positions(out.logits, inputs["labels"])
    zr = Fn.select_positions(ref_model(**_fwd(inputs)).logits, inputs["labels"])
    expected = Fn.consistency_loss(z, zr, temperature=2.0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    assert metrics["balora/consistency"] == pytest.approx(float(expected.detach()), rel=1e-5)


def test_separate_reference_model_must_share_the_head():
    """The fused path uses the trained model's frozen head for the reference: another head is refused."""
    model = lora(tiny_llama(), init="pissa")
    with pytest.raises(ValueError, match=r"different output head.*relative difference"):
        BALoRAObjective(BALoRAConfig(), ref_model=tiny_llama(seed=7)).prepare(model)
    with pytest.raises(ValueError, match=r"different output head.*shape \(64, 32\) vs \(96, 32\)"):
        BALoRAObjective(BALoRAConfig(), ref_model=tiny_llama(vocab=64)).prepare(model)
    BALoRAObjective(BALoRAConfig(), ref_model=tiny_llama().to(torch.bfloat16)).prepare(
        model
    )  # rounding is fine
