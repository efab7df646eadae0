"""The authors' weight options (docs/method.md §3.1) against their arithmetic written out here, independently.

* the two-phase λ2/λ3 warm-up on whole steps, and ``linear_warmup`` / ``quadratic_warmup``, exactly (==) as the
  authors' training script computes them, for many run lengths;
* the adaptive λ1 from the reference's confidence, on full logits of a copy of the pre-trained model, against
  the fused objective (value, metric and gradient) for NLG and NLU;
* the trainers pass the global step and the total steps (tests/test_callback.py runs one through a Trainer).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import batch, lora, tiny_bert_classifier, tiny_llama

from balora_plugins import BALoRAConfig
from balora_plugins import functional as Fn
from balora_plugins.core.objective import BALoRAObjective

TOTALS = [1, 2, 3, 7, 10, 19, 37, 64, 100, 999]


# ---------------------------------------------------------------------------------------------- their arithmetic
def authors_focus_factor(
    schedule: str, step: int, max_steps: int, warmup_ratio: float, ramp_ratio: float
) -> float:
    """λ2/λ3 factor of the authors' script at ``step`` (``state.global_step``) of ``max_steps``, restated."""
    total_steps = max(int(max_steps or 1), 1)
    warmup_steps = int(warmup_ratio * total_steps)
    if schedule == "two_phase":
        ramp_steps = max(int(ramp_ratio * total_steps), 1)
        if step < warmup_steps:
            return 0.0
        if step < warmup_steps + ramp_steps:
            return (step - warmup_steps) / ramp_steps
        return 1.0
    if step < warmup_steps:
        progress = step / warmup_steps if warmup_steps > 0 else 1.0
        return progress if schedule == "linear_warmup" else progress * progress
    return 1.0  # the script leaves λ2, λ3 untouched once the warm-up is over


def authors_adaptive_lambda1(
    ref_logits: torch.Tensor, temperature: float, lam1: float, lo=None, hi=None
) -> float:
    """λ1 from the reference's confidence: ``ref_logits`` (rows, |V|) are the valid rows, in fp64."""
    probs = torch.softmax(ref_logits.double() / temperature, dim=-1)
    entropy = -(probs * torch.log(probs)).sum(-1).mean()
    confidence = 1.0 - (entropy / math.log(ref_logits.shape[-1])).clamp(0.0, 1.0)
    lo = 0.1 * lam1 if lo is None else lo
    hi = lam1 if hi is None else hi
    return lo + (hi - lo) * float(confidence)


OURS = {"two_phase": "warmup", "linear_warmup": "linear_warmup", "quadratic_warmup": "quadratic_warmup"}


# ---------------------------------------------------------------------------------------------- λ2 / λ3 schedules
@pytest.mark.parametrize("schedule", list(OURS))
@pytest.mark.parametrize("ratios", [(0.2, 0.05), (0.1, 0.05), (0.3, 0.2), (0.0, 0.05)])
def test_whole_step_schedules_equal_the_authors_number_for_number(schedule, ratios):
    start, ramp = ratios
    cfg = BALoRAConfig(
        lambda_diversity=0.005,
        lambda_svd=0.007,
        consistency_schedule="constant",
        regularizer_schedule=OURS[schedule],
        warmup_start=start,
        warmup_ramp=ramp,
        schedule_whole_steps=True,
    )
    for total in TOTALS:
        for step in range(total + 1):
            f = authors_focus_factor(schedule, step, total, start, ramp)
            lam = cfg.lambdas_at(step / total, step=step, total_steps=total)
            assert lam["diversity"] == 0.005 * f and lam["svd"] == 0.007 * f, (total, step)
            assert lam["consistency"] == cfg.lambda_consistency


def test_the_whole_step_switch_matters():
    """With boundaries at exact fractions the two-phase factor differs from the script's on some steps."""
    kw = dict(regularizer_schedule="warmup", warmup_start=0.3, warmup_ramp=0.2)
    exact, whole = BALoRAConfig(**kw), BALoRAConfig(**kw, schedule_whole_steps=True)
    # 8 steps: the script starts the ramp at int(2.4) = 2 and ends it after max(int(1.6), 1) = 1 step
    assert [whole.lambdas_at(s / 8, step=s, total_steps=8)["svd"] / whole.lambda_svd for s in range(8)] == [
        0,
        0,
        0,
        1,
        1,
        1,
        1,
        1,
    ]
    assert exact.lambdas_at(3 / 8)["svd"] / exact.lambda_svd == pytest.approx(0.375)  # (0.375 - 0.3) / 0.2


