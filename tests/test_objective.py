"""`BALoRAObjective` against the functional API on full logits; host-like scaling; faults; model validation."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from conftest import CONSTANT, batch, lora, tiny_bert_classifier, tiny_llama
from torch import nn

from balora_plugins import BALoRAConfig
from balora_plugins import functional as Fn
from balora_plugins.core.model import validate_model
from balora_plugins.core.objective import BALoRAObjective, LossScaling
from balora_plugins.trainer_mixin import host_loss_scaling

SEL = Fn.select_positions


def _fwd(inputs):
    return {k: v for k, v in inputs.items() if k != "labels"}


def _perturb(model, seed=1, scale=0.05, match=".default."):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if match in n:
                p.add_(scale * torch.randn(p.shape, generator=g))


def _grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _assert_grads_close(a, b, rtol=1e-5):
    assert a.keys() == b.keys() and a
    for n in a:
        scale = float(b[n].abs().max())
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=rtol * scale + 1e-12, msg=n)


def _functional_nlg(cfg, logits, ref_logits, labels):
    """The regularizer on full materialised logits with the public functional API (docs/method.md §3)."""
    z, zr = SEL(logits, labels), SEL(ref_logits, labels)
    lam = cfg.lambdas
    return (
        lam["consistency"] * Fn.consistency_loss(z, zr, kind="kl", temperature=cfg.consistency_temperature)
        + lam["diversity"] * Fn.diversity_loss(z, kind="entropy", top_k=cfg.entropy_top_k)
        + lam["svd"] * Fn.svd_loss(z, k=cfg.svd_top_k, norm=cfg.resolved_svd_norm, eps=cfg.eps)
    )


def _cfg(**kw) -> BALoRAConfig:
    """A config with constant schedules: every term at its full weight at any progress."""
    return BALoRAConfig(**{**CONSTANT, **kw})


def _nlg_setup(cfg, init="pissa", seed=1):
    model = lora(tiny_llama(), init=init)
    obj = BALoRAObjective(cfg).prepare(model)
    _perturb(model, seed=seed)  # as after some optimizer steps: the consistency term is not zero
    return model, obj


CFGS = {
    "iclr2026": _cfg(
        lambda_consistency=0.3,
        lambda_diversity=0.2,
        lambda_svd=0.1,
        svd_top_k=3,
        diversity_top_k=5,
        chunk_size=5,
    ),
    "v5": BALoRAConfig.from_preset(
        "v5-nlg", lambda_consistency=0.3, lambda_diversity=0.2, lambda_svd=0.1, chunk_size=7
    ),
}


# ---------------------------------------------------------------------------------------------- NLG equivalence
@pytest.mark.parametrize("name", list(CFGS))
def test_nlg_objective_equals_functional_on_full_logits(name):
    cfg = CFGS[name]
    model, obj = _nlg_setup(cfg)
    inputs = batch(b=3, t=10)
    with torch.no_grad():
        ref_logits = tiny_llama()(**_fwd(inputs)).logits  # the untouched pre-trained model
    out = model(**inputs)
    loss, metrics = obj.compute(model, inputs)
    loss.backward()
    fused_grads = _grads(model)
    expected = _functional_nlg(cfg, model(**inputs).logits, ref_logits, inputs["labels"])
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-7)
    _assert_grads_close(fused_grads, _grads(model))

    z, zr = SEL(out.logits.detach(), inputs["labels"]), SEL(ref_logits, inputs["labels"])
    raw = {
        "consistency": Fn.consistency_loss(z, zr, temperature=cfg.consistency_temperature),
        "diversity": Fn.diversity_loss(z, top_k=cfg.entropy_top_k),
        "svd": Fn.svd_loss(z, k=cfg.svd_top_k, norm=cfg.resolved_svd_norm),
    }
    assert metrics["balora/rows"] == z.shape[0] == int(Fn.valid_position_mask(inputs["labels"]).sum())
    for k, v in raw.items():
        assert metrics[f"balora/{k}"] == pytest.approx(
            float(v), rel=1e-5, abs=1e-7
        )  # fp32 KL of close distributions
        assert metrics[f"balora/{k}_weighted"] == pytest.approx(cfg.lambdas[k] * metrics[f"balora/{k}"])
        assert metrics[f"balora/lambda_{k}"] == cfg.lambdas[k]
    assert metrics["balora/loss"] == pytest.approx(float(loss.detach()), rel=1e-5)


def test_schedules_evaluated_at_progress():
    cfg = BALoRAConfig.from_preset("iclr2026-nlg", svd_top_k=3, diversity_top_k=5)
    model, obj = _nlg_setup(cfg)
    inputs = batch()
    with torch.no_grad():
        ref_logits = tiny_llama()(**_fwd(inputs)).logits
    for p in (0.1, 0.5):
        with torch.no_grad():
            logits = model(**inputs).logits
            loss, metrics = obj.compute(model, inputs, progress=p)
        lam = cfg.lambdas_at(p)
        z, zr = SEL(logits, inputs["labels"]), SEL(ref_logits, inputs["labels"])
        expected = (
            lam["consistency"] * Fn.consistency_loss(z, zr, temperature=2.0)
            + lam["diversity"] * Fn.diversity_loss(z, top_k=5)
            + lam["svd"] * Fn.svd_loss(z, k=3, norm="frobenius")
        )
        assert metrics["balora/lambda_consistency"] == pytest.approx(lam["consistency"])
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-8)
        assert ("balora/svd" in metrics) == (p > 0.25)  # λ3 = 0 during warm-up: the term is not computed


def test_before_any_update_consistency_is_zero():
    model = lora(tiny_llama(), init="pissa")
    obj = BALoRAObjective(_cfg(lambda_diversity=0.0, lambda_svd=0.0, lambda_consistency=1.0)).prepare(model)
    inputs = batch()
    model(**inputs)
    loss, metrics = obj.compute(model, inputs)
    # the reference forward forms W_res + s·B₀A₀ in one matmul (core.reference.merged_snapshot_forward): equal to
    # the student's LoRA path up to fp32 rounding, where a KL of near-equal distributions is ~1e-7, not exactly 0
    assert abs(float(loss.detach())) < 1e-6 and abs(metrics["balora/consistency"]) < 1e-6


def test_packed_rows_shift_labels_and_unshifted_mask():
    """Padding-free packing (position_ids restart per document), a collator's `shift_labels`, and the authors'
    unshifted mask all select exactly the rows the functional API selects."""
    cfg = _cfg(lambda_consistency=0.3, lambda_diversity=0.2, lambda_svd=0.1, svd_top_k=3, diversity_top_k=5)
    model, obj = _nlg_setup(cfg)
    ids = batch(b=1, t=14, seed=6)["input_ids"]
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 4]])
    labels = ids.clone()
    labels[0, [0, 5, 9]] = -100  # each document's first token is not a target
    packed = {"input_ids": ids, "position_ids": pos, "labels": labels}
    with torch.no_grad():
        ref_logits = tiny_llama()(input_ids=ids, position_ids=pos).logits
        logits = model(**packed).logits
        loss, metrics = obj.compute(model, packed)
    mask = Fn.valid_position_mask(labels, position_ids=pos)
    assert (
        metrics["balora/rows"] == int(mask.sum()) == 11
    )  # 13 next-token positions, 2 cross a document start
    z, zr = logits[mask], ref_logits[mask]
    lam = cfg.lambdas
    expected = (
        lam["consistency"] * Fn.consistency_loss(z, zr, temperature=2.0)
        + lam["diversity"] * Fn.diversity_loss(z, top_k=5)
        + lam["svd"] * Fn.svd_loss(z, k=3, norm="frobenius")
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)

    inputs = batch()
    shifted = torch.nn.functional.pad(inputs["labels"][:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        model(**inputs)
        by_labels, m1 = obj.compute(model, inputs)
        model(**inputs)
        by_shift, m2 = obj.compute(model, {**inputs, "shift_labels": shifted})
    assert m1["balora/rows"] == m2["balora/rows"] and float(by_labels) == pytest.approx(
        float(by_shift), rel=1e-6
    )

    unshifted = BALoRAObjective(_cfg(shift_labels=False)).prepare(model)
    obj.remove_hooks()
    with torch.no_grad():
        model(**inputs)
        _, m3 = unshifted.compute(model, inputs)
    assert m3["balora/rows"] == int((inputs["labels"] != -100).sum())


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("use_cache", [None, False])
def test_packed_reference_uses_the_students_attention_mask(checkpointing, use_cache):
    """Before any update the reference equals the student on a packed row too. transformers 5 masks packed
    documents apart only without a KV cache, and gradient checkpointing switches the cache off in training only:
    the reference forward (eval mode) must still build the student's mask."""
    model = lora(tiny_llama(), init="pissa")
    obj = BALoRAObjective(_cfg(lambda_diversity=0.0, lambda_svd=0.0, lambda_consistency=1.0)).prepare(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    ids = batch(b=1, t=14, seed=6)["input_ids"]
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 4]])
    packed = {"input_ids": ids, "position_ids": pos, "labels": ids.clone()}
    if use_cache is not None:
        packed["use_cache"] = use_cache
    model(**packed)
    loss, metrics = obj.compute(model, {k: v for k, v in packed.items() if k != "use_cache"})
    # fp32 rounding of the merged-weight reference forward leaves KL ~1e-8 (thread-count dependent); a reference
    # that lets packed documents attend to each other gives KL orders of magnitude above 1e-6
    assert metrics["balora/consistency"] < 1e-6


