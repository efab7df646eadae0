"""Setups that trained silently wrong in a second review are now right, warned about, or refused before step 1.

Each case is checked against an independent computation on tiny models: the gradient of the terms recomputed
from full logits and a copy of the pre-trained model, the classifier's reference recomputed by hand, the step-0
consistency of a PiSSA adapter measured directly.
"""

from __future__ import annotations

import copy
import random
import warnings

import pytest
import torch
from conftest import CONSTANT, VOCAB, batch, lora, perturb, sft_args, tiny_bert_classifier, tiny_llama

from balora_plugins import BALoRAConfig
from balora_plugins import functional as Fn
from balora_plugins.core import BALoRAObjective
from balora_plugins.core.model import classifier_head, new_head_warning

TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")
BERT_TARGETS = ("query", "key", "value", "dense")
NLG_ON = dict(lambda_consistency=0.5, lambda_diversity=0.1, lambda_svd=0.1, **CONSTANT)


def _fwd(inputs):
    return {k: v for k, v in inputs.items() if k != "labels"}


def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------- 1. TRL host losses
def _sft(tmp_path, host: str, balora: dict, model=None, **kw):
    pytest.importorskip("trl")
    from conftest import tiny_tokenizer
    from datasets import Dataset

    from balora_plugins.trl import BALoRASFTTrainer

    words = [chr(ord("a") + i) for i in range(26)]
    r = random.Random(0)
    data = Dataset.from_list([{"text": " ".join(r.choices(words, k=r.randint(4, 8)))} for _ in range(12)])
    extra = {}
    kw["loss_type"] = "nll"  # TRL 1.9's default chunked_nll takes neither (a TRL limit, the host alone too)
    if host == "label_smoothing":
        kw["label_smoothing_factor"] = 0.1
    elif host == "compute_loss_func":

        def ce(outputs, labels, num_items_in_batch=None):
            logits, labels = outputs["logits"][:, :-1], labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum"
            )
            return loss / num_items_in_batch

        extra["compute_loss_func"] = ce
    model = model if model is not None else lora(tiny_llama(), init="pissa", targets=TARGETS)
    return BALoRASFTTrainer(
        model,
        args=sft_args(tmp_path, **kw),
        train_dataset=data,
        processing_class=tiny_tokenizer(),
        balora_config=BALoRAConfig(**balora),
        **extra,
    )


@pytest.mark.parametrize("host", ["label_smoothing", "compute_loss_func"])
def test_trl_terms_carry_the_gradient_of_the_forward_that_trains(tmp_path, host):
    """TRL 1.16 computes a label-smoothed (or compute_loss_func) loss on one forward and then runs a second one
    under no_grad for its metrics: the terms must act on the first. Their gradient equals the one recomputed from
    that forward's full logits and a copy of the pre-trained model."""
    pretrained = tiny_llama()
    model = lora(copy.deepcopy(pretrained), init="pissa", targets=TARGETS)
    tr = _sft(tmp_path, host, NLG_ON, model=model)
    from trl import SFTTrainer

    perturb(model, scale=0.05)  # away from the reference, so the consistency term has a gradient
    model.train()
    inputs = batch(b=2, t=12, seed=4)
    n = int((inputs["labels"][:, 1:] != -100).sum())
    items = torch.tensor(n)
    params = [p for _, p in _trainable(model)]

    loss = tr.compute_loss(model, dict(inputs), num_items_in_batch=items)
    host_loss = SFTTrainer.compute_loss(tr, model, dict(inputs), num_items_in_batch=items)  # TRL alone
    got = torch.autograd.grad(loss - host_loss, params, allow_unused=True)

    logits = model(**_fwd(inputs)).logits  # the grad-carrying forward, recomputed here
    with torch.no_grad():
        ref_logits = pretrained.eval()(**_fwd(inputs)).logits
    mask = Fn.valid_position_mask(inputs["labels"])
    z, zr = logits[mask].float(), ref_logits[mask].float()
    cfg = BALoRAConfig(**NLG_ON)
    want_reg = (
        cfg.lambda_consistency * Fn.kl_rows(z, zr, cfg.temperature).sum() / n
        - cfg.lambda_diversity * Fn.entropy_rows(z, cfg.diversity_top_k).sum() / n
        + cfg.lambda_svd * Fn.svd_loss(z, k=cfg.svd_top_k, norm="frobenius", eps=cfg.eps)
    )
    want = torch.autograd.grad(want_reg, params, allow_unused=True)
    assert any(g is not None and float(g.abs().max()) > 1e-4 for g in want)
    for g, w in zip(got, want, strict=True):
        assert g is not None, "a term lost its gradient"
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_trl_label_smoothing_runs_that_differ_only_in_lambda_end_with_different_adapters(tmp_path):
    ends = []
    for i, lam in enumerate((0.5, 5.0)):
        tr = _sft(tmp_path / str(i), "label_smoothing", {**NLG_ON, "lambda_consistency": lam}, max_steps=2)
        perturb(tr.model, scale=0.05)
        tr.train()
        ends.append({n: p.detach().clone() for n, p in _trainable(tr.model)})
    assert max(float((ends[0][k] - ends[1][k]).abs().max()) for k in ends[0]) > 1e-5


