"""`balora bench` (a program, not a timed test): its document, its arithmetic, and the fast paths it measures."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from balora_plugins import functional as Fn
from balora_plugins.config import BALoRAConfig
from balora_plugins.core.fused import OutputHead, chunked_row_terms
from balora_plugins.core.terms import Consistency, EntropyDiversity, KLRows, NegEntropyRows, Term
from balora_plugins.tools import bench

TINY = [
    "--in-process", "--quiet", "--layers", "1", "--hidden", "32", "--intermediate", "64", "--heads", "4",
    "--kv-heads", "2", "--vocab", "300", "--batch", "2", "--seq-len", "24", "--rank", "4", "--warmup", "1",
    "--steps", "2", "--term-reps", "1", "--nlu-layers", "1", "--nlu-hidden", "32", "--nlu-vocab", "300",
    "--nlu-batch", "6", "--nlu-seq-len", "12", "--no-qlora",
]  # fmt: skip
FOUR_BIT_TARGET = "4-bit base (QPiSSA): peak memory b/a <= 1.10"


def test_bench_smoke_document_table_and_ratios(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert bench.main([*TINY, "--json", str(path)]) == 0
    table = capsys.readouterr().out
    doc = json.loads(path.read_text())
    res, rat = doc["variants"], doc["ratios"]
    assert set(res) == {"a", "b", "c", "p"}
    for v, r in res.items():
        assert r["step_s"] == pytest.approx(statistics.median(r["step_s_all"])) and len(r["step_s_all"]) == 2
        assert (
            r["step_cpu_s"] == pytest.approx(statistics.median(r["step_cpu_s_all"])) and r["step_cpu_s"] > 0
        )
        assert r["peak_mem_bytes"] > 0 and r["rss_growth_bytes"] is None  # in-process: no RSS figure
        assert r["tokens"] == 48 and r["vocab"] == 300
        assert f"({v}) {bench.VARIANTS[v]}" in table
    for metric, key in (
        ("step_time", "step_s"),
        ("step_cpu_time", "step_cpu_s"),
        ("peak_memory", "peak_mem_bytes"),
    ):
        for pair in ("b/a", "c/a", "c/b", "p/a", "c/p"):
            x, y = pair.split("/")
            assert rat[metric][pair] == pytest.approx(res[x][key] / res[y][key], rel=1e-12)
        assert rat["rss_growth"]["b/a"] is None
    assert f"{rat['step_time']['c/b']:.2f}×" in table
    # (c) holds a second model copy and (B, T, |V|) logits: it needs more memory than (b)
    assert res["c"]["peak_mem_bytes"] > res["b"]["peak_mem_bytes"]
    t = doc["terms"]
    assert t["consistency"] == pytest.approx(t["reference_forward"] + t["kl_rows"])
    assert (
        res["b"]["clock"] == t["clock"] == "cpu"
    )  # shares on CPU time, the clock of the term timings on CPU
    assert t["svd_share"] == pytest.approx(t["svd"] / res["b"]["step_cpu_s"])
    paired = res["b"]["paired"]  # interleaved (a) and (b) steps: the median of the per-pair ratios
    assert len(paired["a_cpu_s"]) == len(paired["b_cpu_s"]) == 2
    assert paired["b/a_cpu"] == pytest.approx(
        statistics.median(b / a for a, b in zip(paired["a_cpu_s"], paired["b_cpu_s"]))
    )
    # (p): the precomputed reference — no snapshot adapter, its own interleaved pairs, and the precompute's cost
    assert res["p"]["last"]["consistency"] > -1e-6 and "diversity" in res["p"]["last"]  # ~0 up to rounding
    assert len(res["p"]["paired"]["a_cpu_s"]) == 2
    pre = doc["precompute"]
    assert pre["tokens"] == 48 and pre["rows"] == 2 * (24 - 6) and pre["top_k"] == 128
    assert pre["epochs_to_pay_back"] == pytest.approx(
        pre["s_per_token"] / (t["reference_forward"] / res["b"]["tokens"])
    )
    assert "pays back after" in table
    g = doc["regularizers"]
    assert (g["rows"], g["vocab"], g["hidden"]) == (48, 300, 32)
    assert g["fused/plain"] == pytest.approx(g["fused_peak_bytes"] / g["plain_peak_bytes"])
    assert g["softcap"] == 30.0 and g["softcap_fused_peak_bytes"] > 0
    assert set(doc["targets"]) == set(bench.TARGETS) - {FOUR_BIT_TARGET} and "four_bit" not in doc
    # (a) and (b) again in bf16: one timed step each, their own ratio
    bf16 = doc["dtypes"]["bf16"]
    assert set(bf16["variants"]) == {"a", "b"} and doc["meta"]["also_dtype"] == "bf16"
    assert all(len(r["step_s_all"]) == 1 and r["dtype"] == "bf16" for r in bf16["variants"].values())
    assert bf16["ratios"]["peak_memory"]["b/a"] == pytest.approx(
        bf16["variants"]["b"]["peak_mem_bytes"] / bf16["variants"]["a"]["peak_mem_bytes"]
    )
    assert "(a) and (b) in bf16" in table
    # NLU: the cached variant ran the reference once per example (the warm-up step), then only hit the cache
    nlu = doc["nlu"]
    assert set(nlu["variants"]) == set(bench.NLU_VARIANTS)
    cache = nlu["variants"]["b_cache"]["cache"]
    assert (cache["examples"], cache["misses"], cache["hits"]) == (6, 6, 2 * 6)
    assert nlu["ratios"]["step_cpu_time"]["b_cache/b"] == pytest.approx(
        nlu["variants"]["b_cache"]["step_cpu_s"] / nlu["variants"]["b"]["step_cpu_s"]
    )
    for key in ("consistency", "diversity", "svd"):  # the cache changes no value
        assert nlu["variants"]["b_cache"]["last"][key] == pytest.approx(
            nlu["variants"]["b"]["last"][key], rel=1e-5
        )
    # (b) and (c) compute the same three terms (same weights, same micro-batch; the masks differ by one shift)
    b, c = res["b"]["last"], res["c"]["last"]
    assert b["rows"] == 2 * (24 - int(0.25 * 24))  # shifted mask: positions whose next token is labelled
    assert b["diversity"] == pytest.approx(c["diversity"], rel=0.05)


def test_bench_four_bit_rows(tmp_path, capsys):
    """The 4-bit section: (a) QPiSSA, (b) BA-LoRA and (c) the authors' approach on the same bitsandbytes base
    (width 64: bitsandbytes' CPU block size): its document, ratios, target and table."""
    pytest.importorskip("bitsandbytes")
    path = tmp_path / "bench.json"
    args = [*TINY[: TINY.index("--no-qlora")], "--hidden", "64", "--intermediate", "128"]
    args += ["--only-qlora", "--json", str(path)]
    assert bench.main(args) == 0
    table = capsys.readouterr().out
    doc = json.loads(path.read_text())
    q4 = doc["four_bit"]
    assert set(q4["variants"]) == {"a", "b", "c"} and doc["variants"] == {} and "nlu" not in doc
    for pair in ("b/a", "c/a", "c/b"):
        x, y = pair.split("/")
        assert q4["ratios"]["peak_memory"][pair] == pytest.approx(
            q4["variants"][x]["peak_mem_bytes"] / q4["variants"][y]["peak_mem_bytes"], rel=1e-12
        )
    # (no ordering of the peaks is asserted: at this size the second model is a few hundred KB, noise-level)
    assert q4["variants"]["b"]["last"]["consistency"] == pytest.approx(0.0, abs=1e-6)  # step-0 reference
    assert doc["targets"][FOUR_BIT_TARGET]["value"] == q4["ratios"]["peak_memory"]["b/a"]
    assert "4-bit base: bitsandbytes nf4" in table and f"(b) {bench.Q4_VARIANTS['b']}" in table


def test_targets_and_ratio_arithmetic():
    assert bench.ratio(3.0, 2.0) == 1.5 and bench.ratio(None, 2.0) is None and bench.ratio(1.0, 0.0) is None
    results = {
        "a": {"step_s": 10.0, "step_cpu_s": 10.0, "peak_mem_bytes": 1000, "rss_growth_bytes": None},
        "b": {"step_s": 16.0, "step_cpu_s": 15.0, "peak_mem_bytes": 1150, "rss_growth_bytes": None,
              "paired": {"b/a": 1.6, "b/a_cpu": 1.45},
              "terms": {"consistency": 4.0, "reference_forward": 3.0, "kl_rows": 1.0, "diversity": 0.5,
                        "fused_rows": 1.2, "svd": 0.81, "gram_factor_s": 0.1}},
        "c": {"step_s": 20.0, "peak_mem_bytes": 1720, "rss_growth_bytes": None},
        "p": {"step_s": 11.2, "step_cpu_s": 11.0, "peak_mem_bytes": 1021, "rss_growth_bytes": None,
              "paired": {"b/a": 1.1, "b/a_cpu": 1.13}, "clock": "cpu",
              "precompute": {"seconds": 2.0, "cpu_seconds": 1.5, "tokens": 1000, "rows": 700, "top_k": 64,
                             "bytes": 7000}},
    }  # fmt: skip
    results["b"]["tokens"] = 100
    regs = {"fused_peak_bytes": 125, "plain_peak_bytes": 1000, "fused_kl_s": 1.0, "fused_svd_s": 0.2}
    dtypes = {
        "bf16": {"a": {"step_s": 5.0, "peak_mem_bytes": 500}, "b": {"step_s": 8.0, "peak_mem_bytes": 551}}
    }
    nlu = {
        "a": {"step_s": 2.0, "step_cpu_s": 2.0},
        "b": {"step_s": 3.0},
        "b_cache": {"step_s": 2.2, "step_cpu_s": 2.3},
    }
    doc = bench.summarise(results, regs, {}, dtypes, nlu)
    assert doc["ratios"]["step_time"] == pytest.approx(
        {"b/a": 1.6, "c/a": 2.0, "c/b": 1.25, "p/a": 1.12, "p/b": 0.7, "c/p": 20 / 11.2}
    )
    pre = doc["precompute"]  # CPU seconds per token against (b)'s reference forward per token: 1.5e-3 / 3e-2
    assert (pre["clock"], pre["s_per_token"], pre["epochs_to_pay_back"]) == (
        "cpu",
        1.5e-3,
        pytest.approx(0.05),
    )
    assert doc["ratios"]["peak_memory"]["c/b"] == pytest.approx(1720 / 1150)
    assert doc["nlu"]["ratios"]["step_time"] == pytest.approx(
        {"b/a": 1.5, "b_cache/a": 1.1, "b_cache/b": 2.2 / 3}
    )
    met = {k: v["met"] for k, v in doc["targets"].items()}
    assert met == {
        "step time b/a <= 1.5": False,  # 1.6
        "step CPU time b/a <= 1.5": True,
        "step CPU time b/a <= 1.5, (a)/(b) steps interleaved (contention-robust)": True,
        "peak memory b/a <= 1.10": False,  # 1.15
        "peak memory b/a <= 1.10 at bf16": False,  # 1.102
        "peak memory c/b >= 1.5": False,  # 1.496
        "step time p/a <= 1.12 (precomputed reference)": True,  # 1.12, inclusive
        "step CPU time p/a <= 1.12, (a)/(p) steps interleaved (contention-robust)": False,  # 1.13
        "peak memory p/a <= 1.02 (no snapshot adapter)": False,  # 1.021
        "peak memory c/p >= 1.5": True,  # 1.68
        "SVD term <= 5% of (b) step": False,  # 0.81 / 16 = 5.06 %
        "regularizer memory fused/plain < 1/8": False,  # strict
        "SVD term < KL term (fused)": True,
        "NLU step time with the reference cache b/a <= 1.1": True,  # bounds are inclusive where they say <=
        "NLU step CPU time with the reference cache b/a <= 1.1 (contention-robust)": False,  # 1.15
    }
    assert doc["terms"]["shares"]["consistency"] == 0.25


def test_peak_from_profiler_trace_counts_live_tensor_bytes():
    meter = bench.MemoryMeter("cpu")
    meter.start()
    a = torch.ones(1 << 20)  # 4 MiB
    b = torch.ones(2 << 20)  # 8 MiB -> 12 MiB live
    del a
    c = torch.ones(1 << 20)  # 12 MiB again, not more
    del b, c
    peak = meter.stop()
    assert 12 << 20 <= peak < (12 << 20) + (1 << 16)


# ---------------------------------------------------------------------------------------------- the fast path
HEADS = {"plain": {}, "bias+scale": {"bias": True, "scale": 1.7}, "softcap": {"softcap": 4.0}}


@pytest.mark.parametrize("top_k", [5, 0])
@pytest.mark.parametrize("kind", list(HEADS))
def test_closed_form_kernels_equal_the_autograd_path(kind, top_k):
    """The KL / top-K entropy kernels the objective runs give the functional values and autograd's gradients."""
    g = torch.Generator().manual_seed(len(kind) + top_k)
    m, d, v, t = 11, 6, 40, 2.0
    h, w = torch.randn(m, d, generator=g), torch.randn(v, d, generator=g)
    h_ref = h + 0.3 * torch.randn(m, d, generator=g)
    opts = dict(HEADS[kind])
    head = OutputHead(weight=w, bias=torch.randn(v, generator=g) if opts.pop("bias", False) else None, **opts)
    weights = [0.3, -0.7]
    h1, h2 = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    fast, fast_sums = chunked_row_terms(h1, h_ref, head, [KLRows(t), NegEntropyRows(top_k)], weights, 4)
    autograd_fns = [lambda z, zr: Fn.kl_rows(z, zr, t), lambda z, zr: -Fn.entropy_rows(z, top_k)]
    slow, _ = chunked_row_terms(h2, h_ref, head, autograd_fns, weights, 4)
    z, zr = head.logits(h), head.logits(h_ref)
    expected = torch.stack([Fn.kl_rows(z, zr, t).sum(), -Fn.entropy_rows(z, top_k).sum()])
    torch.testing.assert_close(fast_sums, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    (1.5 * fast).backward()
    (1.5 * slow).backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-5 * float(h2.grad.abs().max()))


def test_terms_offer_their_own_kernels_only_for_their_own_formulas():
    cfg = BALoRAConfig.from_preset("iclr2026-nlg")
    assert isinstance(Consistency(cfg).row_kernel(), KLRows)
    assert isinstance(EntropyDiversity(cfg).row_kernel(), NegEntropyRows)
    mse = Consistency(BALoRAConfig.from_preset("v5-nlu"))
    assert not isinstance(mse.row_kernel(), KLRows)  # the MSE consistency keeps its autograd path
    plain = Term(name="x")
    assert plain.row_kernel() == plain.rows  # the default: the term's own rows, through autograd

    class Custom(Consistency):
        def rows(self, logits, ref_logits):
            return super().rows(logits, ref_logits) * 2

    term = Custom(cfg)
    assert term.row_kernel() == term.rows  # a subclass's own formula is honoured


def test_merged_snapshot_forward_equals_the_lora_path_and_restores():
    """The reference forward's one-matmul projections give the LoRA path's hidden states, only where cheaper."""
    from conftest import batch, lora, tiny_llama

    from balora_plugins.core import reference as ref

    model = lora(tiny_llama(), init="pissa", r=4, alpha=8)
    ref.add_snapshot_adapter(model)
    with torch.no_grad():  # move the trained adapter: the reference must not follow it
        for n, p in model.named_parameters():
            if ".default." in n:
                p.add_(0.05 * torch.randn_like(p))
    inputs = {k: v for k, v in batch(b=2, t=12).items() if k != "labels"}  # 24 tokens > d·d_out/(d+d_out)
    with ref.reference_mode(model, "adapter_snapshot"):
        expected = model(**inputs).logits
        with ref.merged_snapshot_forward(model) as n:
            got = model(**inputs).logits
            small = model(input_ids=inputs["input_ids"][:1, :4]).logits  # 4 tokens: the LoRA path
        assert n == 2 * 7  # every projection of both layers
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, expected)  # computed differently (one matmul), not the LoRA path again
    with ref.reference_mode(model, "adapter_snapshot"):
        torch.testing.assert_close(small, model(input_ids=inputs["input_ids"][:1, :4]).logits, rtol=0, atol=0)
    assert not any("forward" in m.__dict__ for m in model.modules())  # restored
    with torch.no_grad():
        student = model(**inputs).logits
    assert (student - got).abs().max() > 1e-3  # outside the context the trained adapter is used again
    with ref.merged_snapshot_forward(model) as n:  # not in reference mode: the default adapter is active
        assert n == 0
