"""`balora_plugins.functional` against independent float64 numpy / Python-loop computations of docs/method.md §3."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from balora_plugins import functional as Fn


def _rand(m=7, c=11, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, c, generator=g) * scale


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _close(value: torch.Tensor, expected: float, rtol=1e-5, atol=1e-7):
    assert value.dim() == 0 and value.dtype in (torch.float32, torch.float64)
    assert float(value) == pytest.approx(expected, rel=rtol, abs=atol)


# ---------------------------------------------------------------------------------------------- consistency
@pytest.mark.parametrize("t", [1.0, 2.0, 0.5])
def test_kl_with_temperature(t):
    z, r = _rand(seed=1), _rand(seed=2)
    zn, rn = _np(z), _np(r)
    total = 0.0
    for i in range(zn.shape[0]):  # KL(p_ref || p) of the tempered softmaxes, row by row
        p, q = _softmax(zn[i] / t), _softmax(rn[i] / t)
        total += sum(q[j] * (np.log(q[j]) - np.log(p[j])) for j in range(len(p)))
    _close(Fn.consistency_loss(z, r, kind="kl", temperature=t), t * t * total / zn.shape[0])


def test_kl_is_zero_on_identical_and_direction_matters():
    z, r = _rand(seed=3), _rand(seed=4)
    assert float(Fn.consistency_loss(z, z.clone(), temperature=2.0)) == pytest.approx(0.0, abs=1e-6)
    kl_rz = Fn.consistency_loss(z, r)  # KL(p_r || p_z)
    kl_zr = Fn.consistency_loss(r, z)  # KL(p_z || p_r)
    p = torch.distributions.Categorical(logits=r.double())
    q = torch.distributions.Categorical(logits=z.double())
    _close(kl_rz, float(torch.distributions.kl_divergence(p, q).mean()))
    assert abs(float(kl_rz) - float(kl_zr)) > 1e-3


def test_mse_of_normalised_rows():
    z, r = _rand(seed=5), _rand(seed=6)
    zn, rn = _np(z), _np(r)
    a = zn / np.sqrt((zn**2).sum(1, keepdims=True))
    b = rn / np.sqrt((rn**2).sum(1, keepdims=True))
    _close(Fn.consistency_loss(z, r, kind="mse"), float(((a - b) ** 2).mean()))
    # scale invariance per row: the normalised MSE ignores a positive row scaling
    scaled = z * torch.arange(1, 8, dtype=torch.float32)[:, None]
    _close(Fn.consistency_loss(scaled, r, kind="mse"), float(((a - b) ** 2).mean()))


def test_consistency_rejects_shape_mismatch_and_kind():
    with pytest.raises(ValueError, match=r"\(7, 11\).*\(7, 10\)"):
        Fn.consistency_loss(_rand(), _rand(c=10))
    with pytest.raises(ValueError, match="kind='js'"):
        Fn.consistency_loss(_rand(), _rand(), kind="js")


# ---------------------------------------------------------------------------------------------- diversity
@pytest.mark.parametrize("k", [0, 1, 4, 11, 50])
def test_top_k_entropy(k):
    z = _rand(seed=7)
    zn = _np(z)
    ents = []
    for row in zn:
        top = sorted(row, reverse=True)[: (k if 0 < k < len(row) else len(row))]
        p = _softmax(np.array(top))
        ents.append(-sum(pi * np.log(pi) for pi in p))
    _close(Fn.diversity_loss(z, kind="entropy", top_k=k), -float(np.mean(ents)))
    if k == 1:
        assert float(Fn.diversity_loss(z, top_k=1)) == 0.0  # one logit: a point mass


def test_decorrelation():
    z = _rand(m=9, c=5, seed=8)
    zn = _np(z)
    m, c = zn.shape
    mean = [sum(zn[i, j] for i in range(m)) / m for j in range(c)]
    total = 0.0
    for a in range(c):
        for b in range(c):
            if a != b:
                cov = sum((zn[i, a] - mean[a]) * (zn[i, b] - mean[b]) for i in range(m)) / (m - 1)
                total += cov * cov
    _close(Fn.diversity_loss(z, kind="decorrelation"), total / c)
    cov = np.cov(zn, rowvar=False)  # second, vectorised independent form
    _close(Fn.diversity_loss(z, kind="decorrelation"), float(((cov - np.diag(np.diag(cov))) ** 2).sum() / c))


def test_decorrelation_needs_two_rows():
    with pytest.raises(ValueError, match="at least 2 rows"):
        Fn.diversity_loss(_rand(m=1), kind="decorrelation")
    with pytest.raises(ValueError, match="kind='gini'"):
        Fn.diversity_loss(_rand(), kind="gini")


# ---------------------------------------------------------------------------------------------- svd
@pytest.mark.parametrize("shape", [(7, 11), (12, 5)])
@pytest.mark.parametrize("k", [1, 3, 20])
def test_svd_nuclear_and_frobenius(shape, k):
    z = _rand(*shape, seed=9)
    s = np.linalg.svd(_np(z), compute_uv=False)
    top = s[:k].sum()
    _close(Fn.svd_loss(z, k=k, norm="nuclear"), -top / s.sum())
    _close(Fn.svd_loss(z, k=k, norm="frobenius"), -top / np.sqrt((_np(z) ** 2).sum()))
    if k >= min(shape):
        _close(Fn.svd_loss(z, k=k, norm="nuclear"), -1.0)  # the share is identically 1
    with pytest.raises(ValueError, match="norm='spectral'"):
        Fn.svd_loss(z, k=k, norm="spectral")


# ---------------------------------------------------------------------------------------------- positions
def _labels():
    lab = torch.tensor([[-100, -100, 5, 6, 7, -100], [-100, 8, 9, -100, 10, 11]])
    return lab


def test_select_positions_shifted_vs_unshifted_vs_loop():
    lab = _labels()
    b, t = lab.shape
    logits = torch.randn(b, t, 13)
    shifted = [logits[i, j] for i in range(b) for j in range(t - 1) if lab[i, j + 1] != -100]
    unshifted = [logits[i, j] for i in range(b) for j in range(t) if lab[i, j] != -100]
    assert torch.equal(Fn.select_positions(logits, lab), torch.stack(shifted))
    assert torch.equal(Fn.select_positions(logits, lab, shift=False), torch.stack(unshifted))
    mask = Fn.valid_position_mask(lab)
    assert mask.tolist() == [[False, True, True, True, False, False], [True, True, False, True, True, False]]
    with pytest.raises(ValueError, match=r"disagree on \(B, T\)"):
        Fn.select_positions(logits[:, :-1], lab)


def test_position_ids_document_boundaries():
    # one packed row holding three documents starting at t = 0, 4, 7
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    lab = torch.tensor([[-100, 11, 12, 13, 20, 21, 22, -100, 31, 32]])
    mask = Fn.valid_position_mask(lab, position_ids=pos)
    expected = [
        t < 9 and lab[0, t + 1] != -100 and pos[0, t + 1] != 0 for t in range(10)
    ]  # never predict across a document start
    assert mask[0].tolist() == expected
    assert mask[0].tolist() == [True, True, True, False, True, True, False, True, True, False]
    # flat (T,) position_ids of padding-free collators are reshaped to the labels
    assert torch.equal(Fn.valid_position_mask(lab, position_ids=pos[0]), mask)


# ---------------------------------------------------------------------------------------------- dtype, grads
def test_bf16_inputs_are_computed_in_fp32():
    z, r = _rand(seed=10).bfloat16(), _rand(seed=11).bfloat16()
    pairs = [
        (
            Fn.consistency_loss(z, r, temperature=2.0),
            Fn.consistency_loss(z.float(), r.float(), temperature=2.0),
        ),
        (Fn.consistency_loss(z, r, kind="mse"), Fn.consistency_loss(z.float(), r.float(), kind="mse")),
        (Fn.diversity_loss(z, top_k=4), Fn.diversity_loss(z.float(), top_k=4)),
        (Fn.diversity_loss(z, kind="decorrelation"), Fn.diversity_loss(z.float(), kind="decorrelation")),
        (Fn.svd_loss(z, k=3, norm="frobenius"), Fn.svd_loss(z.float(), k=3, norm="frobenius")),
    ]
    for low, ref in pairs:
        assert low.dtype == torch.float32 and low.dim() == 0
        torch.testing.assert_close(low, ref, rtol=1e-6, atol=1e-7)
    zg = z.clone().requires_grad_(True)
    Fn.diversity_loss(zg, top_k=4).backward()
    assert zg.grad.dtype == torch.bfloat16 and zg.grad.abs().sum() > 0


def _gradcheck(fn, *xs):
    xs = [x.double().requires_grad_(True) for x in xs]
    assert torch.autograd.gradcheck(fn, xs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradients_float64_gradcheck():
    z, r = _rand(m=4, c=6, seed=12, scale=1.0), _rand(m=4, c=6, seed=13, scale=1.0)
    _gradcheck(lambda a, b: Fn.consistency_loss(a, b, temperature=2.0), z, r)
    _gradcheck(lambda a, b: Fn.consistency_loss(a, b, kind="mse"), z, r)
    _gradcheck(lambda a: Fn.diversity_loss(a, top_k=3), z)
    _gradcheck(lambda a: Fn.diversity_loss(a, top_k=0), z)
    _gradcheck(lambda a: Fn.diversity_loss(a, kind="decorrelation"), z)
    _gradcheck(lambda a: Fn.svd_loss(a, k=2, norm="nuclear"), z)
    _gradcheck(lambda a: Fn.svd_loss(a, k=2, norm="frobenius"), z)
    out = Fn.svd_loss(z.double(), k=2)
    assert out.dtype == torch.float64  # fp64 stays fp64 (fp32 is the floor, not a cast)