def test_terms_without_gradient_while_training_are_refused():
    """Whatever the cause (here: every parameter frozen after preparation), a term with λ > 0 and no gradient on a
    training micro-batch raises instead of being logged and never trained."""
    model = lora(tiny_llama(), init="pissa", targets=TARGETS)
    obj = BALoRAObjective(BALoRAConfig(**NLG_ON)).prepare(model)
    perturb(model)
    model.train()
    inputs = batch()
    model(**inputs)
    loss, _ = obj.compute(model, inputs)
    assert loss.requires_grad
    model.requires_grad_(False)
    model(**inputs)
    with pytest.raises(
        RuntimeError, match=r"\['consistency', 'diversity', 'svd'\] have λ > 0 but no gradient"
    ):
        obj.compute(model, inputs)
    model.eval()  # evaluation: no gradient expected
    model(**inputs)
    assert not obj.compute(model, inputs)[0].requires_grad


# ---------------------------------------------------------------------------------------------- 8. new heads
def _classifier(seed=0, init=True, **peft_kw):
    base = tiny_bert_classifier(seed, num_labels=4)
    for m in base.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return lora(base, init=init, targets=BERT_TARGETS, task_type="SEQ_CLS", **peft_kw)


def _nlu_batch(n=6, t=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, t), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 4, (n,), generator=g),
    }


def test_a_new_classifier_head_is_warned_about_once_with_what_the_term_then_does():
    model = _classifier()
    with pytest.warns(
        UserWarning, match=r"classifier head is new.*random head.*reference_head='current'"
    ) as rec:
        obj = BALoRAObjective(BALoRAConfig.from_preset("iclr2026-nlu", svd_top_k=2)).prepare(model)
    assert sum("classifier head is new" in str(w.message) for w in rec) == 1
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        obj.prepare(model)  # the trainers prepare again at train begin: no second warning
        BALoRAObjective(BALoRAConfig.from_preset("iclr2026-nlu-current-head", svd_top_k=2)).prepare(
            _classifier()
        )
    assert not [w for w in again if "classifier head is new" in str(w.message)]
    # a head the checkpoint held (its config names this architecture) is not new
    saved = _classifier()
    saved.get_base_model().config.architectures = ["BertForSequenceClassification"]
    assert new_head_warning(saved, BALoRAConfig(task="nlu")) is None


