"""The variants: (a), (b), (c) on the causal LM, in the main dtype and in a second one; (a), (b) and (b) with the
reference cache on the classifier; the per-term timings of (b)."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from typing import Any

from .args import NLU_VARIANTS, Q4_VARIANTS, VARIANTS, dtype_name, log
from .build import (
    add_pissa,
    add_qpissa,
    balora_config,
    build_classifier,
    build_model,
    make_batch,
    make_nlu_batch,
    nlu_shape,
)
from .measure import MemoryMeter, time_steps, timed


def authors_regularizer(student_logits, ref_logits, labels, cfg) -> tuple[Any, dict[str, float]]:
    """The three NLG terms as ``llm172/BA-LoRA`` ``train.py`` computes them, on full (B, T, V) logits.

    Mask ``labels != -100`` without the next-token shift; tempered KL on every position, masked afterwards;
    top-K entropy of the masked rows; SVD share with ``torch.svd_lowrank(q=k+5, niter=2)`` when |V| > 4096 and
    k < min(M, V), over the Frobenius norm (exact ``svdvals`` otherwise).
    """
    import torch
    import torch.nn.functional as F

    metrics: dict[str, float] = {}
    total = student_logits.new_zeros((), dtype=torch.float32)
    t = cfg.temperature
    log_p_ft = F.log_softmax(student_logits / t, dim=-1)
    p_pt = F.softmax(ref_logits / t, dim=-1)
    kl_mask = (labels != -100).unsqueeze(-1)
    kl = (F.kl_div(log_p_ft, p_pt, reduction="none", log_target=False).sum(-1) * kl_mask.squeeze(-1)).sum()
    kl = kl / kl_mask.sum().clamp_min(1) * (t * t)
    total = total + cfg.lambda_consistency * kl
    metrics["consistency"] = float(kl.detach())

    mask = labels != -100
    valid = student_logits[mask]
    k_ent = min(cfg.diversity_top_k, valid.size(-1)) if cfg.diversity_top_k > 0 else valid.size(-1)
    top = torch.topk(valid, k_ent, dim=-1).values
    logp = F.log_softmax(top, dim=-1)
    ent = -(torch.exp(logp) * logp).sum(-1)
    total = total + cfg.lambda_diversity * (-ent.mean())
    metrics["diversity"] = float(-ent.mean().detach())

    valid = student_logits.view(-1, student_logits.size(-1))[mask.view(-1)]
    k = min(cfg.svd_top_k, min(valid.shape))
    if valid.shape[-1] > 4096 and k < min(valid.shape):
        q = min(min(valid.shape), k + 5)
        _, s, _ = torch.svd_lowrank(valid.float(), q=q, niter=2)
        top_sv = s[:k].sum()
        norm = torch.linalg.matrix_norm(valid.float(), ord="fro")
    else:
        s = torch.linalg.svdvals(valid.float())
        top_sv = s[:k].sum()
        norm = torch.sqrt((s * s).sum())
    svd = -(top_sv / norm)
    total = total + cfg.lambda_svd * svd
    metrics["svd"] = float(svd.detach())
    return total, metrics


def run_variant(
    variant: str, args: argparse.Namespace, dtype: str | None = None, *, four_bit: bool = False
) -> dict[str, Any]:
    """Build, warm up and time one NLG variant in this process (in ``dtype``, default the main dtype); returns its
    measurements, with (b)'s per-term timings in the main dtype. ``four_bit``: the base is loaded in 4 bits
    with QPiSSA (:func:`~.build.add_qpissa`); (c)'s second model stays full precision, as the authors load it."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = dtype or dtype_name(args)
    tag = ("4-bit " if four_bit else "") + (variant if dtype == dtype_name(args) else f"{variant}, {dtype}")
    say = lambda msg: log(args, f"({tag}) {msg}")  # noqa: E731
    t_build = time.perf_counter()
    base = build_model(args, dtype)
    vocab, hidden = base.get_output_embeddings().weight.shape
    n_params = sum(p.numel() for p in base.parameters())
    model = add_qpissa(base, args, dtype) if four_bit else add_pissa(base, args)
    del base  # 4 bits: only the quantised model stays (add_pissa wrapped the base in place)
    batch = make_batch(args, vocab)
    say(
        f"model ready in {time.perf_counter() - t_build:.1f} s ({n_params / 1e6:.1f}M "
        f"params, {args.batch}×{args.seq_len} tokens, r={args.rank}); measuring memory"
    )
    # (p)'s precompute runs before the meter starts: it is not part of training
    store = precompute_store(args, dtype, batch, say) if variant == "p" else None
    meter = MemoryMeter(args.device)
    meter.start()
    cfg = balora_config(args)
    objective = ref_model = None
    if variant in ("b", "p"):
        from balora_plugins.core import BALoRAObjective

        if store is not None:
            cfg = balora_config(args, reference="precomputed", reference_path=store["path"])
        objective = BALoRAObjective(cfg).prepare(model)
    elif variant == "c":
        ref_model = build_model(args, dtype).requires_grad_(False)  # same seed: the pre-trained weights
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    last: dict[str, float] = {}

    def step() -> None:
        out = model(**batch)
        loss = out.loss
        if objective is not None:
            reg, metrics = objective.compute(model, batch)
            loss = loss + reg.to(loss.dtype)
            last.update(
                {k.split("/", 1)[1]: v for k, v in metrics.items() if not k.startswith("balora/lambda")}
            )
        elif variant == "c":
            with torch.no_grad():
                ref_logits = ref_model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
            reg, metrics = authors_regularizer(out.logits, ref_logits, batch["labels"], cfg)
            loss = loss + reg.to(loss.dtype)
            last.update(metrics)
            del ref_logits
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        last["loss"] = float(loss.detach())

    main = dtype == dtype_name(args)
    warmup, steps = (args.warmup, args.steps) if main else (1, 1)  # a second dtype: its memory and one step
    result: dict[str, Any] = {
        "variant": variant,
        "name": (Q4_VARIANTS if four_bit else VARIANTS)[variant],
        "dtype": dtype,
        **time_steps(step, meter, warmup, steps, args.device, say),
        "last": last,
        "vocab": vocab,
        "hidden": hidden,
        "tokens": args.batch * args.seq_len,
    }
    if variant in ("b", "p") and main and not four_bit:
        result["paired"] = paired_steps(model, objective, batch, opt, args, say)
    if variant == "b" and main:
        result["terms"] = term_timings(model, objective, batch, args, say)
    if store is not None:
        result["precompute"] = {k: v for k, v in store.items() if k != "path"}
        shutil.rmtree(store["path"], ignore_errors=True)
    return result


