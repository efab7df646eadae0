"""The fused NLG path (hidden states + frozen head, chunked) against the functional API on materialised logits."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from balora_plugins import functional as Fn
from balora_plugins.core.fused import HiddenView, LogitsView, OutputHead, chunked_row_terms
from balora_plugins.core.terms import KLRows, NegEntropyRows

M, D, V = 10, 6, 40
T, K = 2.0, 5


def _data(m=M, d=D, v=V, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, d, generator=g)
    h_ref = h + 0.3 * torch.randn(m, d, generator=g)
    w = torch.randn(v, d, generator=g) / d**0.5 * 3
    b = torch.randn(v, generator=g) if bias else None
    return h, h_ref, w, b


def _fns(impl="autograd", k=K):
    """The two built-in row terms, as plain functions (autograd path) or the closed-form kernels the objective
    hands the driver; ``mixed`` takes one of each (the driver then falls back to autograd)."""
    if impl == "autograd":
        return [lambda z, zr: Fn.kl_rows(z, zr, T), lambda z, zr: -Fn.entropy_rows(z, k)]
    if impl == "closed_form":
        return [KLRows(T), NegEntropyRows(k)]
    return [KLRows(T), lambda z, zr: -Fn.entropy_rows(z, k)]


IMPLS = ["autograd", "closed_form", "mixed"]


def _materialised(h, h_ref, head, weights):
    """The same weighted row sums through the public functional API on full logits."""
    z, zr = head.logits(h), head.logits(h_ref)
    m = z.shape[0]
    kl = Fn.consistency_loss(z, zr, kind="kl", temperature=T) * m
    ent = Fn.diversity_loss(z, kind="entropy", top_k=K) * m
    return weights[0] * kl + weights[1] * ent, torch.stack([kl, ent])


def _grad_close(a, b, rtol=1e-5):
    """Max-abs error within ``rtol`` of the gradient's scale (fp32 rounding of near-zero entries aside)."""
    scale = float(b.abs().max())
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


HEADS = {
    "plain": dict(),
    "bias": dict(bias=True),
    "scale": dict(scale=0.37),
    "bias+scale": dict(bias=True, scale=1.7),
    "softcap": dict(softcap=4.0),
}


def _head(kind, w, b):
    opts = dict(HEADS[kind])
    return OutputHead(weight=w, bias=b if opts.pop("bias", False) else None, **opts)


# ---------------------------------------------------------------------------------------------- row terms
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk", [1, 3, 4, 10, 64])
@pytest.mark.parametrize("kind", list(HEADS))
def test_chunked_row_terms_match_functional(chunk, kind, impl):
    h, h_ref, w, b = _data(bias=True, seed=chunk)
    head = _head(kind, w, b)
    weights = [0.3, -0.7]
    h1 = h.clone().requires_grad_(True)
    total, sums = chunked_row_terms(h1, h_ref, head, _fns(impl), weights, chunk_size=chunk)
    h2 = h.clone().requires_grad_(True)
    exp_total, exp_sums = _materialised(h2, h_ref, head, weights)
    torch.testing.assert_close(total, exp_total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums, exp_sums.detach(), rtol=1e-5, atol=1e-6)
    assert not sums.requires_grad and total.dim() == 0
    (2.5 * total).backward()  # the upstream gradient is honoured
    (2.5 * exp_total).backward()
    _grad_close(h1.grad, h2.grad)


