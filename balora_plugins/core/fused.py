"""Fused NLG terms from final hidden states and the frozen output head, chunked over tokens.

Nothing here materialises the (M, |V|) logits of a micro-batch:

* row terms (consistency, entropy) run one chunk of ``chunk_size`` positions at a time in fp32; the gradient
  with respect to the hidden states is computed inside the forward (one chunk alive at a time, as in
  Liger-Kernel's fused linear losses) and replayed in backward, so peak extra memory is one chunk × |V|;
  each term hands the driver its own per-chunk kernel (:meth:`~balora_plugins.core.terms.Term.row_kernel`):
  the built-in KL and top-K entropy come with closed-form gradients (``rows_and_grad``) that skip autograd
  inside the chunk — about five (chunk, |V|) fp32 buffers at the peak instead of seven, and fewer full-width
  passes; any other row function goes through autograd;
* the SVD term uses σ(H·Wᵀ) = σ(H·Rᵀ) with RᵀR = WᵀW (d×d, cached while the head is unchanged), and
  ‖H·Wᵀ‖_F = ‖H·Rᵀ‖_F: exact, no randomised approximation (docs/method.md §3.3).

A head with a bias is handled by augmenting H with a column of ones; a constant logit scale multiplies H.
Final-logit soft-capping is nonlinear: :class:`HiddenView` then falls back to materialising the logits for
the matrix terms (correct, but O(M·|V|) memory).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .distributed import local_shard


# ---------------------------------------------------------------------------------------------- the head
@dataclass
class OutputHead:
    """The frozen output projection: ``logits = softcap(scale · (h @ weight.T + bias))``.

    ``weight`` (V, d), ``bias`` (V,) or None, ``scale`` a Python float, ``softcap`` a float or None.
    ``source``: the parameter ``weight`` was gathered from when it is a per-step copy (FSDP2
    ``full_tensor()``); it keys the Gram-factor cache instead of the copy (default: ``weight`` itself).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None
    source: torch.Tensor | None = None

    def logits(self, h: torch.Tensor, weight32: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits (M, V) of hidden states ``h`` (M, d)."""
        w = weight32 if weight32 is not None else self.weight.float()
        z = h.float() @ w.T
        if self.bias is not None:
            z = z + self.bias.float()
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def grad_hidden(
        self, grad_logits: torch.Tensor, logits: torch.Tensor, weight32: torch.Tensor
    ) -> torch.Tensor:
        """dL/dh (M, d) from dL/dz (M, V) for z = ``self.logits(h)`` (``logits``); may overwrite ``grad_logits``."""
        g = grad_logits
        if self.softcap is not None:  # z = c·tanh(u/c): dz/du = 1 − (z/c)²
            g = g.mul_(1.0 - (logits / self.softcap).square())
        gh = g @ weight32
        return gh * self.scale if self.scale != 1.0 else gh

    @property
    def factorable(self) -> bool:
        return self.softcap is None

    def _augment(self, h: torch.Tensor) -> torch.Tensor:
        h = h.float() * self.scale
        if self.bias is not None:
            ones = torch.full_like(h[:, :1], self.scale)
            h = torch.cat([h, ones], dim=1)
        return h

    def gram_factor(self) -> torch.Tensor:
        """R (d', d') with RᵀR = W̃ᵀW̃ (W̃ = [W, b] when there is a bias), cached per weight version."""
        src = self.weight if self.source is None else self.source
        local = local_shard(src)  # a DTensor's / ZeRO-3 parameter's own shard: the same storage every step
        no_bias_key = self.bias is None or self.source is not None  # a gathered bias is a new copy every step
        bias_key = None if no_bias_key else (self.bias.data_ptr(), self.bias._version)
        shard = (local.data_ptr(), local._version)
        key = (shard, src._version, tuple(self.weight.shape), self.weight.dtype, bias_key)
        owner = _FACTOR_CACHE.get("owner")  # a freed head's address and version can be reused by a new tensor
        if _FACTOR_CACHE.get("key") == key and owner is not None and owner() is src:
            return _FACTOR_CACHE["R"]
        with torch.no_grad():
            w = self.weight.detach()
            if self.bias is not None:
                w = torch.cat([w, self.bias.detach()[:, None]], dim=1)
            gram = torch.zeros(w.shape[1], w.shape[1], dtype=torch.float64, device=w.device)
            for s in range(0, w.shape[0], 8192):  # fp64 Gram without a full fp64 copy of W
                blk = w[s : s + 8192].double()
                gram += blk.T @ blk
            evals, evecs = torch.linalg.eigh(gram)
            r = (evecs * evals.clamp(min=0).sqrt()).T  # R = Λ^½ Qᵀ, so RᵀR = Q Λ Qᵀ = G
            r = r.float()
        _FACTOR_CACHE.update(key=key, R=r, owner=weakref.ref(src))
        return r

    def projected(self, h: torch.Tensor) -> torch.Tensor:
        """Z̃ = H̃·Rᵀ (M, d'): same singular values and Frobenius norm as the logits (no soft-cap)."""
        return self._augment(h) @ self.gram_factor().T


_FACTOR_CACHE: dict = {}


def clear_factor_cache() -> None:
    """Forget the cached Gram factor (the next :meth:`OutputHead.gram_factor` recomputes it)."""
    _FACTOR_CACHE.clear()


# ---------------------------------------------------------------------------------------------- views
class LogitsView:
    """The logits matrix Z (M, C) a matrix term acts on, given directly (NLU, or any small C)."""

    def __init__(self, logits: torch.Tensor):
        self._z = logits

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self._z.shape)

    def logits(self) -> torch.Tensor:
        return self._z.float()

    def singular_values(self) -> torch.Tensor:
        return torch.linalg.svdvals(self.logits())

    def frobenius(self) -> torch.Tensor:
        return self.logits().norm()


class HiddenView(LogitsView):
    """Z = head(H) for hidden states H (M, d), never materialised unless the head is soft-capped."""

    def __init__(self, hidden: torch.Tensor, head: OutputHead):
        self.hidden = hidden
        self.head = head
        self._proj: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.hidden.shape[0], self.head.weight.shape[0])

    def logits(self) -> torch.Tensor:
        return self.head.logits(self.hidden)

    def _projected(self) -> torch.Tensor:
        if self._proj is None:
            self._proj = self.head.projected(self.hidden)
        return self._proj

    def singular_values(self) -> torch.Tensor:
        if not self.head.factorable:
            return torch.linalg.svdvals(self.logits())
        return torch.linalg.svdvals(self._projected())

    def frobenius(self) -> torch.Tensor:
        if not self.head.factorable:
            return self.logits().norm()
        return self._projected().norm()