@pytest.mark.parametrize("schedule", ["linear_warmup", "quadratic_warmup"])
@pytest.mark.parametrize("p", [0.0, 0.05, 0.1, 0.19, 0.2, 0.5, 1.0])
def test_fractional_linear_and_quadratic_warmups(schedule, p):
    cfg = BALoRAConfig(
        regularizer_schedule=schedule, warmup_start=0.2, lambda_diversity=0.03, lambda_svd=0.05
    )
    f = min(p / 0.2, 1.0)
    f = f if schedule == "linear_warmup" else f * f
    lam = cfg.lambdas_at(p)
    assert lam["diversity"] == pytest.approx(0.03 * f, rel=1e-12, abs=1e-15)
    assert lam["svd"] == pytest.approx(0.05 * f, rel=1e-12, abs=1e-15)


def test_zero_length_warmups_are_full_weight():
    for schedule in ("linear_warmup", "quadratic_warmup"):
        cfg = BALoRAConfig(regularizer_schedule=schedule, warmup_start=0.0)
        assert cfg.lambdas_at(0.0) == cfg.lambdas
        whole = BALoRAConfig(regularizer_schedule=schedule, warmup_start=0.0, schedule_whole_steps=True)
        assert whole.lambdas_at(0.0, step=0, total_steps=10) == whole.lambdas


def test_cosine_on_whole_steps_is_the_authors_cosine():
    cfg = BALoRAConfig(lambda_consistency=0.025, consistency_schedule="cosine", schedule_whole_steps=True)
    for total in (7, 100):
        for step in range(total + 1):
            theirs = 0.1 * 0.025 + (0.025 - 0.1 * 0.025) * 0.5 * (1 + math.cos(math.pi * step / total))
            lam = cfg.lambdas_at(0.0, step=step, total_steps=total)  # the step, not progress, drives it
            assert lam["consistency"] == pytest.approx(theirs, rel=1e-12)


def test_whole_steps_needs_the_step():
    cfg = BALoRAConfig(regularizer_schedule="warmup", schedule_whole_steps=True)
    with pytest.raises(ValueError, match="step=global_step"):
        cfg.lambdas_at(0.5)


# ---------------------------------------------------------------------------------------------- adaptive λ1: config
def test_adaptive_lambda_between_bounds():
    cfg = BALoRAConfig(lambda_consistency=0.04, consistency_schedule="adaptive")
    assert cfg.adaptive_consistency_bounds == pytest.approx((0.004, 0.04))
    for c in (0.0, 0.3, 1.0):
        assert cfg.adaptive_lambda_consistency(c) == pytest.approx(0.004 + (0.04 - 0.004) * c, rel=1e-12)
    set_ = BALoRAConfig(
        consistency_schedule="adaptive", lambda_consistency_min=0.01, lambda_consistency_max=0.5
    )
    assert set_.adaptive_lambda_consistency(0.5) == pytest.approx(0.255)
    assert set_.lambdas_at(0.7)["consistency"] == 0.5  # the upper bound until the micro-batch is seen


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(lambda_consistency_min=0.01), "only applies with BALoRAConfig.consistency_schedule=.adaptive."),
        (dict(consistency_schedule="adaptive", lambda_consistency_max=-1.0), "lambda_consistency_max=-1.0"),
        (
            dict(consistency_schedule="adaptive", lambda_consistency_min=0.5, lambda_consistency_max=0.1),
            "lambda_consistency_min=0.5 exceeds BALoRAConfig.lambda_consistency_max=0.1",
        ),
        (
            dict(consistency_schedule="adaptive", lambda_consistency_min=0.5),
            "exceeds BALoRAConfig.lambda_consistency_max=0.025",
        ),
        (dict(schedule_whole_steps="yes"), "schedule_whole_steps='yes'"),
        (dict(regularizer_schedule="cubic_warmup"), "quadratic_warmup"),
    ],
)
def test_bad_option_values_name_field_value_and_fix(kw, match):
    with pytest.raises(ValueError, match=match) as err:
        BALoRAConfig(**kw)
    assert "BALoRAConfig." in str(err.value)


