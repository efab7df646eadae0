"""The three built-in BA-LoRA terms, each a small object stating its per-row or per-matrix formula.

Row terms (consistency; NLG diversity) give one value per row of the logits; the chunked driver sums
them chunk by chunk and the objective normalises the sum like the host's cross-entropy. Matrix terms
(SVD; NLU decorrelation) are per-micro-batch statistics of the whole logits matrix, seen through a
:class:`~balora_plugins.core.fused.LogitsView` that can avoid materialising the logits. The contract they
implement (:class:`~balora_plugins.core.contract.Term`, :class:`~balora_plugins.core.contract.RowKernel`) is
the one a third-party term implements (docs/extending.md); the closed-form kernels of the built-in row terms
live here too.

This module is registered through the ``balora_plugins`` entry-point group (see ``pyproject.toml``).
"""

from __future__ import annotations

import torch

from .. import functional as Fn
from ..config import BALoRAConfig
from .contract import CLOSED_FORM, MATRIX, ROW, Reference, RowFn, RowKernel, Term, TopKRows
from .hookspecs import hookimpl


class Consistency(Term):
    """L_CR: T²·KL(p_ref ‖ p) per row (iclr2026, and v5 NLG with T = 1) or the normalised MSE (v5 NLU)."""

    def __init__(self, config: BALoRAConfig):
        super().__init__(name="consistency", level=ROW, needs_reference=True)
        self.kind = config.consistency_kind
        self.temperature = config.consistency_temperature

    def rows(self, logits, ref_logits):
        if self.kind == "mse":
            return Fn.mse_rows(logits, ref_logits)
        return Fn.kl_rows(logits, ref_logits, self.temperature)

    def row_kernel(self) -> RowKernel | RowFn:
        # the KL has a closed form; the MSE runs through autograd (a subclass restating rows: see Term)
        return KLRows(self.temperature) if self.kind == "kl" else self.rows


class EntropyDiversity(Term):
    """L_DR for NLG: minus the entropy of each position's top-K renormalised distribution."""

    def __init__(self, config: BALoRAConfig):
        super().__init__(name="diversity", level=ROW)
        self.top_k = config.entropy_top_k

    def rows(self, logits, ref_logits):
        return -Fn.entropy_rows(logits, self.top_k)

    def row_kernel(self) -> RowKernel:
        return NegEntropyRows(self.top_k)


class Decorrelation(Term):
    """L_DR for NLU: (1/C)·Σ_{i≠j} Cov_ij² of the batch-centred logits."""

    def __init__(self, config: BALoRAConfig):
        super().__init__(name="diversity", level=MATRIX)

    def matrix(self, view):
        return Fn.diversity_loss(view.logits(), kind="decorrelation")

    def is_noop(self, num_rows, num_cols):
        return num_rows < 2


class SVDShare(Term):
    """L_SVD = −Σ_{i≤k}σ_i / (‖Z‖_F or Σσ), from the view's (exact) singular values."""

    def __init__(self, config: BALoRAConfig):
        super().__init__(name="svd", level=MATRIX)
        self.k = config.svd_top_k
        self.norm = config.resolved_svd_norm
        self.eps = config.eps

    def matrix(self, view):
        s = view.singular_values()
        fro = view.frobenius() if self.norm == "frobenius" else None
        return Fn.svd_share(s, k=self.k, norm=self.norm, eps=self.eps, frobenius=fro)

    def is_noop(self, num_rows, num_cols):
        # Σ_{i≤k}σ/Σσ ≡ 1 when k covers every singular value (e.g. binary NLU with k = 5).
        return self.norm == "nuclear" and self.k >= min(num_rows, num_cols)


