"""Fused NLG terms from final hidden states and the frozen output head, chunked over tokens.

Nothing here materialises the (M, |V|) logits of a micro-batch:

* row terms (consistency, entropy) run one chunk of ``chunk_size`` positions at a time in fp32; the gradient
  with respect to the hidden states is computed inside the forward (one chunk alive at a time, as in
  Liger-Kernel's fused linear losses) and replayed in backward, so peak extra memory is one chunk × |V|
  (a few fp32 buffers of it); each term hands the driver its own per-chunk kernel
  (:meth:`~balora_plugins.core.contract.Term.row_kernel`, a :class:`~balora_plugins.core.contract.RowKernel`):
  a kernel that declares a closed-form gradient (the built-in KL and top-K entropy) skips autograd inside the
  chunk; any other row function is differentiated by autograd with respect to the chunk's logits only;
* the SVD term and ‖Z‖_F come from a Gram matrix (docs/method.md §3.3): for a linear head σ(H·Wᵀ) = σ(H·Rᵀ)
  with RᵀR = WᵀW (d×d, kept on the head's weight while it is unchanged); for a soft-capped head (Gemma-2/3),
  which is not linear, the M×M Gram ZZᵀ accumulated over blocks of the vocabulary. Both exact, no randomised
  SVD.

A head with a bias is handled by augmenting H with a column of ones; a constant logit scale multiplies H.
A bf16/fp16 head is never copied to fp32 as a whole (:class:`OutputHead`): the logits are fp32 all the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .contract import CLOSED_FORM, RowFn, RowKernel, TopKRows, as_row_kernel
from .distributed import local_shard

# ---------------------------------------------------------------------------------------------- the head
# At most this many bytes of a low-precision head are held in fp32 at a time (one block of its rows).
UPCAST_BLOCK_BYTES = 32 * 2**20
# The attribute of the head's weight (or its ``source`` parameter) holding (key, Gram factor).
GRAM_FACTOR_ATTR = "balora_gram_factor"


class _HeadMatmul(torch.autograd.Function):
    """x (n, d) @ weight[start:stop]ᵀ -> (n, stop - start) fp32, differentiable in x, never holding more than one
    :data:`UPCAST_BLOCK_BYTES` block of a low-precision weight in fp32 (not even for the backward)."""

    @staticmethod
    def forward(ctx, x, head, start, stop):
        ctx.head, ctx.start, ctx.stop, ctx.x_dtype = head, start, stop, x.dtype
        return head.matmul(x.detach(), start, stop)

    @staticmethod
    def backward(ctx, grad):
        gx = ctx.head.matmul_t(grad.float(), ctx.start, ctx.stop)
        return gx.to(ctx.x_dtype), None, None, None


@dataclass
class OutputHead:
    """The frozen output projection: ``logits = softcap(scale · (h @ weight.T + bias))``.

    ``weight`` (V, d), ``bias`` (V,) or None, ``scale`` a Python float, ``softcap`` a float or None.
    ``source``: the parameter ``weight`` was gathered from when it is a per-step copy (FSDP2
    ``full_tensor()``); the Gram factor is kept on it instead of on the copy (default: on ``weight`` itself),
    so a head rebuilt every step reuses it (:meth:`gram_factor`).

    The logits are always fp32. A bf16/fp16 head is never copied to fp32 as a whole: on CUDA the products
    run in the head's dtype with fp32 accumulation and fp32 output (``torch.mm(out_dtype=)``, torch >= 2.8;
    a head whose first such product fails upcasts from then on); elsewhere the head is upcast one block of
    rows (:data:`UPCAST_BLOCK_BYTES`) at a time, which gives the same fp32 logits.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None
    source: torch.Tensor | None = None
    native_mm: bool = field(default=True, repr=False, compare=False)

    def _native_fp32_mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
        """``a @ b`` in fp32 from low-precision CUDA operands, accumulated in fp32 (``torch.mm(out_dtype=)``,
        torch >= 2.8 on CUDA); None where unavailable (CPU, older torch: :attr:`native_mm` turns False for this
        head), so the caller upcasts block by block."""
        if not (a.is_cuda and self.native_mm):
            return None
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            self.native_mm = False
            return None

    # ------------------------------------------------------------------ products with the weight
    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    def _block_rows(self) -> int:
        """Rows of a low-precision weight upcast to fp32 at a time."""
        return max(1, UPCAST_BLOCK_BYTES // (4 * int(self.weight.shape[1])))

    def matmul(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """x (n, d) @ weight[start:stop]ᵀ as fp32 (n, stop - start), no graph (see :meth:`logits` for one)."""
        stop = self.vocab_size if stop is None else stop
        w = self.weight.detach()
        if w.dtype == torch.float32:
            return x.float() @ w[start:stop].T
        if x.dtype == w.dtype:
            out = self._native_fp32_mm(x, w[start:stop].T)
            if out is not None:
                return out
        x32 = x.float()
        out = x32.new_empty((x.shape[0], stop - start))
        step = self._block_rows()
        for s in range(start, stop, step):
            e = min(s + step, stop)
            torch.mm(x32, w[s:e].float().T, out=out[:, s - start : e - start])
        return out

    def matmul_t(self, g: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """g (n, stop - start) fp32 @ weight[start:stop] as fp32 (n, d): the gradient with respect to x."""
        stop = self.vocab_size if stop is None else stop
        w = self.weight.detach()
        if w.dtype == torch.float32:
            return g @ w[start:stop]
        # g.to(w.dtype): the rounding autograd through the head would do
        out = self._native_fp32_mm(g.to(w.dtype), w[start:stop])
        if out is not None:
            return out
        acc = g.new_zeros((g.shape[0], w.shape[1]))
        step = self._block_rows()
        for s in range(start, stop, step):
            e = min(s + step, stop)
            acc.addmm_(g[:, s - start : e - start], w[s:e].float())
        return acc

    # ------------------------------------------------------------------ logits and their gradient
    def logits(self, h: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """fp32 logits (M, stop - start) of hidden states ``h`` (M, d) for the vocabulary columns [start, stop);
        differentiable with respect to ``h`` when it requires grad."""
        stop = self.vocab_size if stop is None else stop
        track = torch.is_grad_enabled() and h.requires_grad
        z = _HeadMatmul.apply(h, self, start, stop) if track else self.matmul(h, start, stop)
        if self.bias is not None:
            b = self.bias.detach()[start:stop].float()
            z = z + b if track else z.add_(b)
        if self.scale != 1.0:
            z = z * self.scale if track else z.mul_(self.scale)
        if self.softcap is not None:
            c = self.softcap
            z = torch.tanh(z / c) * c if track else z.div_(c).tanh_().mul_(c)
        return z

    def grad_hidden(
        self, grad_logits: torch.Tensor, logits: torch.Tensor, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """dL/dh (M, d) fp32 from dL/dz (M, stop - start) for z = ``self.logits(h, start, stop)`` (``logits``);
        may overwrite ``grad_logits``."""
        g = grad_logits
        if self.softcap is not None:  # z = c·tanh(u/c): dz/du = 1 − (z/c)²
            d = logits.div(self.softcap).square_().neg_().add_(1.0)
            g = g.mul_(d)
            del d
        gh = self.matmul_t(g, start, stop)
        return gh.mul_(self.scale) if self.scale != 1.0 else gh

    # ------------------------------------------------------------------ the Gram factor (linear heads)
    @property
    def factorable(self) -> bool:
        return self.softcap is None

    def _augment(self, h: torch.Tensor) -> torch.Tensor:
        h = h.float() * self.scale
        if self.bias is not None:
            ones = torch.full_like(h[:, :1], self.scale)
            h = torch.cat([h, ones], dim=1)
        return h

    def _factor_owner_and_key(self) -> tuple[torch.Tensor, tuple]:
        """The tensor the factor is kept on (``source``, else ``weight``) and the key it must match to be reused."""
        src = self.weight if self.source is None else self.source
        local = local_shard(src)  # a DTensor's / ZeRO-3 parameter's own shard: the same storage every step
        no_bias_key = self.bias is None or self.source is not None  # a gathered bias is a new copy every step
        bias_key = None if no_bias_key else (self.bias.data_ptr(), self.bias._version)
        shard = (local.data_ptr(), local._version)
        key = (shard, src._version, tuple(self.weight.shape), self.weight.dtype, self.weight.device, bias_key)
        return src, key

    def gram_factor(self) -> torch.Tensor:
        """R (d', d') with RᵀR = W̃ᵀW̃ (W̃ = [W, b] when there is a bias), fp32.

        Kept on the head's weight (``source`` for a per-step copy) as its ``balora_gram_factor`` attribute, so
        it lives and dies with that tensor, and reused while the key matches: the same storage and version of
        the weight (an in-place change, a load, a move to another device recompute it), shape, dtype, device,
        and — for a bias that is not a per-step copy — the bias's storage and version.
        """
        src, key = self._factor_owner_and_key()
        cached = getattr(src, GRAM_FACTOR_ATTR, None)
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            w = self.weight.detach()
            b = None if self.bias is None else self.bias.detach()
            d = w.shape[1] + (b is not None)
            gram = torch.zeros(d, d, dtype=torch.float64, device=w.device)
            step = max(1, UPCAST_BLOCK_BYTES // (8 * d))
            for s in range(
                0, w.shape[0], step
            ):  # fp64 Gram of W̃ = [W, b], one block of rows in fp64 at a time
                blk = w[s : s + step].double()
                if b is not None:
                    blk = torch.cat([blk, b[s : s + step, None].double()], dim=1)
                gram.addmm_(blk.T, blk)
            evals, evecs = torch.linalg.eigh(gram)
            r = (evecs * evals.clamp(min=0).sqrt()).T  # R = Λ^½ Qᵀ, so RᵀR = Q Λ Qᵀ = G
            r = r.float()
        setattr(src, GRAM_FACTOR_ATTR, (key, r))
        return r

    def forget_gram_factor(self) -> None:
        """Drop the Gram factor kept on this head's weight (the next :meth:`gram_factor` recomputes it)."""
        src = self.weight if self.source is None else self.source
        if hasattr(src, GRAM_FACTOR_ATTR):
            delattr(src, GRAM_FACTOR_ATTR)

    def projected(self, h: torch.Tensor) -> torch.Tensor:
        """Z̃ = H̃·Rᵀ (M, d'): same singular values and Frobenius norm as the logits (no soft-cap)."""
        return self._augment(h) @ self.gram_factor().T


# ---------------------------------------------------------------------------------------------- views
def singular_values_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, fp32) of a matrix Z from its Gram matrix G = ZZᵀ or ZᵀZ (n, n), fp64.

    σ = √λ(G) (``eigvalsh``, whose gradient is well defined even for repeated eigenvalues); eigenvalues at the
    rounding level of λ_max count as 0 and pass no gradient (√ has an infinite slope at 0).
    """
    lam = torch.linalg.eigvalsh(gram).flip(-1)
    floor = lam[:1].detach().clamp(min=torch.finfo(lam.dtype).tiny) * (
        gram.shape[-1] * torch.finfo(lam.dtype).eps
    )
    return torch.where(lam > floor, lam.clamp(min=floor).sqrt(), torch.zeros_like(lam)).float()


def frobenius_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """‖Z‖_F = √trace(G) (0-d, fp32) from a Gram matrix of Z."""
    return gram.diagonal().sum().clamp(min=0).sqrt().float()


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
    """Z = head(H) for hidden states H (M, d), never materialised (:meth:`logits` excepted).

    The singular values and ‖Z‖_F come from a Gram matrix, computed once per view and shared by both:

    * a linear head (bias and scale allowed): Z̃ = H̃·Rᵀ (M, d') has Z's singular values
      (:meth:`OutputHead.projected`); its Gram is the smaller of Z̃ᵀZ̃ (d', d') and Z̃Z̃ᵀ (M, M), in fp64;
    * a soft-capped head (Gemma-2/3) is not linear: G = ZZᵀ (M, M) accumulated over blocks of
      ``chunk_size·|V|/M`` vocabulary columns (:func:`softcap_gram`), so peak extra memory is one chunk of logits
      plus M×M, and the backward recomputes the blocks instead of keeping them.
    """

    def __init__(self, hidden: torch.Tensor, head: OutputHead, chunk_size: int = 256):
        self.hidden = hidden
        self.head = head
        self.chunk_size = int(chunk_size)
        self._gram: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.hidden.shape[0], self.head.vocab_size)

    def logits(self) -> torch.Tensor:
        """The full (M, |V|) logits, fp32: for third-party matrix terms only (the built-in ones never call it)."""
        return self.head.logits(self.hidden)

    def gram(self) -> torch.Tensor:
        """The Gram matrix (fp64) whose eigenvalues are the squared singular values of Z; cached."""
        if self._gram is None:
            if self.head.factorable:
                z = self.head.projected(self.hidden).double()
                self._gram = z @ z.T if z.shape[0] <= z.shape[1] else z.T @ z
            else:
                m = max(int(self.hidden.shape[0]), 1)
                block = max(1, self.chunk_size * self.head.vocab_size // m)
                self._gram = softcap_gram(self.hidden, self.head, block)
        return self._gram

    def singular_values(self) -> torch.Tensor:
        """The min(M, |V|) singular values of Z, descending (fp32)."""
        return singular_values_from_gram(self.gram())[: min(self.shape)]

    def frobenius(self) -> torch.Tensor:
        return frobenius_from_gram(self.gram())


class _SoftcapGram(torch.autograd.Function):
    """G = ZZᵀ (M, M) fp64 for Z = head(H), accumulated over vocabulary blocks; the backward recomputes each
    block: ∂L/∂Z = (Ḡ + Ḡᵀ)·Z, then through the cap and the head (:meth:`OutputHead.grad_hidden`)."""

    @staticmethod
    def forward(ctx, hidden, head, block):
        m = hidden.shape[0]
        gram = torch.zeros(m, m, dtype=torch.float64, device=hidden.device)
        h = hidden.detach()
        for s in range(0, head.vocab_size, block):
            z = head.logits(h, s, min(s + block, head.vocab_size)).double()
            gram.addmm_(z, z.T)  # fp64: small eigenvalues (the nuclear norm's tail) stay accurate
            del z
        ctx.save_for_backward(hidden)
        ctx.head, ctx.block = head, block
        return gram

    @staticmethod
    def backward(ctx, grad_gram):
        (hidden,) = ctx.saved_tensors
        head, h = ctx.head, hidden.detach()
        sym = (grad_gram + grad_gram.T).float()
        gh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        for s in range(0, head.vocab_size, ctx.block):
            e = min(s + ctx.block, head.vocab_size)
            z = head.logits(h, s, e)
            gh += head.grad_hidden(sym @ z, z, s, e)
            del z
        return gh.to(hidden.dtype), None, None


def softcap_gram(hidden: torch.Tensor, head: OutputHead, block: int) -> torch.Tensor:
    """ZZᵀ (M, M) fp64 of the logits Z = head(hidden) (any head), ``block`` vocabulary columns at a time;
    differentiable with respect to ``hidden`` (M, d) without keeping any block of Z."""
    return _SoftcapGram.apply(hidden, head, int(block))


# ---------------------------------------------------------------------------------------------- row terms
class _ChunkedRowTerms(torch.autograd.Function):
    """Σ_i w_i · Σ_rows f_i(head(h), head(h_ref)) over chunks of rows, gradient computed in forward.

    Per chunk: the student's and the reference's logits in one pass over the head (fp32, see
    :class:`OutputHead`); each term's value and ∂/∂z — closed form when every kernel declares
    ``gradient = "closed_form"`` (:class:`~balora_plugins.core.contract.RowKernel`), else autograd of the
    kernels' calls with respect to the chunk's logits only — summed into one chunk-wide
    buffer; then ∂/∂h through the head, block by block. No graph crosses chunks and the head is never copied.
    """

    @staticmethod
    def forward(ctx, hidden, ref_hidden, head, fns, weights, chunk_size):
        m = hidden.shape[0]
        need_grad = ctx.needs_input_grad[0]
        sums = torch.zeros(len(fns), dtype=torch.float32, device=hidden.device)
        grad = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_grad else None
        closed_form = all(fn.gradient == CLOSED_FORM for fn in fns)
        h_all = hidden.detach()
        for s in range(0, m, chunk_size):
            e = min(s + chunk_size, m)
            with torch.no_grad():
                z, zr = _chunk_logits(head, h_all[s:e], None if ref_hidden is None else ref_hidden[s:e])
            if closed_form:  # no autograd graph: each term adds its exact ∂/∂z into one chunk-wide buffer
                with torch.no_grad():
                    acc, vals = None, []
                    for fn, wi in zip(fns, weights, strict=True):
                        v, acc = fn.rows_and_grad(z, zr, wi, acc, need_grad)
                        vals.append(v.sum())
            else:
                zl = z.detach().requires_grad_(need_grad)
                with torch.enable_grad():
                    vals = [fn(zl, zr).sum() for fn in fns]
                    total = sum(wi * v for wi, v in zip(weights, vals, strict=True))
                acc = torch.autograd.grad(total, zl)[0] if need_grad else None
                vals = [v.detach() for v in vals]
                del zl, total
            del zr
            if need_grad and acc is not None:
                with torch.no_grad():
                    grad[s:e] = head.grad_hidden(acc, z)
            sums += torch.stack(vals)
            del z, acc, vals
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
        return gh, None, None, None, None, None


def _chunk_logits(
    head: OutputHead, h: torch.Tensor, h_ref: torch.Tensor | TopKRows | None
) -> tuple[torch.Tensor, torch.Tensor | TopKRows | None]:
    """The chunk's logits (n, V) and its reference logits (n, V), fp32, from one product with the head; a
    precomputed reference (:class:`TopKRows`) or None is passed through as it is."""
    if h_ref is None or isinstance(h_ref, TopKRows):
        return head.logits(h), h_ref
    if h_ref.dtype != h.dtype:
        h, h_ref = h.float(), h_ref.float()
    both = head.logits(torch.cat([h, h_ref]))
    return both[: h.shape[0]], both[h.shape[0] :]


def chunked_row_terms(
    hidden: torch.Tensor,
    ref_hidden: torch.Tensor | TopKRows | None,
    head: OutputHead,
    fns: Sequence[RowKernel | RowFn],
    weights: Sequence[float],
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of row terms over all rows, and each term's unweighted row sum.

    Args:
        hidden: (M, d) hidden states of the valid positions, any float dtype, with grad.
        ref_hidden: (M, d) reference hidden states (no grad), a precomputed reference (:class:`TopKRows`, M rows;
            only kernels with ``accepts_topk_reference`` take it), or None when no term needs them.
        head: the frozen output head (fp32, bf16 or fp16; the logits are fp32 either way).
        fns: row kernels (:class:`~balora_plugins.core.contract.RowKernel`) or plain per-row functions
            ``f(z, z_ref) -> (rows,)`` (differentiated by autograd) on fp32 logits chunks (rows, V).
        weights: one float per function (λ already divided by the normaliser).
        chunk_size: rows per chunk.

    Returns:
        ``(total, sums)``: ``total`` = Σ_i weights[i]·sums[i] (0-d, differentiable w.r.t. ``hidden``);
        ``sums`` (len(fns),) the unweighted sums Σ_rows f_i, detached.
    """
    if not fns:
        z = hidden.new_zeros((), dtype=torch.float32)
        return z, hidden.new_zeros((0,), dtype=torch.float32)
    kernels = [as_row_kernel(fn) for fn in fns]
    return _ChunkedRowTerms.apply(
        hidden, ref_hidden, head, kernels, [float(w) for w in weights], int(chunk_size)
    )