def precompute_store(args: argparse.Namespace, dtype: str, batch: dict[str, Any], say) -> dict[str, Any]:
    """Step 1 of (p): the untouched pre-trained model (built again with the same seed) runs once over the
    micro-batch's sequences, as ``balora reference`` runs over a dataset; returns the store's folder (removed when
    the variant is done) and the precompute's cost (wall and CPU seconds, tokens, bytes on disk)."""
    import gc
    import tempfile

    from balora_plugins.core import DEFAULT_TOP_K, precompute_reference

    from .measure import sync

    reference = build_model(args, dtype).requires_grad_(False)
    rows = [
        {"input_ids": ids[m.bool()].tolist(), "labels": lab[m.bool()].tolist()}
        for ids, lab, m in zip(batch["input_ids"], batch["labels"], batch["attention_mask"])
    ]
    folder = tempfile.mkdtemp(prefix="balora-bench-reference-")
    cfg = balora_config(args)
    sync(args.device)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    manifest = precompute_reference(
        reference,
        rows,
        folder,
        top_k=args.top_k or DEFAULT_TOP_K,
        temperatures=[cfg.consistency_temperature],
        batch_size=args.batch,
        progress=False,
    )
    sync(args.device)
    out = {
        "path": folder,
        "seconds": time.perf_counter() - wall0,
        "cpu_seconds": time.process_time() - cpu0,
        "tokens": manifest["tokens"],
        "rows": manifest["rows"],
        "top_k": manifest["top_k"],
        "bytes": sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)),
    }
    say(f"precomputed the reference ({out['rows']} rows, k={out['top_k']}) in {out['seconds']:.2f} s")
    del reference
    gc.collect()
    return out


def paired_steps(model, objective, batch, opt, args, say) -> dict[str, Any]:
    """``--steps`` pairs of one (a) step and one (b) step, alternated on (b)'s model in this process.

    The two steps of a pair see the same load from other processes, so the median of the per-pair ratios b/a is
    robust to a machine whose load drifts between the variants' processes (the (a) step runs on the model with
    the snapshot adapter present but unused: the same computation as variant (a)).
    """
    from .measure import sync

    def step(regularized: bool) -> None:
        loss = model(**batch).loss
        if regularized:
            loss = loss + objective.compute(model, batch)[0].to(loss.dtype)
        else:
            objective.release_capture()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out: dict[str, list[float]] = {k: [] for k in ("a_s", "b_s", "a_cpu_s", "b_cpu_s")}
    for i in range(args.steps):
        for kind in ("a", "b"):
            sync(args.device)
            wall0, cpu0 = time.perf_counter(), time.process_time()
            step(kind == "b")
            sync(args.device)
            out[f"{kind}_s"].append(time.perf_counter() - wall0)
            out[f"{kind}_cpu_s"].append(time.process_time() - cpu0)
        say(
            f"pair {i + 1}/{args.steps}: a {out['a_s'][-1]:.2f} s (CPU {out['a_cpu_s'][-1]:.2f}), "
            f"b {out['b_s'][-1]:.2f} s (CPU {out['b_cpu_s'][-1]:.2f})"
        )
    return {
        **out,
        "b/a": statistics.median(b / a for a, b in zip(out["a_s"], out["b_s"])),
        "b/a_cpu": statistics.median(b / a for a, b in zip(out["a_cpu_s"], out["b_cpu_s"])),
    }