# ---------------------------------------------------------------------------------------------- row terms
RowFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


class _ChunkedRowTerms(torch.autograd.Function):
    """Σ_i w_i · Σ_rows f_i(head(h), head(h_ref)) over chunks of rows, gradient computed in forward."""

    @staticmethod
    def forward(ctx, hidden, ref_hidden, weight, head, fns, weights, chunk_size):
        m = hidden.shape[0]
        need_grad = ctx.needs_input_grad[0]
        w32 = weight.float()
        sums = torch.zeros(len(fns), dtype=torch.float32, device=hidden.device)
        grad = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_grad else None
        closed_form = all(hasattr(fn, "rows_and_grad") for fn in fns)
        for s in range(0, m, chunk_size):
            e = min(s + chunk_size, m)
            if closed_form:  # no autograd graph: each term adds its exact ∂/∂z into one chunk-wide buffer
                with torch.no_grad():
                    z = head.logits(hidden[s:e], w32)
                    zr = head.logits(ref_hidden[s:e], w32) if ref_hidden is not None else None
                    acc, vals = None, []
                    for fn, wi in zip(fns, weights, strict=True):
                        v, acc = fn.rows_and_grad(z, zr, wi, acc, need_grad)
                        vals.append(v.sum())
                    del zr
                    if need_grad and acc is not None:
                        grad[s:e] = head.grad_hidden(acc, z, w32)
                    sums += torch.stack(vals)
                    del z, acc, vals
                continue
            hc = hidden[s:e].detach().float().requires_grad_(need_grad)
            with torch.no_grad():
                zr = head.logits(ref_hidden[s:e], w32) if ref_hidden is not None else None
            with torch.enable_grad():
                z = head.logits(hc, w32)
                vals = [fn(z, zr).sum() for fn in fns]
                total = sum(wi * v for wi, v in zip(weights, vals, strict=True))
            if need_grad:
                (g,) = torch.autograd.grad(total, hc)
                grad[s:e] = g
            sums += torch.stack([v.detach() for v in vals])
            del z, zr, vals, total
        ctx.save_for_backward(grad if need_grad else torch.empty(0))
        ctx.need_grad = need_grad
        ctx.in_dtype = hidden.dtype
        total = (sums * torch.tensor(weights, dtype=sums.dtype, device=sums.device)).sum()
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    def backward(ctx, grad_total, grad_sums):
        (grad,) = ctx.saved_tensors
        gh = (grad * grad_total).to(ctx.in_dtype) if ctx.need_grad else None
        return gh, None, None, None, None, None, None


def chunked_row_terms(
    hidden: torch.Tensor,
    ref_hidden: torch.Tensor | None,
    head: OutputHead,
    fns: Sequence[RowFn],
    weights: Sequence[float],
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of row terms over all rows, and each term's unweighted row sum.

    Args:
        hidden: (M, d) hidden states of the valid positions, any float dtype, with grad.
        ref_hidden: (M, d) reference hidden states (no grad) or None when no term needs them.
        head: the frozen output head.
        fns: per-row functions ``f(z, z_ref) -> (rows,)`` on fp32 logits chunks (rows, V).
        weights: one float per function (λ already divided by the normaliser).
        chunk_size: rows per chunk.

    Returns:
        ``(total, sums)``: ``total`` = Σ_i weights[i]·sums[i] (0-d, differentiable w.r.t. ``hidden``);
        ``sums`` (len(fns),) the unweighted sums Σ_rows f_i, detached.
    """
    if not fns:
        z = hidden.new_zeros((), dtype=torch.float32)
        return z, hidden.new_zeros((0,), dtype=torch.float32)
    return _ChunkedRowTerms.apply(
        hidden, ref_hidden, head.weight, head, list(fns), [float(w) for w in weights], int(chunk_size)
    )
