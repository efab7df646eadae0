"""Setups that once trained silently wrong are now right or refused before step 1 (docs/method.md §2, §3.4).

Each case is compared with an independent computation: the untouched pre-trained model (its logits or hidden
states) for the reference, the trained model served by plain PEFT on the untouched base for the export.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import CONSTANT, batch, lora, perturb, tiny_bert_classifier, tiny_llama, tiny_llava
from peft import LoraConfig, PeftModel, get_peft_model

from balora_plugins import BALoRAConfig
from balora_plugins.core import BALoRAObjective, adapter_start
from balora_plugins.core.export import (
    ADAPTER_CONFIG,
    INITIAL_DIR,
    export_plain_lora,
    save_initial_adapter,
)
from balora_plugins.core.reference import (
    REF_ADAPTER,
    adapter_state,
    add_snapshot_adapter,
    reference_mode,
    restore_residual_base,
)

TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")


def _cfg(**kw) -> BALoRAConfig:
    return BALoRAConfig(**{**CONSTANT, **kw})


def _fwd(inputs):
    return {k: v for k, v in inputs.items() if k != "labels"}


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**_fwd(inputs)).logits


# ---------------------------------------------------------------------------------------------- inits
def _preinitialised(tmp_path, init="pissa"):
    """PEFT's and the authors' PiSSA recipe: run the SVD once, save the adapter with init_lora_weights=True,
    keep the residual base, later load the pair."""
    model = lora(tiny_llama(), init=init, targets=TARGETS)
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(str(tmp_path / "pissa_init"))
    residual = model.unload()  # W_res (PEFT's recipe saves it with save_pretrained)
    return PeftModel.from_pretrained(residual, str(tmp_path / "pissa_init"), is_trainable=True)


def _lora_ga(tmp_path):
    from peft import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    model = tiny_llama()
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=list(TARGETS),
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(),
    )
    preprocess_loraga(model, cfg, lambda: model(**batch()).loss.backward())
    model.zero_grad(set_to_none=True)
    return get_peft_model(model, cfg)


INITS = {  # name -> (factory, rewrites the base)
    "plain": (lambda tmp: lora(tiny_llama(), init=True, targets=TARGETS), False),
    "gaussian": (lambda tmp: lora(tiny_llama(), init="gaussian", targets=TARGETS), False),
    "pissa": (lambda tmp: lora(tiny_llama(), init="pissa", targets=TARGETS), True),
    "pissa_niter": (lambda tmp: lora(tiny_llama(), init="pissa_niter_2", targets=TARGETS), True),
    "olora": (lambda tmp: lora(tiny_llama(), init="olora", targets=TARGETS), True),
    "lora_ga": (_lora_ga, True),
    "preinitialised pissa": (_preinitialised, True),
    "preinitialised pissa_niter": (lambda tmp: _preinitialised(tmp, "pissa_niter_2"), True),
}


@pytest.mark.parametrize("name", list(INITS))
def test_every_init_reference_is_the_pretrained_model_and_its_export_serves_on_it(tmp_path, name):
    """Whatever the PEFT init: at step 0 the model is the pre-trained one, the reference stays the pre-trained
    model after the adapter moved, and the exported adapter reproduces the trained model on the untouched base."""
    make, rewritten = INITS[name]
    inputs = batch(b=3, seed=9)
    base = _logits(tiny_llama(), inputs)  # the untouched pre-trained model
    model = make(tmp_path)
    torch.testing.assert_close(
        _logits(model, inputs), base, rtol=0, atol=2e-5
    )  # the init preserves the model
    obj = BALoRAObjective(_cfg()).prepare(model)
    assert obj.rewrites_base is rewritten and adapter_start(model).rewritten is rewritten
    assert obj.mode == ("adapter_snapshot" if rewritten else "disabled_adapter")
    perturb(model)
    trained = _logits(model, inputs)
    assert (trained - base).abs().max() > 1e-2
    with reference_mode(model, obj.mode):
        torch.testing.assert_close(model(**_fwd(inputs)).logits, base, rtol=0, atol=2e-5)

    saved = str(tmp_path / "adapter")  # what the trainers' save writes (trainer_mixin._save)
    model.save_pretrained(saved, selected_adapters=["default"])
    if REF_ADAPTER in model.peft_config:
        save_initial_adapter(model, os.path.join(saved, INITIAL_DIR), REF_ADAPTER)
    assert (REF_ADAPTER in model.peft_config) is rewritten
    plain = export_plain_lora(saved, str(tmp_path / "plain"))
    served = _logits(PeftModel.from_pretrained(tiny_llama(), plain), inputs)
    torch.testing.assert_close(served, trained, rtol=1e-4, atol=2e-5)


def test_a_trained_lora_adapter_is_refused_until_the_user_names_its_base(tmp_path):
    """A non-zero adapter whose config says plain init is either a pre-initialised pair on a residual base or a
    trained adapter on the untouched base: the model alone cannot tell (unless it is a PiSSA pair), so `auto`
    refuses, naming both fixes, and changes nothing."""
    trained = lora(tiny_llama(), init=True, targets=TARGETS)
    perturb(trained)
    trained.save_pretrained(str(tmp_path / "a"))
    model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"), is_trainable=True)
    with pytest.raises(ValueError, match=r"cannot tell which base.*'adapter_snapshot'.*'disabled_adapter'"):
        BALoRAObjective(_cfg()).prepare(model)
    assert list(model.peft_config) == ["default"]
    obj = BALoRAObjective(_cfg(reference="disabled_adapter")).prepare(model)
    assert not obj.rewrites_base
    inputs = batch()
    with reference_mode(model, obj.mode):
        torch.testing.assert_close(
            model(**_fwd(inputs)).logits, _logits(tiny_llama(), inputs), rtol=0, atol=1e-6
        )
    # decided once: a later preparation (after training moved the adapter) gives the same answer
    perturb(model, seed=3)
    assert BALoRAObjective(_cfg()).prepare(model).mode == "disabled_adapter"


def test_loftq_adapter_is_refused_by_the_export(tmp_path):
    """LoftQ's base is its quantised Q(W) and Q(W) + s·B0A0 only approximates W: no adapter serves the trained
    model on the untouched base, so the export explains instead of copying the adapter unchanged."""
    model = lora(tiny_llama(), init=True, targets=TARGETS)
    perturb(model)
    saved = str(tmp_path / "adapter")
    model.save_pretrained(saved)
    path = os.path.join(saved, ADAPTER_CONFIG)
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.update(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"init_lora_weights='loftq'.*LoftQ.*quantised"):
        export_plain_lora(saved, str(tmp_path / "plain"))
    assert not os.path.exists(tmp_path / "plain")


# ---------------------------------------------------------------------------------------------- resume
def _niter_model(seed: int):
    model = tiny_llama()
    torch.manual_seed(seed)  # PEFT's randomised SVD draws from the global RNG
    model = lora(model, init="pissa_niter_2", targets=TARGETS)
    add_snapshot_adapter(model)
    return model


def test_resume_with_a_randomised_pissa_init_restores_the_checkpoints_base():
    """A resumed process draws another randomised SVD, so its residual base differs from the checkpoint's; once
    the checkpoint's adapters are loaded, the base is put back: the model is the checkpoint's, the reference W."""
    inputs = batch()
    base = _logits(tiny_llama(), inputs)
    first, second = _niter_model(1), _niter_model(2)
    perturb(first)  # trained until the checkpoint
    before = adapter_state(second, REF_ADAPTER)  # the resumed process's own initial adapter
    ckpt = {
        n: p.detach().clone() for n, p in first.named_parameters() if ".default." in n or REF_ADAPTER in n
    }
    with torch.no_grad():  # what loading the checkpoint does: both adapters, not the base
        for n, p in second.named_parameters():
            if n in ckpt:
                p.copy_(ckpt[n])
    with reference_mode(second, "adapter_snapshot"):
        assert (second(**_fwd(inputs)).logits - base).abs().max() > 1e-2  # W_res' + s·B0A0 is not W
    fixed = restore_residual_base(second, before)
    assert len(fixed) == 2 * len(TARGETS)  # every LoRA layer of both decoder layers
    torch.testing.assert_close(_logits(second, inputs), _logits(first, inputs), rtol=0, atol=2e-5)
    with reference_mode(second, "adapter_snapshot"):
        torch.testing.assert_close(second(**_fwd(inputs)).logits, base, rtol=0, atol=2e-5)
    assert restore_residual_base(second, adapter_state(second, REF_ADAPTER)) == []  # consistent now


def test_resume_checks_on_behaviour_before_touching_the_base():
    """An exact PiSSA checkpoint fits this process's base whatever the in-memory snapshot holds: nothing moves."""
    model = lora(tiny_llama(), init="pissa", targets=TARGETS)
    add_snapshot_adapter(model)
    initial = adapter_state(model, REF_ADAPTER)
    perturb(model, adapter=REF_ADAPTER)  # the in-memory snapshot is not this process's init
    before = adapter_state(model, REF_ADAPTER)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{REF_ADAPTER}." in n:
                p.copy_(initial[n.replace(f".{REF_ADAPTER}.", ".")])
    assert restore_residual_base(model, before) == []
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if "base_layer" in n)


