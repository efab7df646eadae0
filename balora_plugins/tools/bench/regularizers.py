"""The regularizers alone on (M, d) hidden states: the fused path against the plain-logits path."""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from .args import dtype_name, log
from .build import balora_config, torch_dtype
from .measure import MemoryMeter, clock_name, timed


def run_regularizers(args: argparse.Namespace, rows: int, vocab: int, hidden: int) -> dict[str, Any]:
    """The regularizers alone on (M, d) hidden states: fused path vs the plain-logits path.

    Plain: Z = H·Wᵀ and Z_ref (M, |V|) materialised, the functional consistency and top-K entropy, and the
    SVD share by ``torch.svd_lowrank`` (q = k+5, 2 iterations; exact ``svdvals`` of an (M, |V|) matrix is out
    of reach) over ‖Z‖_F. Fused: :func:`chunked_row_terms` + the Gram-factor SVD. Both with the gradient
    w.r.t. H; the peak counts what is allocated above H, H_ref and W.

    With ``--softcap`` > 0, also the SVD share of a soft-capped head (Gemma-2/3): fused = exact, from the M×M
    Gram accumulated over vocabulary blocks; plain = the capped (M, |V|) logits with ``torch.svd_lowrank``.
    """
    import torch

    from balora_plugins import functional as Fn
    from balora_plugins.core import (
        Consistency,
        EntropyDiversity,
        HiddenView,
        OutputHead,
        SVDShare,
        chunked_row_terms,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = balora_config(args)
    dtype = torch_dtype(dtype_name(args))
    g = torch.Generator().manual_seed(args.seed + 2)
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).to(args.device, dtype)
    h = torch.randn(rows, hidden, generator=g).to(args.device, dtype).requires_grad_(True)
    h_ref = (h.detach() + 0.05 * torch.randn(rows, hidden, generator=g).to(args.device, dtype)).detach()
    head = OutputHead(weight=w)
    kl, ent, svd = Consistency(cfg).row_kernel(), EntropyDiversity(cfg).row_kernel(), SVDShare(cfg)
    lam = (cfg.lambda_consistency / rows, cfg.lambda_diversity / rows)

    def plain_kl():
        z, zr = head.logits(h), head.logits(h_ref)
        return cfg.lambda_consistency * Fn.consistency_loss(z, zr, temperature=cfg.temperature)

    def plain_svd():
        z = head.logits(h)
        _, s, _ = torch.svd_lowrank(z, q=cfg.svd_top_k + 5, niter=2)
        return cfg.lambda_svd * -(s[: cfg.svd_top_k].sum() / z.norm())

    def plain_all():
        z, zr = head.logits(h), head.logits(h_ref)
        loss = cfg.lambda_consistency * Fn.consistency_loss(z, zr, temperature=cfg.temperature)
        loss = loss + cfg.lambda_diversity * Fn.diversity_loss(z, top_k=cfg.diversity_top_k)
        _, s, _ = torch.svd_lowrank(z, q=cfg.svd_top_k + 5, niter=2)
        return loss + cfg.lambda_svd * -(s[: cfg.svd_top_k].sum() / z.norm())

    def fused_kl():
        return chunked_row_terms(h, h_ref, head, [kl], [lam[0]], cfg.chunk_size)[0]

    def fused_svd():
        return cfg.lambda_svd * svd.matrix(HiddenView(h, head, cfg.chunk_size))

    def fused_all():
        total = chunked_row_terms(h, h_ref, head, [kl, ent], list(lam), cfg.chunk_size)[0]
        return total + fused_svd()

    def with_grad(fn):
        def run():
            torch.autograd.grad(fn(), h)

        return run

    out: dict[str, Any] = {
        "rows": rows,
        "vocab": vocab,
        "hidden": hidden,
        "chunk_size": cfg.chunk_size,
        "clock": clock_name(args.device),
    }
    fused_svd()  # Gram factor computed once, as in training
    for name, fn in (("plain", plain_all), ("fused", fused_all)):
        meter = MemoryMeter(args.device)
        meter.start()
        with_grad(fn)()
        out[f"{name}_peak_bytes"] = meter.stop()
    for name, fn in (
        ("plain_kl", plain_kl),
        ("plain_svd", plain_svd),
        ("fused_kl", fused_kl),
        ("fused_svd", fused_svd),
    ):
        times = [timed(with_grad(fn), args.device)[0] for _ in range(max(args.term_reps, 1))]
        out[f"{name}_s"] = statistics.median(times)
    log(
        args,
        f"(regularizers) fused {out['fused_peak_bytes'] / 2**20:.0f} MiB vs plain "
        f"{out['plain_peak_bytes'] / 2**20:.0f} MiB",
    )
    if args.softcap > 0:
        out.update(softcap_svd(args, cfg, h, w))
    return out  # the Gram factor is kept on w and goes with it


def softcap_svd(args: argparse.Namespace, cfg, h, w) -> dict[str, Any]:
    """SVD share with gradient on a soft-capped head: the fused Gram path vs the capped full logits."""
    import torch

    from balora_plugins.core import HiddenView, OutputHead, SVDShare

    head = OutputHead(weight=w, softcap=args.softcap)
    svd = SVDShare(cfg)

    def fused():
        torch.autograd.grad(svd.matrix(HiddenView(h, head, cfg.chunk_size)), h)

    def plain():
        z = head.logits(h)
        _, s, _ = torch.svd_lowrank(z, q=cfg.svd_top_k + 5, niter=2)
        torch.autograd.grad(-(s[: cfg.svd_top_k].sum() / z.norm()), h)

    out: dict[str, Any] = {"softcap": args.softcap}
    for name, fn in (("plain", plain), ("fused", fused)):
        meter = MemoryMeter(args.device)
        meter.start()
        seconds = timed(fn, args.device)[0]
        out[f"softcap_{name}_peak_bytes"] = meter.stop()
        out[f"softcap_{name}_svd_s"] = seconds  # one run, traced (the trace adds little to large kernels)
    return out
