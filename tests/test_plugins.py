"""The pluggy extension point: built-ins arrive through the entry-point group; a fourth term joins without forking."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch
from conftest import CONSTANT, batch, lora, tiny_llama

from balora_plugins import BALoRAConfig
from balora_plugins import functional as Fn
from balora_plugins.core import terms as builtin_terms
from balora_plugins.core.hookspecs import PROJECT, hookimpl
from balora_plugins.core.objective import BALoRAObjective
from balora_plugins.core.plugins import collect_terms, plugin_manager
from balora_plugins.core.terms import MATRIX, ROW, Term


class LogitNorm(Term):
    """A fourth term: mean squared logit per row (z-loss-like), with its own constant weight."""

    def __init__(self, weight=0.01, name="logit_norm"):
        super().__init__(name=name, level=ROW)
        self._w = weight

    def weight(self, lambdas):
        return self._w

    def rows(self, logits, ref_logits):
        return logits.float().pow(2).mean(-1)


class Spread(Term):
    """A matrix term: the variance of the whole logits matrix."""

    def __init__(self):
        super().__init__(name="spread", level=MATRIX)

    def weight(self, lambdas):
        return 0.5

    def matrix(self, view):
        return view.logits().var()


class Plugin:
    def __init__(self, *made):
        self.made = made

    @hookimpl
    def balora_terms(self, config):
        return [cls() for cls in self.made]


CFG = BALoRAConfig(
    lambda_consistency=0.1, lambda_diversity=0.05, lambda_svd=0.02, svd_top_k=3, diversity_top_k=5, **CONSTANT
)


def _run(obj, model, inputs):
    model(**inputs)
    return obj.compute(model, inputs)


@pytest.fixture
def setup():
    model = lora(tiny_llama(), init="pissa")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".default." in n:
                p.add_(0.05 * torch.randn_like(p))
    return model, batch()


def test_builtins_come_through_the_entry_point_group():
    eps = {ep.name: ep.value for ep in entry_points(group=PROJECT)}
    assert eps.get("builtin") == "balora_plugins.core.terms"  # the installed package declares it
    registered = dict(plugin_manager().list_name_plugin())
    assert registered["builtin"] is builtin_terms  # ... and it is loaded from there, like a third party's
    assert [t.name for t in collect_terms(CFG)] == ["consistency", "diversity", "svd"]


def run_with_plugin(cfg, plugin, how: str, model, inputs):
    """One objective step with ``plugin``'s terms, the plugin registered on the shared plugin manager for the step
    (``how="register"``) or passed as ``extra_plugins``; returns (the term names, the host forward's output, the
    loss, the metrics). The plugin is unregistered and the hooks removed whatever happens."""
    pm = plugin_manager()
    if how == "register":
        pm.register(plugin, name="test-plugin")
    obj = None
    try:
        obj = BALoRAObjective(cfg, extra_plugins=[plugin] if how == "extra_plugins" else ()).prepare(model)
        out = model(**inputs)
        loss, metrics = obj.compute(model, inputs)
    finally:
        if how == "register":
            pm.unregister(name="test-plugin")
        if obj is not None:
            obj.remove_hooks()
    return [t.name for t in obj.terms], out, loss, metrics


@pytest.mark.parametrize("how", ["register", "extra_plugins"])
def test_custom_term_changes_loss_and_shows_in_metrics(setup, how):
    model, inputs = setup
    base_obj = BALoRAObjective(CFG).prepare(model)
    base_loss, base_metrics = _run(base_obj, model, inputs)
    base_obj.remove_hooks()
    names, out, loss, metrics = run_with_plugin(CFG, Plugin(LogitNorm, Spread), how, model, inputs)
    assert names == ["consistency", "diversity", "svd", "logit_norm", "spread"]
    z = Fn.select_positions(out.logits.detach(), inputs["labels"])
    norm, spread = z.pow(2).mean(-1).mean(), z.var()
    torch.testing.assert_close(
        loss.detach(), base_loss.detach() + 0.01 * norm + 0.5 * spread, rtol=1e-5, atol=1e-7
    )
    assert metrics["balora/logit_norm"] == pytest.approx(float(norm), rel=1e-5)
    assert metrics["balora/logit_norm_weighted"] == pytest.approx(0.01 * float(norm), rel=1e-5)
    assert metrics["balora/spread"] == pytest.approx(float(spread), rel=1e-5)
    assert metrics["balora/lambda_logit_norm"] == 0.01
    for k in ("consistency", "diversity", "svd"):
        assert metrics[f"balora/{k}"] == pytest.approx(base_metrics[f"balora/{k}"], rel=1e-6)
    # gone again once unregistered
    assert [t.name for t in collect_terms(CFG)] == ["consistency", "diversity", "svd"]


def test_custom_term_gradient_flows(setup):
    model, inputs = setup
    obj = BALoRAObjective(
        BALoRAConfig(lambda_consistency=0.0, lambda_diversity=0.0, lambda_svd=0.0),
        extra_plugins=[Plugin(LogitNorm)],
    ).prepare(model)
    model(**inputs)
    loss, _ = obj.compute(model, inputs)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    z = Fn.select_positions(model(**inputs).logits, inputs["labels"])
    (0.01 * z.pow(2).mean()).backward()
    assert fused
    for n, p in model.named_parameters():
        if n in fused:
            torch.testing.assert_close(fused[n], p.grad, rtol=1e-5, atol=1e-5 * float(p.grad.abs().max()))
    obj.remove_hooks()


def test_duplicate_term_names_raise():
    class Clash(Term):
        def __init__(self):
            super().__init__(name="svd", level=MATRIX)

    with pytest.raises(ValueError, match=r"\['svd'\] are registered twice"):
        collect_terms(CFG, [Plugin(Clash)])
    with pytest.raises(ValueError, match=r"\['logit_norm'\] are registered twice"):
        BALoRAObjective(CFG, extra_plugins=[Plugin(LogitNorm), Plugin(LogitNorm)])
    pm = plugin_manager()
    pm.register(Plugin(Clash), name="test-clash")
    try:
        with pytest.raises(ValueError, match="registered twice"):
            collect_terms(CFG)
    finally:
        pm.unregister(name="test-clash")


def test_plugin_may_add_nothing():
    class Quiet:
        @hookimpl
        def balora_terms(self, config):
            return None if config.task == "nlg" else [LogitNorm()]

    assert [t.name for t in collect_terms(CFG, [Quiet()])] == ["consistency", "diversity", "svd"]
    nlu = collect_terms(BALoRAConfig.from_preset("iclr2026-nlu"), [Quiet()])
    assert [t.name for t in nlu] == ["consistency", "diversity", "svd", "logit_norm"]
