"""The results document (ratios, targets) and the terminal table."""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Any

from .args import NLU_VARIANTS, Q4_VARIANTS, VARIANTS, dtype_name
from .build import balora_config, model_shape, nlu_shape

# The project's targets, defined on the default CPU configuration: label -> (path of the figure in the JSON
# document, comparison, bound). Wall-time ratios depend on what else runs on the machine, and so, less, do CPU
# times (shared cores and caches); the ratio of (a) and (b) steps interleaved in one process is the robust one.
TARGETS: dict[str, tuple[tuple[str, ...], str, float]] = {
    "step time b/a <= 1.5": (("ratios", "step_time", "b/a"), "<=", 1.5),
    "step CPU time b/a <= 1.5": (("ratios", "step_cpu_time", "b/a"), "<=", 1.5),
    "step CPU time b/a <= 1.5, (a)/(b) steps interleaved (contention-robust)": (
        ("variants", "b", "paired", "b/a_cpu"),
        "<=",
        1.5,
    ),
    "peak memory b/a <= 1.10": (("ratios", "peak_memory", "b/a"), "<=", 1.10),
    "peak memory b/a <= 1.10 at bf16": (("dtypes", "bf16", "ratios", "peak_memory", "b/a"), "<=", 1.10),
    "peak memory c/b >= 1.5": (("ratios", "peak_memory", "c/b"), ">=", 1.5),
    "SVD term <= 5% of (b) step": (("terms", "svd_share"), "<=", 0.05),
    "step time p/a <= 1.12 (precomputed reference)": (("ratios", "step_time", "p/a"), "<=", 1.12),
    "step CPU time p/a <= 1.12, (a)/(p) steps interleaved (contention-robust)": (
        ("variants", "p", "paired", "b/a_cpu"),
        "<=",
        1.12,
    ),
    "peak memory p/a <= 1.02 (no snapshot adapter)": (("ratios", "peak_memory", "p/a"), "<=", 1.02),
    "peak memory c/p >= 1.5": (("ratios", "peak_memory", "c/p"), ">=", 1.5),
    "regularizer memory fused/plain < 1/8": (("regularizers", "fused/plain"), "<", 0.125),
    "SVD term < KL term (fused)": (("regularizers", "svd/kl"), "<", 1.0),
    "4-bit base (QPiSSA): peak memory b/a <= 1.10": (
        ("four_bit", "ratios", "peak_memory", "b/a"),
        "<=",
        1.10,
    ),
    "NLU step time with the reference cache b/a <= 1.1": (
        ("nlu", "ratios", "step_time", "b_cache/a"),
        "<=",
        1.1,
    ),
    "NLU step CPU time with the reference cache b/a <= 1.1 (contention-robust)": (
        ("nlu", "ratios", "step_cpu_time", "b_cache/a"),
        "<=",
        1.1,
    ),
}
PAIRS = ("b/a", "c/a", "c/b", "p/a", "p/b", "c/p")
_COMPARE = {"<=": lambda v, b: v <= b, ">=": lambda v, b: v >= b, "<": lambda v, b: v < b}
_METRICS = (
    ("step_time", "step_s"),
    ("step_cpu_time", "step_cpu_s"),
    ("peak_memory", "peak_mem_bytes"),
    ("rss_growth", "rss_growth_bytes"),
)


def ratio(x: float | None, y: float | None) -> float | None:
    """x / y, or None when either is missing or y is not positive."""
    if x is None or y is None or not y > 0:
        return None
    return x / y


def ratios(results: dict[str, dict[str, Any]], pairs: tuple[str, ...]) -> dict[str, dict[str, float | None]]:
    """``{metric: {"x/y": ratio}}`` for the variant pairs ``pairs`` (e.g. ``"b/a"``) of ``results``."""

    def get(v, key):
        return results.get(v, {}).get(key)

    out: dict[str, dict[str, float | None]] = {}
    for metric, key in _METRICS:
        out[metric] = {p: ratio(get(p.split("/")[0], key), get(p.split("/")[1], key)) for p in pairs}
    return out