def test_gradient_checkpointing_and_dropout_do_not_change_the_terms():
    """Training mode with gradient checkpointing gives the eval-mode loss and gradients (dropout 0 here)."""
    cfg = _cfg(lambda_consistency=0.3, lambda_diversity=0.2, lambda_svd=0.1, svd_top_k=3)
    inputs = batch()
    results = []
    for checkpointing in (False, True):
        model, obj = _nlg_setup(cfg)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
        flags = [m.training for m in model.modules()]
        model(**inputs)
        loss, _ = obj.compute(model, inputs)
        loss.backward()
        results.append((float(loss.detach()), _grads(model)))
        assert [m.training for m in model.modules()] == flags  # reference_mode put every flag back
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    _assert_grads_close(results[1][1], results[0][1])


# ---------------------------------------------------------------------------------------------- accumulation
def _accumulate(model, obj, inputs, splits, scaling_for):
    total = 0.0
    for idx in torch.arange(inputs["input_ids"].shape[0]).chunk(splits):
        mb = {k: v[idx] for k, v in inputs.items()}
        model(**mb)
        loss, _ = obj.compute(model, mb, scaling=scaling_for(splits))
        loss.backward()
        total += float(loss)
    return total, _grads(model)


def test_gradient_accumulation_invariance_token_terms():
    """4×1, 2×2, 1×4 micro-batches give one big batch's loss and gradients for the token-level terms."""
    cfg = _cfg(lambda_consistency=0.5, lambda_diversity=0.3, lambda_svd=0.0, diversity_top_k=5, chunk_size=6)
    model, obj = _nlg_setup(cfg)
    inputs = batch(b=4, t=10, seed=3)
    inputs["labels"][1, 3:7] = -100  # uneven valid counts across micro-batches
    n = int(Fn.valid_position_mask(inputs["labels"]).sum())

    def scaling(ga):
        return LossScaling(num_items_in_batch=n, ga_steps=ga, host_divides_by_ga=False)

    results = {s: _accumulate(model, obj, inputs, s, scaling) for s in (1, 2, 4)}
    with torch.no_grad():
        ref_logits = tiny_llama()(**_fwd(inputs)).logits
    big = _functional_nlg(cfg, model(**inputs).logits, ref_logits, inputs["labels"])
    for s in (1, 2, 4):
        assert results[s][0] == pytest.approx(float(big), rel=1e-5)
        _assert_grads_close(results[s][1], results[1][1])
    # a per-micro-batch mean instead (no num_items) would differ: the test can tell the two apart
    naive, _ = _accumulate(
        model, obj, inputs, 4, lambda ga: LossScaling(ga_steps=ga, host_divides_by_ga=False)
    )
    assert abs(naive - results[1][0]) > 1e-4 * abs(results[1][0])


