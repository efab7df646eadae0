"""The term contract (core/contract.py): equality by settings, the row-kernel protocol and its declared fused
hook, the collector's order, the Gram factor kept with its head, and docs/extending.md's example run for real."""

from __future__ import annotations

import gc
import pathlib
import re
import types
import weakref

import pytest
import torch
from conftest import CONSTANT, batch, lora, tiny_llama
from test_plugins import run_with_plugin

from balora_plugins import BALoRAConfig
from balora_plugins import functional as Fn
from balora_plugins.core import (
    AUTOGRAD,
    CLOSED_FORM,
    ROW,
    BALoRAObjective,
    Consistency,
    EntropyDiversity,
    HiddenView,
    KLRows,
    OutputHead,
    RowKernel,
    SVDShare,
    Term,
    as_row_kernel,
    chunked_row_terms,
    collect_terms,
    hookimpl,
    plugin_manager,
)

EXTENDING = pathlib.Path(__file__).resolve().parent.parent / "docs" / "extending.md"


# ---------------------------------------------------------------------------------------------- equality
def _cfg(**kw) -> BALoRAConfig:
    return BALoRAConfig.from_preset("iclr2026-nlg", **kw)


@pytest.mark.parametrize(
    ("make", "other"),
    [
        (lambda: Consistency(_cfg()), lambda: Consistency(_cfg(temperature=3.0))),
        (lambda: Consistency(_cfg()), lambda: Consistency(BALoRAConfig.from_preset("v5-nlu"))),
        (
            lambda: EntropyDiversity(_cfg(diversity_top_k=5)),
            lambda: EntropyDiversity(_cfg(diversity_top_k=0)),
        ),
        (lambda: SVDShare(_cfg(svd_top_k=3)), lambda: SVDShare(_cfg(svd_top_k=4))),
    ],
    ids=["temperature", "kind", "top_k", "svd_top_k"],
)
def test_terms_with_different_settings_are_unequal(make, other):
    a, b = make(), other()
    assert a.name == b.name and a.level == b.level  # all the old equality looked at
    assert a != b and not a == b
    assert make() == a  # the same settings: equal


def test_term_equality_holds_for_tensor_settings_and_across_classes():
    class Scaled(Term):
        def __init__(self, w):
            super().__init__(name="scaled", level=ROW)
            self.w = w

    assert Scaled(torch.ones(3)) == Scaled(torch.ones(3))
    assert Scaled(torch.ones(3)) != Scaled(torch.zeros(3))
    assert Scaled(torch.ones(3)) != Scaled(torch.ones(4))
    assert Scaled(1.0) != Scaled(torch.ones(1))
    assert Term(name="scaled", level=ROW) != Scaled(1.0)  # another class is another term
    assert "w=1.0" in repr(Scaled(1.0))  # the repr shows the settings too


# ---------------------------------------------------------------------------------------------- kernels
def test_kernels_declare_their_gradient():
    cfg = _cfg()
    assert Consistency(cfg).row_kernel().gradient == CLOSED_FORM
    assert EntropyDiversity(cfg).row_kernel().gradient == CLOSED_FORM
    mse = Consistency(BALoRAConfig.from_preset("v5-nlu"))
    assert as_row_kernel(mse.row_kernel()).gradient == AUTOGRAD
    assert as_row_kernel(mse.row_kernel()).accepts_topk_reference is False
    assert as_row_kernel(KLRows(1.0)).accepts_topk_reference is True

    class Restated(EntropyDiversity):  # restates the formula: its own rows through autograd, not the parent's
        def rows(self, logits, ref_logits):
            return super().rows(logits, ref_logits) * 2

    assert as_row_kernel(Restated(cfg).row_kernel()).gradient == AUTOGRAD


def test_a_closed_form_declaration_without_rows_and_grad_is_refused():
    with pytest.raises(TypeError, match="declares gradient='closed_form' but does not define rows_and_grad"):

        class Broken(RowKernel):
            gradient = CLOSED_FORM

            def __call__(self, z, z_ref):
                return z.sum(-1)

    with pytest.raises(TypeError, match="gradient='fast'"):

        class Unknown(RowKernel):
            gradient = "fast"


def test_the_driver_follows_the_declaration_not_the_methods():
    """A kernel that has rows_and_grad but declares autograd is differentiated by autograd (the old driver took
    any object with a rows_and_grad for a closed form)."""
    calls = []

    class Declared(KLRows):
        gradient = AUTOGRAD

        def rows_and_grad(self, *args, **kwargs):  # a wrong closed form the driver must not use
            calls.append(1)
            values, acc = super().rows_and_grad(*args, **kwargs)
            return values, None if acc is None else acc * 0

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(9, 5, generator=g), torch.randn(30, 5, generator=g)
    h_ref = h + 0.2 * torch.randn(9, 5, generator=g)
    head = OutputHead(w)
    h1, h2 = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    total, _ = chunked_row_terms(h1, h_ref, head, [Declared(2.0)], [0.5], 4)
    want, _ = chunked_row_terms(h2, h_ref, head, [lambda z, zr: Fn.kl_rows(z, zr, 2.0)], [0.5], 4)
    total.backward()
    want.backward()
    assert not calls
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the collector
def test_the_collector_orders_by_registration_not_by_name():
    """Built-ins lead (their hookimpl is tryfirst), then plugins as pluggy calls them, then extra_plugins."""
    cfg = _cfg()

    class Named(Term):
        def __init__(self, name):
            super().__init__(name=name, level=ROW)

    class One:
        def __init__(self, name):
            self.name = name

        @hookimpl
        def balora_terms(self, config):
            return [Named(self.name)]

    pm = plugin_manager()
    pm.register(One("aaa"), name="test-order-a")
    pm.register(One("zzz"), name="test-order-z")
    try:
        names = [t.name for t in collect_terms(cfg, [One("extra")])]
    finally:
        pm.unregister(name="test-order-a")
        pm.unregister(name="test-order-z")
    assert names == ["consistency", "diversity", "svd", "zzz", "aaa", "extra"]