@pytest.mark.parametrize("init", [True, "pissa"])
def test_current_head_reference_is_the_pretrained_features_through_the_trained_head(init):
    """reference_head='current': the reference logits are the pre-trained backbone's features read through the
    head as trained now, without gradient; 'initial' (the paper) reads them through the step-0 head."""
    pretrained = tiny_bert_classifier(0, num_labels=4)
    for m in pretrained.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    pretrained.eval()
    inputs = _nlu_batch()
    model = _classifier(init=init)
    (head,) = classifier_head(model)
    assert head is model.get_base_model().classifier
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        current = BALoRAObjective(BALoRAConfig.from_preset("iclr2026-nlu-current-head", svd_top_k=2)).prepare(
            model
        )
        initial = BALoRAObjective(BALoRAConfig.from_preset("iclr2026-nlu", svd_top_k=2)).prepare(model)
    perturb(model, scale=0.1)  # "training": moves the LoRA factors and the head's trainable copy
    trained_head = model.get_base_model().classifier.modules_to_save["default"]
    with torch.no_grad():
        pooled = pretrained.bert(**_fwd(inputs)).pooler_output  # the pre-trained features
        want_current = trained_head(pooled)
        want_initial = pretrained.classifier(pooled)
    assert float((want_current - want_initial).abs().max()) > 1e-2  # the two definitions differ
    model.train()
    logits = model(**_fwd(inputs)).logits
    got_current = current.reference_logits(model, inputs)
    got_initial = initial.reference_logits(model, inputs)
    torch.testing.assert_close(got_current, want_current, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_initial, want_initial, rtol=0, atol=1e-5)
    assert not got_current.requires_grad  # no gradient through the reference path
    assert model.training and model.get_base_model().classifier.active_adapters == ["default"]  # restored

    # the loss: the consistency gradient reaches the head through the student path only
    loss, _ = current.compute(model, inputs, logits=logits)
    grads = torch.autograd.grad(loss, [p for _, p in _trainable(model)], retain_graph=True)
    zr = want_current
    want = (
        0.15 * Fn.kl_rows(logits, zr, 2.0).mean()
        + 0.03 * Fn.diversity_loss(logits, kind="decorrelation")
        + 0.03 * Fn.svd_loss(logits, k=2, norm="nuclear")
    )
    for g, w in zip(grads, torch.autograd.grad(want, [p for _, p in _trainable(model)]), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


def test_current_head_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match=r"reference_head='current' applies to task='nlu' only"):
        BALoRAConfig(reference_head="current")
    with pytest.raises(ValueError, match=r"reference_cache=True with reference_head='current'"):
        BALoRAConfig(task="nlu", reference_head="current", reference_cache=True)
    with pytest.raises(ValueError, match=r"reference_head='current'.*separate ref_model"):
        BALoRAObjective(
            BALoRAConfig(task="nlu", reference_head="current", svd_top_k=2), ref_model=tiny_bert_classifier()
        ).prepare(_classifier())


# ---------------------------------------------------------------------------------------------- 2. pre-initialised PiSSA
def _preinitialised(tmp_path, init="pissa", dtype=torch.float32, alpha=8):
    """PiSSA (or OLoRA) run once, saved with init_lora_weights=True beside its residual base, loaded later."""
    from peft import PeftModel

    model = lora(tiny_llama().to(dtype), init=init, r=4, alpha=alpha, targets=TARGETS)
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(str(tmp_path / "pair"))
    return PeftModel.from_pretrained(model.unload(), str(tmp_path / "pair"), is_trainable=True)


def _pairs(model):
    return [
        (m.lora_A["default"].weight, m.lora_B["default"].weight, m)
        for m in model.modules()
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})
    ]


GENUINE = {  # name -> (init, base dtype, alpha); measured max fresh_pair_excess on the tiny llama (r = 4)
    "pissa fp32": ("pissa", torch.float32, 8),  # 0.008
    "pissa_niter_2": ("pissa_niter_2", torch.float32, 8),  # 0.006
    "pissa bf16 base, fp32 factors": ("pissa", torch.bfloat16, 8),  # 0.26 (the factors hold bf16 values)
    "pissa_niter_2 bf16": ("pissa_niter_2", torch.bfloat16, 8),  # 0.29
    "olora s=1": ("olora", torch.float32, 4),  # 0.002
    "olora s=1 bf16": ("olora", torch.bfloat16, 4),  # 0.21
}