@pytest.mark.parametrize("impl", ["autograd", "closed_form"])
@pytest.mark.parametrize("top_k", [0, 1, K, V])
@pytest.mark.parametrize("chunk", [3, 32])
def test_chunked_entropy_without_reference(chunk, top_k, impl):
    h, _, w, _ = _data(seed=5)
    head = OutputHead(w)
    h1 = h.clone().requires_grad_(True)
    total, sums = chunked_row_terms(h1, None, head, _fns(impl, top_k)[1:], [0.25], chunk)
    h2 = h.clone().requires_grad_(True)
    expected = 0.25 * Fn.diversity_loss(head.logits(h2), top_k=top_k) * M
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
    total.backward()
    expected.backward()
    _grad_close(h1.grad, h2.grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_chunked_bf16_hidden_and_no_grad(impl):
    h, h_ref, w, _ = _data(seed=6)
    head = OutputHead(w)
    hb = h.bfloat16().requires_grad_(True)
    total, _ = chunked_row_terms(hb, h_ref.bfloat16(), head, _fns(impl), [1.0, 1.0], 4)
    exp, _ = _materialised(hb.detach().float(), h_ref.bfloat16().float(), head, [1.0, 1.0])
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, exp, rtol=1e-5, atol=1e-6)
    total.backward()
    assert hb.grad.dtype == torch.bfloat16 and torch.isfinite(hb.grad).all()
    with torch.no_grad():  # no graph wanted: values only
        t2, _ = chunked_row_terms(h, h_ref, head, _fns(impl), [1.0, 1.0], 4)
    torch.testing.assert_close(t2, _materialised(h, h_ref, head, [1.0, 1.0])[0], rtol=1e-5, atol=1e-6)
    empty, sums = chunked_row_terms(h, h_ref, head, [], [], 4)
    assert float(empty) == 0.0 and sums.numel() == 0


# ---------------------------------------------------------------------------------------------- matrix view
@pytest.mark.parametrize("m,d", [(10, 6), (5, 8)])
@pytest.mark.parametrize("kind", list(HEADS))
def test_hidden_view_singular_values_and_frobenius(m, d, kind):
    h, _, w, b = _data(m=m, d=d, bias=True, seed=m + d)
    head = _head(kind, w, b)
    view = HiddenView(h, head)
    z = head.logits(h).double()
    s_full = torch.linalg.svdvals(z)
    s = view.singular_values()
    r = s.shape[0]
    assert view.shape == (m, V)
    torch.testing.assert_close(s.double(), s_full[:r], rtol=1e-5, atol=1e-5 * float(s_full[0]))
    assert float(torch.cat([s_full[r:], s_full.new_zeros(1)]).max()) < 1e-6 * float(
        s_full[0]
    )  # the rest is zero: rank <= d'
    torch.testing.assert_close(view.frobenius().double(), z.norm(), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("norm", ["frobenius", "nuclear"])
@pytest.mark.parametrize("kind", list(HEADS))
def test_svd_term_gradients_through_hidden_view(norm, kind):
    h, _, w, b = _data(m=9, d=5, bias=True, seed=11)
    head = _head(kind, w, b)
    h1 = h.clone().requires_grad_(True)
    view = HiddenView(h1, head)
    fused = Fn.svd_share(view.singular_values(), k=2, norm=norm, eps=1e-8, frobenius=view.frobenius())
    h2 = h.clone().requires_grad_(True)
    plain = Fn.svd_loss(head.logits(h2), k=2, norm=norm)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-7)
    fused.backward()
    plain.backward()
    _grad_close(h1.grad, h2.grad)


def test_logits_view_is_the_matrix_itself():
    z = torch.randn(6, 4)
    view = LogitsView(z)
    assert view.shape == (6, 4)
    torch.testing.assert_close(view.singular_values(), torch.linalg.svdvals(z))
    torch.testing.assert_close(view.frobenius(), z.norm())


def test_gram_factor_follows_the_head():
    """The cached d×d factor must be recomputed for a new or modified head, never reused stale."""
    h = torch.randn(6, D)
    for seed in range(12):  # fresh heads of one shape, the previous freed: the allocator reuses addresses
        w = torch.randn(V, D, generator=torch.Generator().manual_seed(seed))
        s = HiddenView(h, OutputHead(w)).singular_values()
        torch.testing.assert_close(s, torch.linalg.svdvals(h @ w.T)[:D], rtol=1e-5, atol=1e-5)
        del w, s
    w = torch.randn(V, D)
    head = OutputHead(w)
    HiddenView(h, head).singular_values()
    with torch.no_grad():
        w.mul_(3.0)  # in-place change of the head (e.g. a checkpoint load) bumps its version
    torch.testing.assert_close(HiddenView(h, head).frobenius(), (h @ w.T).norm(), rtol=1e-5, atol=0.0)