# ---------------------------------------------------------------------------------------------- adaptive λ1: objective
def _perturb(model, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".default." in n:
                p.add_(scale * torch.randn(p.shape, generator=g))


def _grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("bounds", [(None, None), (0.05, 2.0)])
def test_adaptive_nlg_objective_matches_full_logits(bounds):
    """λ1 from the reference's full-vocabulary entropy, computed chunk by chunk (chunk_size 5 over ~20 rows),
    equals the one from the full reference logits; loss and gradients follow with that λ1."""
    lo, hi = bounds
    cfg = BALoRAConfig(
        lambda_consistency=1.0,
        lambda_diversity=0.2,
        lambda_svd=0.1,
        consistency_schedule="adaptive",
        regularizer_schedule="constant",
        lambda_consistency_min=lo,
        lambda_consistency_max=hi,
        temperature=0.1,  # the tiny random model is near-uniform at T = 2 (c ≈ 0.002); c ≈ 0.43 here
        svd_top_k=3,
        diversity_top_k=5,
        chunk_size=5,
    )
    model = lora(tiny_llama(), init="pissa")
    obj = BALoRAObjective(cfg).prepare(model)
    _perturb(model)
    inputs = batch(b=3, t=10)
    fwd = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        ref_logits = tiny_llama()(**fwd).logits  # the untouched pre-trained model
    model(**inputs)
    loss, metrics = obj.compute(model, inputs)
    loss.backward()
    fused = _grads(model)

    labels = inputs["labels"]
    z, zr = Fn.select_positions(model(**inputs).logits, labels), Fn.select_positions(ref_logits, labels)
    lam1 = authors_adaptive_lambda1(zr, 0.1, 1.0, lo, hi)
    low, high = (0.1, 1.0) if lo is None else (lo, hi)
    assert low + 0.05 * (high - low) < lam1 < high - 0.05 * (high - low)  # a confidence well inside (0, 1)
    assert metrics["balora/lambda_consistency"] == pytest.approx(lam1, rel=1e-5)
    expected = (
        lam1 * Fn.consistency_loss(z, zr, kind="kl", temperature=0.1)
        + 0.2 * Fn.diversity_loss(z, kind="entropy", top_k=5)
        + 0.1 * Fn.svd_loss(z, k=3, norm="frobenius", eps=cfg.eps)
    )
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-7)
    plain = _grads(model)
    for n in plain:
        torch.testing.assert_close(
            fused[n], plain[n], rtol=1e-5, atol=1e-5 * float(plain[n].abs().max()) + 1e-12
        )
    assert metrics["balora/consistency_weighted"] == pytest.approx(
        lam1 * metrics["balora/consistency"], rel=1e-6
    )


def test_adaptive_nlu_objective_matches_full_logits():
    """NLU: |V| = the classes; plain LoRA init, so the reference is the model with the adapter off (PEFT's own
    ``disable_adapter``)."""
    cfg = BALoRAConfig(
        task="nlu",
        lambda_consistency=1.0,
        lambda_diversity=0.0,
        lambda_svd=0.0,
        consistency_schedule="adaptive",
    )
    base = tiny_bert_classifier(num_labels=4)
    with torch.no_grad():  # a random head gives near-uniform class probabilities (c ≈ 1e-6): sharpen it
        base.classifier.weight.mul_(300.0)
    model = lora(base, init=True, targets=("query", "value"), task_type="SEQ_CLS")
    model.eval()  # no dropout: the reference forward must see the same network
    obj = BALoRAObjective(cfg).prepare(model)
    _perturb(model, scale=0.5)
    inputs = batch(b=6, t=8)
    inputs["labels"] = torch.tensor([0, 1, 2, 3, 0, 1])
    fwd = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**fwd).logits
    loss, metrics = obj.compute(model, inputs, logits=logits)
    with torch.no_grad(), model.disable_adapter():
        ref_logits = model(**fwd).logits
    lam1 = authors_adaptive_lambda1(ref_logits, 2.0, 1.0)
    assert metrics["balora/lambda_consistency"] == pytest.approx(lam1, rel=1e-6)
    kl = (2.0**2) * F.kl_div(
        F.log_softmax(logits / 2.0, -1),
        F.log_softmax(ref_logits / 2.0, -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    assert float(kl.mean().detach()) > 1e-4  # the adapter moved: the consistency term is not zero
    assert 0.15 < lam1 < 0.95  # a confidence well inside (0, 1)
    torch.testing.assert_close(loss, lam1 * kl.mean(), rtol=1e-5, atol=1e-8)