@pytest.mark.parametrize("name", list(GENUINE))
def test_every_genuine_preinitialised_pair_is_accepted_with_margin(tmp_path, name):
    from balora_plugins.core.reference import adapter_start, fresh_pair_excess, pissa_signature

    init, dtype, alpha = GENUINE[name]
    model = _preinitialised(tmp_path, init, dtype, alpha)
    assert max(pissa_signature(a, b, m) for a, b, m in _pairs(model)) <= 0.005
    assert max(fresh_pair_excess(a, b) for a, b, _ in _pairs(model)) <= 0.4  # ≥ 2.5× below the limit 1
    assert adapter_start(model).rewritten is True


def test_a_lightly_trained_pissa_adapter_is_not_taken_for_a_fresh_pair(tmp_path):
    """5 Adam steps at lr 1e-4 on a pre-initialised pair: its B stays orthogonal to W_res (signature 0.005, 10×
    under the old threshold 0.05, which took it for a fresh pair and its trained adapter for the pre-trained
    model), but A·Aᵀ = Bᵀ·B diagonal no longer holds (measured excess 50-60, ≥ 100× the genuine fp32 pairs'),
    so `auto` refuses it, naming what it is."""
    from balora_plugins.core.reference import adapter_start, fresh_pair_excess, pissa_signature

    model = _preinitialised(tmp_path)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    for i in range(5):
        model(**batch(b=4, seed=i)).loss.backward()
        opt.step()
        opt.zero_grad()
    assert max(pissa_signature(a, b, m) for a, b, m in _pairs(model)) < 0.01
    assert max(fresh_pair_excess(a, b) for a, b, _ in _pairs(model)) > 10
    start = adapter_start(model)
    assert start.rewritten is None and "already trained" in start.reason
    with pytest.raises(ValueError, match=r"cannot tell which base.*no longer a fresh pair.*already trained"):
        BALoRAObjective(BALoRAConfig(**NLG_ON)).prepare(model)
    assert list(model.peft_config) == ["default"]  # nothing added


# ---------------------------------------------------------------------------------------------- 3. the head guard
RECURRENT_GEMMA = dict(  # its logits_soft_cap keeps the default 30: transformers' RecurrentGemma applies it
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    lru_width=32,
    attention_window_size=16,
    block_types=["recurrent", "attention"],
    num_hidden_layers=2,
    head_dim=8,
    pad_token_id=0,
)