@pytest.mark.parametrize("host_divides", [False, True])
def test_svd_term_is_mean_over_micro_batches(host_divides):
    """SVD is a per-micro-batch statistic: an optimizer step sees its mean over the micro-batches."""
    cfg = _cfg(lambda_consistency=0.0, lambda_diversity=0.0, lambda_svd=0.4, svd_top_k=2)
    model, obj = _nlg_setup(cfg)
    inputs = batch(b=4, t=10, seed=4)
    ga = 2
    total, values = 0.0, []
    for idx in torch.arange(4).chunk(ga):
        mb = {k: v[idx] for k, v in inputs.items()}
        logits = model(**mb).logits
        loss, _ = obj.compute(model, mb, scaling=LossScaling(ga_steps=ga, host_divides_by_ga=host_divides))
        total += float(loss) / (ga if host_divides else 1)  # what the host's backward sees
        values.append(float(Fn.svd_loss(SEL(logits.detach(), mb["labels"]), k=2, norm="frobenius")))
    assert total == pytest.approx(0.4 * sum(values) / ga, rel=1e-5)
    full = float(Fn.svd_loss(SEL(model(**inputs).logits.detach(), inputs["labels"]), k=2, norm="frobenius"))
    # a mean of micro-batch statistics, not the big-batch statistic
    assert abs(full - sum(values) / ga) > 1e-4