# ---------------------------------------------------------------------------------------------- refusals
def test_regression_head_is_refused():
    model = lora(
        tiny_bert_classifier(num_labels=1), init=True, targets=("query", "value"), task_type="SEQ_CLS"
    )
    with pytest.raises(ValueError, match=r"regression head.*num_labels=1.*no regression form"):
        BALoRAObjective(BALoRAConfig.from_preset("iclr2026-nlu")).prepare(model)


def test_the_students_own_base_as_ref_model_is_refused_before_anything_changes():
    model = lora(tiny_llama(), init="pissa", targets=TARGETS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for ref_model in (model.get_base_model(), model):
        with pytest.raises(ValueError, match=r"shares \d+ parameter\(s\) with the model being trained"):
            BALoRAObjective(_cfg(), ref_model=ref_model).prepare(model)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
        assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize(
    "peft_kw",
    [
        dict(target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True),
        dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True),
        dict(target_modules=["q_proj"], trainable_embedding=True),
    ],
    ids=["lora on the tied embedding", "tied embedding saved", "trainable tied embedding"],
)
def test_a_trained_tied_embedding_is_refused_naming_the_embedding(peft_kw):
    kw = dict(peft_kw)
    trainable_embedding = kw.pop("trainable_embedding", False)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, **kw))
    if trainable_embedding:
        model.get_base_model().model.embed_tokens.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"ties the head to the input embedding.*embedding is trained"):
        BALoRAObjective(_cfg()).prepare(model)