def test_gram_factor_cache_keyed_by_source_parameter():
    """A head gathered afresh every step (FSDP2 `full_tensor()`) reuses the factor of its source parameter."""
    w = torch.randn(V, D)
    h = torch.randn(5, D)
    r1 = OutputHead(w.clone(), source=w).gram_factor()
    r2 = OutputHead(w.clone(), source=w).gram_factor()
    assert r2 is r1  # a new per-step copy, the same source: no recomputation
    with torch.no_grad():
        w.mul_(2.0)  # the source changed in place: recomputed
    head = OutputHead(w.clone(), source=w)
    assert head.gram_factor() is not r1
    torch.testing.assert_close(HiddenView(h, head).frobenius(), (h @ w.T).norm(), rtol=1e-5, atol=0.0)


# ---------------------------------------------------------------------------------------------- memory
class _Sizes(TorchDispatchMode):
    """Records the shape of every tensor any ATen op produces."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("impl", ["autograd", "closed_form"])
@pytest.mark.parametrize("chunk", [4, 7])
def test_chunks_bound_peak_logits(chunk, impl):
    m, d, v = 64, 4, 300
    h, h_ref, w, _ = _data(m=m, d=d, v=v, seed=3)
    head = OutputHead(w)
    seen = []

    class RecordingKL(KLRows):  # sees every logits chunk the driver builds, on either path
        def __call__(self, z, zr):
            seen.append(z.shape[0])
            return super().__call__(z, zr)

        def rows_and_grad(self, z, zr, *args, **kwargs):
            seen.append(z.shape[0])
            return super().rows_and_grad(z, zr, *args, **kwargs)

    kl = RecordingKL(T) if impl == "closed_form" else (lambda z, zr: RecordingKL(T)(z, zr))
    fns = [kl, _fns(impl)[1]]
    hg = h.clone().requires_grad_(True)
    with _Sizes() as rec:
        total, _ = chunked_row_terms(hg, h_ref, head, fns, [1.0, 1.0], chunk)
        total.backward()
    assert max(seen) <= chunk and sum(seen) == m and len(seen) == -(-m // chunk)
    sizes = [int(torch.Size(s).numel()) for s in rec.shapes]
    # the largest tensor is one chunk of logits and its reference logits, computed in one product with the head
    # (or the head itself); never the (M, |V|) matrix
    assert max(sizes) <= max(2 * chunk, d) * v < m * v
    logits_like = [s for s in rec.shapes if len(s) == 2 and s[-1] == v]
    assert logits_like and max(s[0] for s in logits_like) <= max(2 * chunk, d)
    exp, _ = _materialised(h, h_ref, head, [1.0, 1.0])
    torch.testing.assert_close(total, exp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", ["frobenius", "nuclear"])
def test_softcap_svd_with_more_rows_than_columns(norm):
    """M > |V|: the M×M Gram has M − |V| zero eigenvalues; they pass no gradient and are not singular values."""
    h, _, w, _ = _data(m=30, d=6, v=12, seed=4)
    head = OutputHead(weight=w, softcap=3.0)
    h1, h2 = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    view = HiddenView(h1, head, chunk_size=2)
    s = view.singular_values()
    assert s.shape == (12,)
    fused = Fn.svd_share(s, k=3, norm=norm, eps=1e-8, frobenius=view.frobenius())
    plain = Fn.svd_loss(head.logits(h2), k=3, norm=norm)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-7)
    fused.backward()
    plain.backward()
    assert torch.isfinite(h1.grad).all()
    _grad_close(h1.grad, h2.grad)


def test_softcap_gram_never_materialises_the_logits():
    """The soft-capped SVD path (forward and backward) holds one block of ``chunk·|V|/M`` columns plus M×M."""
    m, d, v, chunk = 40, 6, 500, 4
    h, _, w, _ = _data(m=m, d=d, v=v, seed=8)
    head = OutputHead(weight=w, softcap=5.0)
    h1 = h.clone().requires_grad_(True)
    with _Sizes() as rec:
        view = HiddenView(h1, head, chunk_size=chunk)
        loss = Fn.svd_share(
            view.singular_values(), k=3, norm="frobenius", eps=1e-8, frobenius=view.frobenius()
        )
        loss.backward()
    sizes = [int(torch.Size(s).numel()) for s in rec.shapes if tuple(s) != (v, d)]  # not views of the head
    assert max(sizes) <= max(m * m, m * (chunk * v // m)) < m * v
    h2 = h.clone().requires_grad_(True)
    plain = Fn.svd_loss(head.logits(h2), k=3, norm="frobenius")
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-7)
    plain.backward()
    _grad_close(h1.grad, h2.grad)