# ---------------------------------------------------------------------------------------------- the Gram factor
def test_the_gram_factor_lives_with_its_head():
    """Each head keeps its own factor (two heads used in turn do not evict each other), and it is freed with the
    head's weight; the old process-wide cache held one factor, kept after its head was gone."""
    g = torch.Generator().manual_seed(1)
    w1, w2 = torch.randn(40, 6, generator=g), torch.randn(50, 6, generator=g)
    head1, head2 = OutputHead(w1), OutputHead(w2)
    r1, r2 = head1.gram_factor(), head2.gram_factor()
    assert head1.gram_factor() is r1 and head2.gram_factor() is r2
    assert OutputHead(w1, bias=None).gram_factor() is r1  # a new head object on the same weight reuses it
    h = torch.randn(7, 6, generator=g)
    torch.testing.assert_close(HiddenView(h, head1).frobenius(), (h @ w1.T).norm(), rtol=1e-5, atol=0.0)
    head1.forget_gram_factor()
    again = head1.gram_factor()
    assert again is not r1
    torch.testing.assert_close(again.T @ again, r1.T @ r1)
    assert OutputHead(w1.double(), source=w1).gram_factor() is not again  # another dtype: another factor
    gone = weakref.ref(r2)
    del head2, w2, r2
    gc.collect()
    assert gone() is None


# ---------------------------------------------------------------------------------------------- the docs example
def _extending_example() -> types.ModuleType:
    """The python block of docs/extending.md's example, as a module (the page is run, not copied)."""
    text = EXTENDING.read_text(encoding="utf-8")
    section = text.split("## Example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    module = types.ModuleType("z_loss_example")
    exec(compile(code, str(EXTENDING), "exec"), module.__dict__)
    return module


def test_extending_example_kernel_is_its_formula_and_gradient():
    ex = _extending_example()
    term = ex.ZLoss(coefficient=0.3)
    kernel = term.row_kernel()
    assert kernel.gradient == CLOSED_FORM
    z = torch.randn(6, 17, generator=torch.Generator().manual_seed(2)) * 3
    zl = z.clone().requires_grad_(True)
    want = term.rows(zl, None)
    (grad,) = torch.autograd.grad(0.3 * want.sum(), zl)
    with torch.no_grad():
        values, acc = kernel.rows_and_grad(z, None, 0.3, None, True)
        values2, acc2 = kernel.rows_and_grad(z, None, 0.3, torch.ones_like(z), True)
    torch.testing.assert_close(values, want.detach())
    torch.testing.assert_close(values, torch.logsumexp(z, -1) ** 2)
    torch.testing.assert_close(acc, grad)
    torch.testing.assert_close(acc2, grad + 1)
    torch.testing.assert_close(kernel(z, None), values)


@pytest.mark.parametrize("how", ["register", "extra_plugins"])
def test_extending_example_runs_through_the_objective(how):
    """On a tiny model: the loss grows by coefficient × mean (log Z)² of the model's own logits, the metric is
    logged, and the fused gradient equals autograd's through the full logits."""
    ex = _extending_example()
    model = lora(tiny_llama(), init="pissa")
    inputs = batch()
    cfg = BALoRAConfig(lambda_consistency=0.1, lambda_diversity=0.05, lambda_svd=0.0, **CONSTANT)
    base = BALoRAObjective(cfg).prepare(model)
    model(**inputs)
    base_loss, _ = base.compute(model, inputs)
    base.remove_hooks()
    names, out, loss, metrics = run_with_plugin(cfg, ex, how, model, inputs)
    assert names[-1] == "z_loss"
    z = Fn.select_positions(out.logits.detach(), inputs["labels"])
    zl = torch.logsumexp(z, -1).square().mean()
    torch.testing.assert_close(loss.detach(), base_loss.detach() + 1e-4 * zl, rtol=1e-5, atol=1e-7)
    assert metrics["balora/z_loss"] == pytest.approx(float(zl), rel=1e-5)
    assert metrics["balora/z_loss_weighted"] == pytest.approx(1e-4 * float(zl), rel=1e-5)
    assert [t.name for t in collect_terms(cfg)] == ["consistency", "diversity", "svd"]  # gone again


def test_extending_example_gradient_equals_autograd_of_the_logits():
    ex = _extending_example()
    model = lora(tiny_llama(), init="pissa")
    inputs = batch()
    off = BALoRAConfig(lambda_consistency=0.0, lambda_diversity=0.0, lambda_svd=0.0)
    obj = BALoRAObjective(off, extra_plugins=[types.SimpleNamespace(balora_terms=ex.balora_terms)])
    obj.prepare(model)
    try:
        model(**inputs)
        loss, _ = obj.compute(model, inputs)  # the terms only (the host adds them to its loss)
        loss.backward()
    finally:
        obj.remove_hooks()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    z = Fn.select_positions(model(**inputs).logits, inputs["labels"])
    (1e-4 * torch.logsumexp(z.float(), -1).square().mean()).backward()
    assert fused
    for n, p in model.named_parameters():
        if n in fused:
            torch.testing.assert_close(fused[n], p.grad, rtol=1e-4, atol=1e-5 * float(p.grad.abs().max()))