def test_trained_base_parameters_are_refused():
    """PEFT's bias='all' (or a layer unfrozen by hand) trains base parameters that no adapter switch undoes."""
    model = lora(tiny_llama(), init=True, targets=TARGETS)
    model.get_base_model().model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"belong to no adapter.*model\.norm\.weight"):
        BALoRAObjective(_cfg()).prepare(model)
    BALoRAObjective(_cfg(), ref_model=tiny_llama()).prepare(model)  # a separate reference model is unaffected


# ---------------------------------------------------------------------------------------------- VLM
def _tiny_llava():
    import transformers

    if not hasattr(transformers, "LlavaForConditionalGeneration"):
        pytest.skip("this transformers has no Llava")
    return tiny_llava()


@pytest.mark.parametrize(
    ("targets", "replayed"),
    [
        (["q_proj", "v_proj"], "model"),  # also the vision tower's q/v projections
        (r".*multi_modal_projector.*linear_1|.*language_model.*q_proj", "model"),
        (r".*language_model.*(q_proj|v_proj)", "model.language_model"),  # text only: the cheap replay
    ],
    ids=["vision tower", "projector", "language model only"],
)
def test_vlm_reference_is_the_pretrained_model_when_the_adapter_reaches_the_vision_side(targets, replayed):
    ids = torch.tensor([[1, 95, 95, 95, 95, 5, 6, 7, 8, 9]])  # four image tokens: one 8x8 image, 4x4 patches
    pixels = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :6] = -100
    with torch.no_grad():
        want = _tiny_llava().model(input_ids=ids, pixel_values=pixels).last_hidden_state
    model = get_peft_model(
        _tiny_llava(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="pissa")
    )
    obj = BALoRAObjective(_cfg()).prepare(model)
    assert obj.backbone_path == replayed
    perturb(model)
    model(input_ids=ids, pixel_values=pixels, labels=labels)
    # the reference forward replays exactly the `replayed` module: it runs, the module holding it does not
    base = model.get_base_model()
    replay = base.get_submodule(replayed)
    holder = base.get_submodule(replayed.rpartition(".")[0])
    ran = []
    hooks = [m.register_forward_pre_hook(lambda m, args: ran.append(m)) for m in (replay, holder)]
    try:
        torch.testing.assert_close(obj.reference_hidden(model), want, rtol=0, atol=1e-5)
    finally:
        for h in hooks:
            h.remove()
    assert ran == [replay]


def test_loftq_reference_is_refused_unless_the_approximation_is_accepted():
    """Q(W) + s·B0A0 only approximates W. (A stand-in: LoftQ itself needs CUDA; the decision reads the config.)"""
    model = lora(tiny_llama(), init="pissa", targets=TARGETS)
    model.peft_config["default"].init_lora_weights = "loftq"
    with pytest.raises(ValueError, match=r"'loftq'.*only approximates.*ref_model=.*'adapter_snapshot'"):
        BALoRAObjective(_cfg()).prepare(model)
    assert BALoRAObjective(_cfg(reference="adapter_snapshot")).prepare(model).mode == "adapter_snapshot"
    assert BALoRAObjective(_cfg(), ref_model=tiny_llama()).prepare(model).mode == "model"