def test_loss_scaling_rules_and_from_trainer():
    s = LossScaling(num_items_in_batch=40, world_factor=2.0, ga_steps=4, host_divides_by_ga=False)
    assert s.row_weight(0.5, local_rows=7, by_items=True) == pytest.approx(0.5 * 2 / 40)
    # without an item count a row term is a micro-batch mean, averaged over the GA steps like a matrix term
    assert s.row_weight(0.5, local_rows=7, by_items=False) == pytest.approx(0.5 / 4 / 7)
    assert LossScaling(ga_steps=4).row_weight(0.5, local_rows=7, by_items=False) == pytest.approx(0.5 / 7)
    assert s.matrix_weight(0.5) == pytest.approx(0.5 / 4)
    assert LossScaling(ga_steps=4).matrix_weight(0.5) == 0.5  # the host divides by GA itself
    assert LossScaling().row_weight(0.5, local_rows=0, by_items=True) == 0.5

    def trainer(**kw):
        args = types.SimpleNamespace(
            gradient_accumulation_steps=kw.pop("ga", 4),
            average_tokens_across_devices=kw.pop("avg", True),
            n_gpu=1,
            world_size=kw.get("procs", 2),
        )
        acc = types.SimpleNamespace(num_processes=kw.pop("procs", 2))
        t = types.SimpleNamespace(
            args=args, accelerator=acc, compute_loss_func=None, current_gradient_accumulation_steps=4
        )
        t.model_accepts_loss_kwargs = kw.pop("accepts", True)
        for k, v in kw.items():
            setattr(t, k, v)
        return t

    got = host_loss_scaling(trainer(), torch.tensor(96))
    assert got == LossScaling(num_items_in_batch=96.0, world_factor=2.0, ga_steps=4, host_divides_by_ga=False)
    got = host_loss_scaling(trainer(avg=False), 96)
    assert (got.world_factor, got.host_divides_by_ga) == (1.0, False)
    # the model does not take num_items_in_batch: the host averages per micro-batch and divides by GA
    got = host_loss_scaling(trainer(accepts=False), None)
    assert got == LossScaling(num_items_in_batch=None, world_factor=1.0, ga_steps=4, host_divides_by_ga=True)
    # transformers >= 5.2x: a subclass may declare its loss per-batch (`loss_is_scaled_for_ga=False`)
    got = host_loss_scaling(trainer(loss_is_scaled_for_ga=False), 96)
    assert got.host_divides_by_ga is True
    got = host_loss_scaling(trainer(accepts=False, compute_loss_func=lambda *a, **k: 0.0), 96)
    assert got.host_divides_by_ga is False and got.world_factor == 2.0
    # tensor-parallel ranks see the same batch: the host multiplies by num_processes // tp_size
    got = host_loss_scaling(trainer(procs=8, get_tp_size=lambda: 2), 96)
    assert got.world_factor == 4.0


# ---------------------------------------------------------------------------------------------- faults
def test_micro_batch_without_valid_rows_is_skipped():
    model, obj = _nlg_setup(_cfg())
    inputs = batch()
    inputs["labels"][:] = -100
    model(**inputs)
    with warnings.catch_warnings():  # legitimate (a truncated prompt): skipped quietly, only counted
        warnings.simplefilter("error")
        loss, metrics = obj.compute(model, inputs)
    assert float(loss) == 0.0 and torch.isfinite(loss)
    assert metrics["balora/skipped_no_valid_rows"] == 1.0
    assert obj.captured_hidden is None  # nothing stale for the next micro-batch


def test_micro_batch_without_valid_rows_does_not_raise_under_on_nonfinite_raise():
    model, obj = _nlg_setup(_cfg(on_nonfinite="raise"))
    inputs = batch()
    inputs["labels"][:] = -100
    for count in (1.0, 2.0):
        model(**inputs)
        loss, metrics = obj.compute(model, inputs)
        assert float(loss) == 0.0 and metrics["balora/skipped_no_valid_rows"] == count