# ---------------------------------------------------------------------------------------------- fused kernels
class KLRows(RowKernel):
    """Row function T²·KL(softmax(z_ref/T) ‖ softmax(z/T)) with its closed-form gradient T·(p − q).

    Calling it gives the same values as :func:`balora_plugins.functional.kl_rows`; :meth:`rows_and_grad` lets
    the chunked driver skip autograd (fewer full-width passes and buffers per chunk). The reference may also be
    a precomputed :class:`~balora_plugins.core.fused.TopKRows` (its top k tokens and one tail bucket):
    :meth:`topk_rows_and_grad`.
    """

    gradient = CLOSED_FORM
    accepts_topk_reference = True  # what a reference="precomputed" run asks of every reference-using kernel

    def __init__(self, temperature: float = 1.0):
        self.temperature = float(temperature)

    def __call__(self, z: torch.Tensor, z_ref: Reference) -> torch.Tensor:
        if isinstance(z_ref, TopKRows):
            return self.topk_rows_and_grad(z, z_ref, 0.0, None, False)[0]
        return Fn.kl_rows(z, z_ref, self.temperature)

    def topk_rows_and_grad(
        self, z: torch.Tensor, ref: TopKRows, weight: float, acc: torch.Tensor | None, need_grad: bool
    ):
        """T²·KL(r ‖ p) against a top-k reference, per row (n,), and ``acc`` += weight·∂/∂z.

        With q the reference's tempered distribution, its top k tokens K and its tail mass q̄ = 1 − Σ_K q (stored
        exactly), and p̄ = Σ_{v∉K} p the student's tail: value T²·[Σ_K q·log(q/p) + q̄·log(q̄/p̄)] — the KL with
        the tail as one bucket, = T²·KL(r ‖ p) for r = q on K and q̄·p_v/p̄ elsewhere; it equals the full KL when
        k = |V| and never exceeds it. Gradient T·(p − r): T·(p − q) on K, T·p_v·(1 − q̄/p̄) on the tail.
        """
        t = self.temperature
        if ref.temperature != t:
            raise ValueError(f"the precomputed reference is at T={ref.temperature}, the term at T={t}.")
        ids = ref.token_ids
        logp = torch.log_softmax(z / t, dim=-1)
        logp_k = logp.gather(1, ids)
        logq_k = ref.logits / t - ref.log_normalizer[:, None]
        q_k = logq_k.exp()
        # log p̄; the buffer keeps the tail's log p
        logp_tail = logp.scatter_(1, ids, float("-inf")).logsumexp(-1)
        logq_tail = ref.tail_log_mass
        has_tail = logq_tail > float("-inf")
        log_ratio = torch.where(has_tail, logq_tail - logp_tail, 0.0)  # log(q̄/p̄); 0 for an empty tail
        values = (t * t) * ((q_k * (logq_k - logp_k)).sum(-1) + logq_tail.exp() * log_ratio)
        if need_grad:
            keep = torch.where(has_tail, 1.0 - log_ratio.exp(), 1.0)  # 1 − q̄/p̄ (the tail is all 0 when empty)
            g = logp.exp_().mul_(keep[:, None])  # tail: p_v·(1 − q̄/p̄); the top k is 0 here ...
            g.scatter_(1, ids, logp_k.exp_().sub_(q_k))  # ... and p − q there
            acc = g.mul_(weight * t) if acc is None else acc.add_(g, alpha=weight * t)
        return values, acc

    def rows_and_grad(
        self, z: torch.Tensor, z_ref: Reference, weight: float, acc: torch.Tensor | None, need_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-row values (n,) and ``acc`` += weight·∂Σvalues/∂z (allocated when None; untouched without grad)."""
        if isinstance(z_ref, TopKRows):
            return self.topk_rows_and_grad(z, z_ref, weight, acc, need_grad)
        t = self.temperature
        logp = torch.log_softmax(z / t, dim=-1)
        logq = torch.log_softmax(z_ref / t, dim=-1)
        q = logq.exp()
        values = (t * t) * logq.sub_(logp).mul_(q).sum(-1)
        del logq
        if need_grad:
            g = logp.exp_().sub_(q)  # p − q, in the log p buffer; ∂/∂z = T·(p − q)
            acc = g.mul_(weight * t) if acc is None else acc.add_(g, alpha=weight * t)
        return values, acc


class NegEntropyRows(RowKernel):
    """Row function −H(softmax of the row's ``top_k`` largest logits) (0 = all) with its closed-form gradient.

    Same values as ``-functional.entropy_rows(z, top_k)``; for L = Σπ·log π over the kept logits u,
    ∂L/∂u = π·(log π + H), scattered back to the kept columns.
    """

    gradient = CLOSED_FORM

    def __init__(self, top_k: int = 0):
        self.top_k = int(top_k)

    def __call__(self, z: torch.Tensor, z_ref: Reference) -> torch.Tensor:
        return -Fn.entropy_rows(z, self.top_k)

    def rows_and_grad(
        self, z: torch.Tensor, z_ref: Reference, weight: float, acc: torch.Tensor | None, need_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = None
        u = z
        if 0 < self.top_k < z.shape[-1]:
            u, idx = z.topk(self.top_k, dim=-1, sorted=False)
        logpi = torch.log_softmax(u, dim=-1)
        pi = logpi.exp()
        ent = -(pi * logpi).sum(-1)
        if need_grad:
            g = pi.mul_(logpi.add_(ent[:, None])).mul_(weight)
            if idx is None:
                acc = g if acc is None else acc.add_(g)
            else:
                acc = torch.zeros_like(z) if acc is None else acc
                acc.scatter_add_(-1, idx, g)
        return -ent, acc


class TemperedEntropyRows(RowKernel):
    """Row quantity H(softmax(z/T)) over the full width (no gradient): the reference's confidence statistic.

    Used by the adaptive consistency weight (docs/method.md §3.1); ``rows_and_grad`` lets the chunked driver
    run it without autograd and leaves the gradient buffer untouched (the quantity is a constant of the step).
    """

    gradient = CLOSED_FORM

    def __init__(self, temperature: float = 1.0):
        self.temperature = float(temperature)

    def __call__(self, z: torch.Tensor, z_ref: Reference) -> torch.Tensor:
        logp = torch.log_softmax(z / self.temperature, dim=-1)
        return -(logp.exp() * logp).sum(-1)

    def rows_and_grad(
        self, z: torch.Tensor, z_ref: Reference, weight: float, acc: torch.Tensor | None, need_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self(z, z_ref), acc


@hookimpl(tryfirst=True)  # the built-in terms lead the objective's terms, whatever the registration order
def balora_terms(config: BALoRAConfig) -> list[Term]:
    diversity = EntropyDiversity(config) if config.diversity_kind == "entropy" else Decorrelation(config)
    return [Consistency(config), diversity, SVDShare(config)]