def run_nlu_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """One NLU variant: (a) the classifier's cross-entropy, (b) + the ``iclr2026-nlu`` terms, (b_cache) the same
    with ``reference_cache=True``. The micro-batch repeats, so from the second step on (the timed ones, after the
    warm-up that also measures memory) every example has been seen: the cache's second and later epochs."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    say = lambda msg: log(args, f"(NLU {variant}) {msg}")  # noqa: E731
    t_build = time.perf_counter()
    shape = nlu_shape(args)
    base = build_classifier(args)
    model = add_pissa(base, args, task="nlu")
    batch = make_nlu_batch(args, shape["vocab"], shape["classes"])
    say(
        f"model ready in {time.perf_counter() - t_build:.1f} s ({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M "
        f"params, {args.nlu_batch}×{args.nlu_seq_len} tokens, r={args.nlu_rank}); measuring memory"
    )
    meter = MemoryMeter(args.device)
    meter.start()
    objective = None
    if variant != "a":
        from balora_plugins.core import BALoRAObjective

        # k < classes, as the demo does: with k = D the SVD share is identically 1 and skipped (docs/cli.md)
        k = min(5, max(1, shape["classes"] - 1))
        cfg = balora_config(args, "nlu", reference_cache=variant == "b_cache", svd_top_k=k)
        objective = BALoRAObjective(cfg).prepare(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    last: dict[str, float] = {}

    def step() -> None:
        out = model(**batch)
        loss = out.loss
        if objective is not None:
            reg, metrics = objective.compute(model, batch, logits=out.logits)
            loss = loss + reg.to(loss.dtype)
            last.update(
                {k.split("/", 1)[1]: v for k, v in metrics.items() if not k.startswith("balora/lambda")}
            )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        last["loss"] = float(loss.detach())

    torch.manual_seed(args.seed)  # the same dropout masks in every variant (the reference runs in eval mode)
    result = {
        "variant": variant,
        "name": NLU_VARIANTS[variant],
        **time_steps(step, meter, args.warmup, args.steps, args.device, say),
        "last": last,
        "tokens": args.nlu_batch * args.nlu_seq_len,
    }
    if objective is not None and objective.reference_cache is not None:
        cache = objective.reference_cache
        result["cache"] = {
            "examples": len(cache),
            "bytes": cache.nbytes,
            "hits": cache.hits,
            "misses": cache.misses,
        }
    return result


def term_timings(model, objective, batch, args, say) -> dict[str, float]:
    """Median time of each of (b)'s terms on its micro-batch: forward and gradient w.r.t. the hidden rows.

    consistency = reference forward + chunked KL; diversity = chunked top-K entropy; svd = Gram-factor SVD
    share (factor cached, as in training; ``gram_factor_s`` is its one-off cost); ``fused_rows`` = the one
    chunked pass that computes consistency and diversity together, as training runs them.
    """
    import torch

    rounds = [term_round(model, objective, batch, args.device) for _ in range(args.term_reps)]
    out = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    out["consistency"] = out["reference_forward"] + out["kl_rows"]
    say(f"term timings done ({args.term_reps} repetitions)")
    objective.head.forget_gram_factor()  # time the one-off factorisation itself
    with torch.no_grad():
        out["gram_factor_s"] = timed(objective.head.gram_factor, args.device)[0]
    return out


def term_round(model, objective, batch, device: str) -> dict[str, float]:
    import torch

    from balora_plugins.core import HiddenView, chunked_row_terms

    terms = {t.name: t for t in objective.terms}
    kl, ent = terms["consistency"].row_kernel(), terms["diversity"].row_kernel()
    head, chunk = objective.head, objective.config.chunk_size
    training = model.training
    model.eval()  # a training-mode forward is captured only with gradient (the student's); this one has none
    with torch.no_grad():
        model(**batch)  # fills the objective's hidden-state capture
    model.train(training)
    hidden = objective.captured_hidden
    mask = objective.valid_mask(batch, hidden)
    rows = hidden[mask].detach().requires_grad_(True)
    t: dict[str, float] = {}
    t["reference_forward"], ref_rows = timed(lambda: objective.reference_hidden(model)[mask], device)
    objective.release_capture()

    def with_grad(fn):
        return timed(lambda: torch.autograd.grad(fn(), rows), device)[0]

    t["kl_rows"] = with_grad(lambda: chunked_row_terms(rows, ref_rows, head, [kl], [1.0], chunk)[0])
    t["diversity"] = with_grad(lambda: chunked_row_terms(rows, None, head, [ent], [1.0], chunk)[0])
    t["fused_rows"] = with_grad(
        lambda: chunked_row_terms(rows, ref_rows, head, [kl, ent], [1.0, 1.0], chunk)[0]
    )
    t["svd"] = with_grad(lambda: terms["svd"].matrix(HiddenView(rows, head, chunk)))
    return t