def _recurrent_gemma(dtype=torch.float32, base_on_meta=False):
    """A tiny RecurrentGemma with a LoRA adapter; ``base_on_meta``: its pre-trained weights on the meta device, the
    adapter materialised (what a rank holds under a deferred load, e.g. FSDP's cpu_ram_efficient_loading)."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "RecurrentGemmaForCausalLM"):
        pytest.skip("this transformers has no RecurrentGemma")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = transformers.RecurrentGemmaConfig(**RECURRENT_GEMMA)
    assert config.logits_soft_cap == 30.0
    model = transformers.RecurrentGemmaForCausalLM(config).to(dtype).eval()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    if base_on_meta:
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if ".default" not in name and not p.requires_grad:
                    module._parameters[name] = torch.nn.Parameter(p.to("meta"), requires_grad=False)
    return model


def test_recurrent_gemma_soft_cap_is_refused_in_bf16_where_its_probe_logits_stay_small():
    """A bf16 probe whose logits stay far below the cap (|z| < 1 with cap 30: tanh changes them by < 1e-3,
    under bf16's tolerance) used to pass; the scaled second probe drives them to ~1000, where the cap shows."""
    model = _recurrent_gemma(torch.bfloat16)
    with pytest.raises(
        ValueError, match=r"RecurrentGemmaForCausalLM is not supported by BA-LoRA's fused path"
    ):
        BALoRAObjective(BALoRAConfig(**NLG_ON)).prepare(model)
    assert list(model.peft_config) == ["default"]


def test_recurrent_gemma_is_refused_by_its_config_when_the_weights_are_not_materialised():
    """On the meta device (as under a partitioned / deferred load) no probe can run: the config key decides."""
    model = _recurrent_gemma(base_on_meta=True)
    assert model.get_base_model().lm_head.weight.is_meta
    with pytest.raises(
        ValueError, match=r"cannot be checked.*logits_soft_cap=30\.0.*model_type 'recurrent_gemma'"
    ):
        BALoRAObjective(BALoRAConfig(**NLG_ON, reference="disabled_adapter")).prepare(model)


def test_logit_transform_keys_name_what_the_fused_head_does_not_copy():
    from transformers import Gemma2Config, LlamaConfig

    from balora_plugins.core.model import logit_transform_keys

    assert logit_transform_keys(LlamaConfig()) == {}
    assert (
        logit_transform_keys(Gemma2Config(final_logit_softcapping=30.0)) == {}
    )  # copied; attention cap not on head
    llama = LlamaConfig()
    llama.lm_head_multiplier, llama.embedding_multiplier, llama.final_logit_softcapping = 4.0, 12.0, 50.0
    assert logit_transform_keys(llama) == {"lm_head_multiplier": 4.0, "final_logit_softcapping": 50.0}
    llama.lm_head_multiplier, llama.final_logit_softcapping = 1.0, None
    assert logit_transform_keys(llama) == {}


# ---------------------------------------------------------------------------------------------- 4. PiSSA with dropout
def test_pissa_with_lora_dropout_is_warned_about_and_its_step_0_consistency_is_not_zero():
    from peft import LoraConfig, get_peft_model

    inputs = batch(b=2, t=12)
    with torch.no_grad():
        want = tiny_llama().eval()(**_fwd(inputs)).logits
    for dropout in (0.0, 0.1):
        model = get_peft_model(
            tiny_llama(),
            LoraConfig(
                r=4,
                lora_alpha=8,
                lora_dropout=dropout,
                target_modules=list(TARGETS),
                init_lora_weights="pissa",
            ),
        )
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            BALoRAObjective(BALoRAConfig(**NLG_ON)).prepare(model)
        said = [w for w in rec if "lora_dropout" in str(w.message)]
        model.train()
        torch.manual_seed(0)
        with torch.no_grad():
            got = model(**_fwd(inputs)).logits
        kl = float(Fn.kl_rows(got.flatten(0, 1), want.flatten(0, 1), 2.0).mean())
        if dropout:
            assert len(said) == 1 and "lora_dropout=0.1" in str(said[0].message)
            assert (
                kl > 1e-5
            )  # measured 2e-4 per token at 0.1; why: the step-0 model in training mode is not the pre-trained one
        else:
            assert not said and kl < 1e-6  # fp32 rounding of the residual base


# ---------------------------------------------------------------------------------------------- 5. multi-label
def test_multi_label_classifiers_are_refused_with_the_reason():
    model = lora(
        tiny_bert_classifier(num_labels=4),
        init=True,
        targets=BERT_TARGETS,
        task_type="SEQ_CLS",
    )
    model.get_base_model().config.problem_type = "multi_label_classification"
    with pytest.raises(ValueError, match=r"multi-label classifier.*one softmax over.*no sigmoid form"):
        BALoRAObjective(BALoRAConfig(task="nlu", svd_top_k=2)).prepare(model)
    # problem_type unset: transformers infers multi-label from float multi-hot labels at the first forward
    model.get_base_model().config.problem_type = None
    obj = BALoRAObjective(BALoRAConfig(task="nlu", svd_top_k=2)).prepare(model)
    inputs = {**_nlu_batch(), "labels": torch.tensor([[1.0, 0, 1, 0]] * 6)}
    logits = model(**_fwd(inputs)).logits
    with pytest.raises(ValueError, match=r"multi-label classifier"):
        obj.compute(model, inputs, logits=logits)


# ---------------------------------------------------------------------------------------------- 6. reference cache
@pytest.mark.parametrize("change", ["data", "assign"])
def test_reference_cache_follows_a_replaced_reference_weight(change):
    """A reference weight replaced by `.data =` or `load_state_dict(assign=True)` (no in-place write, so no
    version bump) must not leave stale cached rows: the consistency term equals the uncached one."""
    model = _classifier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cached = BALoRAObjective(BALoRAConfig(task="nlu", svd_top_k=2, reference_cache=True)).prepare(model)
        plain = BALoRAObjective(BALoRAConfig(task="nlu", svd_top_k=2)).prepare(model)
    perturb(model, scale=0.1)
    inputs = _nlu_batch()
    model.train()
    logits = model(**_fwd(inputs)).logits
    cached.compute(model, inputs, logits=logits)  # fills the cache
    layer = model.get_base_model().bert.encoder.layer[0].attention.self.query.base_layer
    new = layer.weight.detach() + 0.5 * torch.randn_like(layer.weight)
    if change == "data":
        layer.weight.data = new
    else:
        layer.load_state_dict({"weight": new, "bias": layer.bias.detach().clone()}, assign=True)
        layer.weight.requires_grad_(False)
        layer.bias.requires_grad_(False)
    logits = model(**_fwd(inputs)).logits
    got = cached.compute(model, inputs, logits=logits)[1]["balora/consistency"]
    want = plain.compute(model, inputs, logits=logits)[1]["balora/consistency"]
    assert got == pytest.approx(want, rel=1e-6)
    assert cached.reference_cache.misses == 12  # both batches ran the reference forward


# ---------------------------------------------------------------------------------------------- 7. warnings, logs
def test_frobenius_svd_warning_says_the_term_runs_and_a_skipped_term_logs_lambda_zero():
    with pytest.warns(UserWarning, match=r"svd_norm='frobenius' the term still runs.*flattens the spectrum"):
        assert BALoRAConfig(task="nlu", svd_norm="frobenius").check_num_classes(4) is True
    with pytest.warns(UserWarning, match=r"identically 1.*skipped"):
        assert BALoRAConfig(task="nlu").check_num_classes(4) is False
    model = _classifier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj = BALoRAObjective(BALoRAConfig(task="nlu")).prepare(model)  # k = 5 >= 4 classes: SVD skipped
    inputs = _nlu_batch()
    model.train()
    _, metrics = obj.compute(model, inputs, logits=model(**_fwd(inputs)).logits)
    assert "balora/svd" not in metrics and metrics["balora/lambda_svd"] == 0.0
    assert metrics["balora/lambda_diversity"] == 0.03 and "balora/diversity" in metrics


# ---------------------------------------------------------------------------------------------- 8. the demo's method
def test_demo_method_balora_current_head_sets_the_option_and_is_compared():
    from balora_plugins.tools.demo import METHODS, DemoUsageError, resolve_settings
    from balora_plugins.tools.demo.common import method_config
    from balora_plugins.tools.demo.tables import comparison_pairs

    s = resolve_settings("nlu", device="cpu", methods="pissa,balora,balora-current-head")
    assert s.methods == ["pissa", "balora", "balora-current-head"]
    cfg = BALoRAConfig.from_preset("iclr2026-nlu", svd_top_k=4)
    mcfg = method_config(cfg, METHODS["balora-current-head"])
    assert mcfg.reference_head == "current" and mcfg.svd_top_k == 4 and cfg.reference_head == "initial"
    assert method_config(cfg, METHODS["balora"]) is cfg
    pairs = comparison_pairs(s.methods)
    assert ("balora-current-head", "balora") in pairs and ("balora-current-head", "pissa") in pairs
    with pytest.raises(DemoUsageError, match=r"balora-current-head: allowed are .* \(for --task nlg"):
        resolve_settings("nlg", device="cpu", methods="balora-current-head")