def summarise(
    results: dict[str, dict[str, Any]],
    regs: dict[str, Any] | None,
    meta: dict[str, Any],
    dtypes: dict[str, dict[str, dict[str, Any]]] | None = None,
    nlu: dict[str, dict[str, Any]] | None = None,
    four_bit: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The JSON document: per-variant medians, the ratios b/a, c/a, c/b, (b)'s terms, the regularizers alone,
    (a) and (b) in other dtypes (``dtypes``: dtype -> variant -> results), the NLU variants, the variants on a
    4-bit QPiSSA base (``four_bit``), the targets."""
    doc: dict[str, Any] = {
        "meta": meta,
        "variants": results,
        "ratios": ratios(results, PAIRS),
    }
    pre = results.get("p", {}).get("precompute")
    if pre:  # the precompute's cost per token against (b)'s reference forward per token, on the terms' clock
        cpu = results["p"].get("clock") == "cpu"
        per_token = (pre["cpu_seconds"] if cpu else pre["seconds"]) / max(pre["tokens"], 1)
        forward = (results.get("b", {}).get("terms") or {}).get("reference_forward")
        forward_per_token = ratio(forward, results["b"].get("tokens")) if forward is not None else None
        doc["precompute"] = {
            **pre,
            "clock": "cpu" if cpu else "wall",
            "s_per_token": per_token,
            "reference_forward_s_per_token": forward_per_token,
            "epochs_to_pay_back": ratio(per_token, forward_per_token),
        }
    terms = results.get("b", {}).get("terms")
    if terms:
        b = results["b"]
        step_b = b.get("step_cpu_s" if b.get("clock") == "cpu" else "step_s")
        terms = {**terms, "clock": b.get("clock")}
        doc["terms"] = {
            **terms,
            "shares": {
                k: ratio(terms[k], step_b)
                for k in ("consistency", "reference_forward", "kl_rows", "diversity", "fused_rows", "svd")
            },
            "svd_share": ratio(terms["svd"], step_b),
        }
    if regs:
        doc["regularizers"] = {
            **regs,
            "fused/plain": ratio(regs["fused_peak_bytes"], regs["plain_peak_bytes"]),
            "svd/kl": ratio(regs["fused_svd_s"], regs["fused_kl_s"]),
        }
    if dtypes:
        doc["dtypes"] = {d: {"variants": r, "ratios": ratios(r, ("b/a",))} for d, r in dtypes.items()}
    if nlu:
        doc["nlu"] = {"variants": nlu, "ratios": ratios(nlu, ("b/a", "b_cache/a", "b_cache/b"))}
    if four_bit:
        doc["four_bit"] = {"variants": four_bit, "ratios": ratios(four_bit, ("b/a", "c/a", "c/b"))}
    doc["targets"] = check_targets(doc)
    return doc


def check_targets(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{label: {"value", "met"}}`` for every target whose figure this run measured."""
    out = {}
    for label, (path, op, bound) in TARGETS.items():
        value: Any = doc
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            out[label] = {"value": value, "met": bool(_COMPARE[op](value, bound))}
    return out


def _mib(b: int | None) -> str:
    return "—" if b is None else f"{b / 2**20:,.0f}"


def _x(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}×"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:6.1%}"


def _variant_rows(res: dict[str, dict[str, Any]], names: dict[str, str]) -> list[str]:
    lines = [f"{'variant':<58} {'step s':>8} {'CPU s':>8} {'peak MiB':>9} {'RSS MiB':>8}"]
    for v in names:
        if v in res:
            r = res[v]
            lines.append(
                f"({v}) {r['name']:<{54 - len(v)}} {r['step_s']:>8.2f} {r['step_cpu_s']:>8.2f} "
                f"{_mib(r['peak_mem_bytes']):>9} {_mib(r['rss_growth_bytes']):>8}"
            )
    return lines


def _ratio_rows(rat: dict[str, dict[str, float | None]], pairs: tuple[str, ...]) -> list[str]:
    lines = [f"{'ratio':<12} {'step time':>10} {'CPU time':>10} {'peak mem':>10} {'RSS':>8}"]
    for k in pairs:
        lines.append(
            f"{k:<12} {_x(rat['step_time'][k]):>10} {_x(rat['step_cpu_time'][k]):>10} "
            f"{_x(rat['peak_memory'][k]):>10} {_x(rat['rss_growth'][k]):>8}"
        )
    return lines


def format_table(doc: dict[str, Any]) -> str:
    """The terminal table of a :func:`summarise` document."""
    meta, res, rat = doc["meta"], doc["variants"], doc["ratios"]
    lines = [
        f"balora bench — {meta['model']} · {meta['tokens']} tokens/micro-batch ({meta['batch']}×{meta['seq_len']}) · "
        f"r=α={meta['rank']} · {meta['device']} {meta['dtype']} · {meta['threads']} thread(s) · "
        f"median of {meta['steps']} steps after {meta['warmup']} warm-up",
    ]
    if res:  # not with --only-qlora
        lines += [
            "",
            *_variant_rows(res, VARIANTS),
            "",
            *_ratio_rows(rat, tuple(p for p in PAIRS if all(v in res for v in p.split("/")))),
        ]
    for v in ("b", "p"):
        paired = res.get(v, {}).get("paired")
        if paired:
            lines.append(
                f"{v + '/a':<12} {_x(paired['b/a']):>10} {_x(paired['b/a_cpu']):>10}   (a) and ({v}) steps interleaved "
                f"in one process, median of {len(paired['a_s'])} pairs"
            )
    if "precompute" in doc:
        pre = doc["precompute"]
        per_k = (
            None
            if pre["reference_forward_s_per_token"] is None
            else 1e3 * pre["reference_forward_s_per_token"]
        )
        lines += [
            "",
            f"(p)'s precompute (`balora reference`, k={pre['top_k']}): {1e3 * pre['s_per_token']:.3f} {pre['clock']} s per "
            f"1k tokens, {pre['bytes'] / max(pre['rows'], 1):,.0f} bytes per stored position; (b)'s reference "
            f"forward: "
            + ("—" if per_k is None else f"{per_k:.3f} s per 1k tokens")
            + (
                ""
                if pre["epochs_to_pay_back"] is None
                else f" -> pays back after {pre['epochs_to_pay_back']:.2f} epochs"
            ),
        ]
    for dtype, sec in doc.get("dtypes", {}).items():
        lines += ["", f"(a) and (b) in {dtype} (peak memory of the first step; one timed step):"]
        lines += _variant_rows(sec["variants"], VARIANTS) + _ratio_rows(sec["ratios"], ("b/a",))
    if "terms" in doc:
        t = doc["terms"]
        lines += [
            "",
            f"terms inside (b), forward + gradient w.r.t. the hidden rows ({t['clock']} s)   seconds   share of (b) step",
        ]
        for key, label in (
            ("consistency", "consistency (reference forward + chunked KL)"),
            ("reference_forward", "  of which reference forward"),
            ("kl_rows", "  of which chunked KL"),
            ("diversity", "diversity (chunked top-K entropy)"),
            ("svd", "SVD share (Gram factor, cached)"),
            ("fused_rows", "consistency + diversity in one chunked pass (as run)"),
        ):
            lines.append(f"{label:<66} {t[key]:>7.3f}   {_pct(t['shares'][key])}")
        lines.append(f"{'Gram factor (once per head, cached)':<66} {t['gram_factor_s']:>7.3f}")
    if "regularizers" in doc:
        g = doc["regularizers"]
        lines += [
            "",
            f"regularizers alone, M={g['rows']} rows, |V|={g['vocab']}, d={g['hidden']}, chunk {g['chunk_size']}:",
            f"  extra peak memory: fused {_mib(g['fused_peak_bytes'])} MiB vs plain logits {_mib(g['plain_peak_bytes'])}"
            f" MiB ({_x(g['fused/plain'])})",
            f"  KL term ({g['clock']} s): fused {g['fused_kl_s']:.3f}, plain {g['plain_kl_s']:.3f}; "
            f"SVD term: fused {g['fused_svd_s']:.3f}, plain (randomised) {g['plain_svd_s']:.3f}",
        ]
        if "softcap" in g:
            lines.append(
                f"  soft-capped head (cap {g['softcap']:g}), SVD term with gradient: fused (exact, M×M Gram) "
                f"{g['softcap_fused_svd_s']:.3f} s, {_mib(g['softcap_fused_peak_bytes'])} MiB; plain logits "
                f"(randomised) {g['softcap_plain_svd_s']:.3f} s, {_mib(g['softcap_plain_peak_bytes'])} MiB"
            )
    if "nlu" in doc:
        nlu, m = doc["nlu"], meta.get("nlu", {})
        lines += [
            "",
            f"NLU: {m.get('model', 'classifier')} · {m.get('batch')}×{m.get('seq_len')} tokens · r={m.get('rank')} · "
            "iclr2026-nlu; b_cache timed from the second epoch",
            *_variant_rows(nlu["variants"], NLU_VARIANTS),
            *_ratio_rows(nlu["ratios"], ("b/a", "b_cache/a", "b_cache/b")),
        ]
        cache = nlu["variants"].get("b_cache", {}).get("cache")
        if cache:
            lines.append(
                f"  reference cache: {cache['examples']} examples, {cache['bytes']:,} bytes of logits, "
                f"{cache['hits']} hits, {cache['misses']} misses"
            )
    if "four_bit" in doc:
        lines += [
            "",
            f"4-bit base: bitsandbytes nf4 (compute {meta['dtype']}), QPiSSA r=α={meta['rank']}, same micro-batch; "
            "(c)'s second model is the full-precision pre-trained one",
            *_variant_rows(doc["four_bit"]["variants"], Q4_VARIANTS),
            *_ratio_rows(doc["four_bit"]["ratios"], ("b/a", "c/a", "c/b")),
        ]
    b, c = res.get("b", {}).get("last"), res.get("c", {}).get("last")
    if b and c:
        lines += [
            "",
            "term values, same maths (b: shifted mask, exact SVD; c: unshifted mask, randomised SVD):",
        ]
        lines.append(
            "  " + ", ".join(f"{k} {b[k]:.5g} vs {c[k]:.5g}" for k in ("consistency", "diversity", "svd"))
        )
    if doc["targets"]:
        lines += ["", "targets (defined on the default CPU configuration):"]
        for label, t in doc["targets"].items():
            v = t["value"]
            shown = f"{v:.1%}" if "%" in label else f"{v:.3f}"
            lines.append(f"  [{'met' if t['met'] else 'MISSED'}] {label}: {shown}")
    return "\n".join(lines)


def meta(args: argparse.Namespace) -> dict[str, Any]:
    """What was measured, on what, when (the document's ``meta``)."""
    import torch

    s = model_shape(args)
    model = args.model or (
        f"random {args.shape} (d={s['hidden']}, {s['layers']} layers, {s['heads']}/{s['kv_heads']} heads, "
        f"ffn {s['intermediate']}, |V|={s['vocab']}, tied)"
    )
    n = nlu_shape(args)
    return {
        "model": model,
        "shape": s,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "tokens": args.batch * args.seq_len,
        "prompt_frac": args.prompt_frac,
        "rank": args.rank,
        "alpha": args.alpha if args.alpha is not None else args.rank,
        "chunk_size": balora_config(args).chunk_size,
        "device": args.device,
        "dtype": dtype_name(args),
        "threads": args.threads or torch.get_num_threads(),
        "warmup": args.warmup,
        "steps": args.steps,
        "in_process": bool(args.in_process),
        "nlu": {
            "model": f"random BERT (d={n['hidden']}, {n['layers']} layers, |V|={n['vocab']}, {n['classes']} classes)",
            "shape": n,
            "batch": args.nlu_batch,
            "seq_len": args.nlu_seq_len,
            "rank": args.nlu_rank,
        },
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "memory": "peak live tensor bytes above the built PiSSA model (CUDA allocator / torch.profiler trace on CPU); "
        "RSS = growth of the process's peak RSS (subprocess runs only)",
    }