def test_nan_reference_skips_only_consistency(monkeypatch):
    cfg = _cfg(lambda_consistency=0.3, lambda_diversity=0.2, lambda_svd=0.1, svd_top_k=3, diversity_top_k=5)
    model, obj = _nlg_setup(cfg)
    real = obj.reference_hidden
    monkeypatch.setattr(obj, "reference_hidden", lambda m: real(m) * float("nan"))
    inputs = batch()
    logits = model(**inputs).logits
    with pytest.warns(RuntimeWarning, match="'consistency' is not finite"):
        loss, metrics = obj.compute(model, inputs)
    assert torch.isfinite(loss) and metrics["balora/skipped_consistency"] == 1.0
    assert "balora/consistency" not in metrics
    z = SEL(logits, inputs["labels"])
    expected = 0.2 * Fn.diversity_loss(z, top_k=5) + 0.1 * Fn.svd_loss(z, k=3, norm="frobenius")
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-8)
    loss.backward()
    assert all(torch.isfinite(g).all() for g in _grads(model).values())


def _nan_hidden_hook(model):
    norm = model.get_base_model().model.norm

    def hook(module, args, output):
        output = output.clone()
        output[0, 4] = float("nan")
        return output

    return norm.register_forward_hook(hook)


def test_nan_hidden_states_skip_every_term():
    cfg = _cfg(lambda_consistency=0.3, lambda_diversity=0.2, lambda_svd=0.1, svd_top_k=3)
    model, obj = _nlg_setup(cfg)
    inputs = batch()
    handle = _nan_hidden_hook(model)
    try:
        model(**inputs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss, metrics = obj.compute(model, inputs)
    finally:
        handle.remove()
    assert float(loss) == 0.0
    for name in ("consistency", "diversity", "svd"):
        assert metrics[f"balora/skipped_{name}"] == 1.0
    assert sum("not finite" in str(w.message) for w in caught) == 3


def test_on_nonfinite_raise():
    model, obj = _nlg_setup(_cfg(on_nonfinite="raise"))
    inputs = batch()
    handle = _nan_hidden_hook(model)
    try:
        model(**inputs)
        with pytest.raises(FloatingPointError, match="on_nonfinite='raise'"):
            obj.compute(model, inputs)
    finally:
        handle.remove()


def test_compute_without_forward_or_labels_explains():
    model, obj = _nlg_setup(_cfg())
    with pytest.raises(RuntimeError, match="saw no decoder forward"):
        obj.compute(model, batch())
    inputs = batch()
    model(**_fwd(inputs))
    with pytest.raises(ValueError, match="needs `labels`"):
        obj.compute(model, _fwd(inputs))


# ---------------------------------------------------------------------------------------------- validation
def test_validate_model_errors():
    nlg, nlu = _cfg(), BALoRAConfig.from_preset("iclr2026-nlu")
    with pytest.raises(ValueError, match=r"needs a PEFT LoRA model, got LlamaForCausalLM"):
        BALoRAObjective(nlg).prepare(tiny_llama())
    with pytest.raises(ValueError, match=r"head is trained.*lm_head"):
        validate_model(lora(tiny_llama(tie=False), init=True, targets=("q_proj", "lm_head")), nlg)
    with pytest.raises(ValueError, match=r"head is trained"):
        validate_model(
            lora(tiny_llama(tie=False), init=True, targets=("q_proj",), modules_to_save=["lm_head"]), nlg
        )
    with pytest.raises(ValueError, match=r"task='nlu' but the model is a LlamaForCausalLM"):
        validate_model(lora(tiny_llama(), init=True), nlu)
    bert = lora(tiny_bert_classifier(), init=True, targets=("query", "value"), task_type="SEQ_CLS")
    with pytest.raises(ValueError, match=r"task='nlg' but BertForSequenceClassification"):
        validate_model(bert, nlg)
    with pytest.raises(ValueError, match="LoRA adapter named 'other'"):
        validate_model(lora(tiny_llama(), init=True), nlg, adapter="other")


def test_validate_model_quantised_pissa_4bit_only():
    """PiSSA on a 4-bit base is QPiSSA (allowed); 8-bit, DoRA, other inits and a quantised config without
    bitsandbytes layers are refused by name."""

    class Linear4bit(nn.Linear):  # stand in for bitsandbytes' classes (matched by name)
        pass

    class Linear8bitLt(nn.Linear):
        pass

    model = lora(tiny_llama(), init="pissa", targets=("q_proj",))
    model.get_base_model().model.layers[0].mlp.extra = Linear4bit(2, 2)
    validate_model(model, _cfg())  # QPiSSA: docs/qlora.md
    eight = lora(tiny_llama(), init="pissa", targets=("q_proj",))
    eight.get_base_model().model.layers[0].mlp.extra = Linear8bitLt(2, 2)
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa' on an 8-bit base \(Linear8bitLt\)"):
        validate_model(eight, _cfg())
    dora = lora(tiny_llama(), init="pissa", targets=("q_proj",), use_dora=True)
    dora.get_base_model().model.layers[0].mlp.extra = Linear4bit(2, 2)
    with pytest.raises(ValueError, match=r"use_dora=True with init_lora_weights='pissa' on a 4-bit base"):
        validate_model(dora, _cfg())
    olora = lora(tiny_llama(), init="olora", targets=("q_proj",))
    olora.get_base_model().model.layers[0].mlp.extra = Linear4bit(2, 2)
    with pytest.raises(ValueError, match=r"init_lora_weights='olora' on a quantised base \(Linear4bit\)"):
        validate_model(olora, _cfg())
    plain = lora(tiny_llama(), init=True, targets=("q_proj",))
    plain.get_base_model().model.layers[0].mlp.extra = Linear4bit(2, 2)
    validate_model(plain, _cfg())  # plain LoRA keeps the base untouched: fine
    cfg_q = lora(tiny_llama(), init="pissa", targets=("q_proj",))
    cfg_q.get_base_model().config.quantization_config = {"quant_method": "bitsandbytes"}
    with pytest.raises(ValueError, match="quantised base"):
        validate_model(cfg_q, _cfg())


# ---------------------------------------------------------------------------------------------- NLU
def _nlu_inputs():
    inputs = batch(b=6, t=8, seed=5)
    inputs["labels"] = torch.tensor([0, 1, 2, 3, 1, 2])
    return inputs


def test_nlu_objective_equals_functional():
    cfg = BALoRAConfig.from_preset("iclr2026-nlu", svd_top_k=2)
    model = lora(tiny_bert_classifier(), init="pissa", targets=("query", "value"), task_type="SEQ_CLS")
    obj = BALoRAObjective(cfg).prepare(model)
    assert obj.mode == "adapter_snapshot" and obj.num_classes == 4
    inputs = _nlu_inputs()
    out = model(**inputs)
    loss0, m0 = obj.compute(model, inputs, logits=out.logits)
    assert m0["balora/consistency"] < 1e-9  # the reference is the initial model, classifier included
    _perturb(model, seed=2, scale=0.05)
    _perturb(model, seed=3, scale=2.0, match="modules_to_save.default")  # a classifier with sizeable logits
    with torch.no_grad():
        ref_logits = tiny_bert_classifier()(**_fwd(inputs)).logits
    out = model(**inputs)
    loss, metrics = obj.compute(model, inputs, logits=out.logits)
    loss.backward()
    fused = _grads(model)
    z = model(**inputs).logits
    raw = {
        "consistency": Fn.consistency_loss(z, ref_logits, kind="kl", temperature=2.0),
        "diversity": Fn.diversity_loss(z, kind="decorrelation"),
        "svd": Fn.svd_loss(z, k=2, norm="nuclear"),
    }
    expected = sum(cfg.lambdas[k] * v for k, v in raw.items())
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-8)
    _assert_grads_close(fused, _grads(model))
    for k, v in raw.items():
        assert metrics[f"balora/{k}"] == pytest.approx(float(v), rel=1e-5, abs=1e-9)
    assert all(float(v) != 0.0 for v in raw.values())


def test_nlu_v5_mse_and_svd_noop_warning():
    cfg = BALoRAConfig.from_preset("v5-nlu", lambda_consistency=1.0, lambda_diversity=0.0, svd_top_k=5)
    model = lora(tiny_bert_classifier(), init=True, targets=("query", "value"), task_type="SEQ_CLS")
    with pytest.warns(UserWarning, match=r"svd_top_k=5 >= number of classes \(4\)"):
        obj = BALoRAObjective(cfg).prepare(model)
    assert obj.mode == "disabled_adapter"
    _perturb(model, seed=4, scale=0.5)
    _perturb(model, seed=5, scale=2.0, match="modules_to_save.default")
    inputs = _nlu_inputs()
    with torch.no_grad():
        ref_logits = tiny_bert_classifier()(**_fwd(inputs)).logits
    logits = model(**inputs).logits
    loss, metrics = obj.compute(model, inputs, logits=logits)
    assert "balora/svd" not in metrics  # k >= classes: the share is identically 1, the term is skipped
    expected = Fn.consistency_loss(logits, ref_logits, kind="mse")
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="pass logits="):
        obj.compute(model, inputs)
