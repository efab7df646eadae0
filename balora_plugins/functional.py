"""The reference mathematics of the BA-LoRA terms, on plain logits matrices.

Every function takes ``logits`` of shape (M, C) whose rows are the rows the term acts on (valid token
positions for NLG, examples for NLU), computes in fp32 whatever the input dtype (fp64 inputs stay in fp64,
so ``torch.autograd.gradcheck`` applies), is differentiable and returns a 0-d tensor. The fused trainer path
(:mod:`balora_plugins.core.fused`) computes the same numbers from hidden states without materialising
(M, |V|); the tests hold the two together.

The ``*_rows`` helpers return one value per row (shape (M,)); the chunked driver sums them chunk by chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

__all__ = [
    "consistency_loss",
    "diversity_loss",
    "svd_loss",
    "select_positions",
    "valid_position_mask",
    "kl_rows",
    "mse_rows",
    "entropy_rows",
]


def _f32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least fp32: half/bfloat16 are upcast, fp64 is kept."""
    return x if x.dtype == torch.float64 else x.float()


# ---------------------------------------------------------------------------------------------- per row
def kl_rows(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² · KL(softmax(ref/T) ‖ softmax(logits/T)) per row: (M, C), (M, C) -> (M,)."""
    t = float(temperature)
    logp = F.log_softmax(_f32(logits) / t, dim=-1)
    logq = F.log_softmax(_f32(ref_logits) / t, dim=-1)
    return (t * t) * (logq.exp() * (logq - logp)).sum(-1)


def mse_rows(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Σ_c (ẑ − ẑ_ref)² / C per row, ẑ the row-wise L2-normalised logits: (M, C), (M, C) -> (M,)."""
    a = F.normalize(_f32(logits), dim=-1)
    b = F.normalize(_f32(ref_logits), dim=-1)
    return (a - b).pow(2).mean(-1)


def entropy_rows(logits: torch.Tensor, top_k: int = 0) -> torch.Tensor:
    """Entropy of the softmax over each row's ``top_k`` largest logits (0 = all): (M, C) -> (M,)."""
    z = _f32(logits)
    if 0 < top_k < z.shape[-1]:
        z = z.topk(top_k, dim=-1, sorted=False).values
    logp = F.log_softmax(z, dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ---------------------------------------------------------------------------------------------- public terms
def consistency_loss(
    logits: torch.Tensor, ref_logits: torch.Tensor, *, kind: str = "kl", temperature: float = 1.0
) -> torch.Tensor:
    """Consistency L_CR between the tuned model's ``logits`` and the reference's ``ref_logits`` (both (M, C)).

    ``"kl"``: T² · mean over rows of KL(softmax(ref/T) ‖ softmax(logits/T)).
    ``"mse"``: mean over all M·C entries of the squared difference of the row-wise L2-normalised matrices.
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ in shape."
        )
    if kind == "kl":
        return kl_rows(logits, ref_logits, temperature).mean()
    if kind == "mse":
        return mse_rows(logits, ref_logits).mean()
    raise ValueError(f"consistency_loss: kind={kind!r} is not allowed; choose 'kl' or 'mse'.")


def diversity_loss(logits: torch.Tensor, *, kind: str = "entropy", top_k: int = 0) -> torch.Tensor:
    """Diversity L_DR of ``logits`` (M, C).

    ``"entropy"``: − mean over rows of the entropy of the softmax over the row's ``top_k`` largest logits
    (0 = all). ``"decorrelation"``: centre over rows, Cov = ZcᵀZc/(M−1) (C×C), then (1/C)·Σ_{i≠j} Cov_ij².
    """
    if kind == "entropy":
        return -entropy_rows(logits, top_k).mean()
    if kind == "decorrelation":
        z = _f32(logits)
        m, c = z.shape
        if m < 2:
            raise ValueError(
                f"diversity_loss(kind='decorrelation') needs at least 2 rows to estimate a covariance, got "
                f"logits {tuple(logits.shape)}; use a batch of 2 or more examples."
            )
        zc = z - z.mean(0, keepdim=True)
        cov = zc.T @ zc / (m - 1)
        off = cov - torch.diag_embed(torch.diagonal(cov))
        return off.pow(2).sum() / c
    raise ValueError(f"diversity_loss: kind={kind!r} is not allowed; choose 'entropy' or 'decorrelation'.")


def svd_loss(logits: torch.Tensor, *, k: int, norm: str = "nuclear", eps: float = 1e-8) -> torch.Tensor:
    """SVD term L_SVD = − (Σ_{i≤k} σ_i(Z)) / D for Z = ``logits`` (M, C).

    D = Σ_j σ_j for ``norm="nuclear"`` or ‖Z‖_F for ``norm="frobenius"``; ``eps`` is added to D.
    """
    s = torch.linalg.svdvals(_f32(logits))
    return svd_share(s, k=k, norm=norm, eps=eps, frobenius=None)


def svd_share(
    singular_values: torch.Tensor, *, k: int, norm: str, eps: float, frobenius: torch.Tensor | None
) -> torch.Tensor:
    """− top-k sum of ``singular_values`` (descending, shape (r,)) over the chosen norm.

    ``frobenius`` may be given when the singular values are incomplete; otherwise ‖σ‖₂ is used.
    """
    top = singular_values[:k].sum()
    if norm == "nuclear":
        denom = singular_values.sum()
    elif norm == "frobenius":
        denom = frobenius if frobenius is not None else singular_values.pow(2).sum().sqrt()
    else:
        raise ValueError(f"svd_loss: norm={norm!r} is not allowed; choose 'nuclear' or 'frobenius'.")
    return -top / (denom + eps)


# ---------------------------------------------------------------------------------------------- positions
def valid_position_mask(
    labels: torch.Tensor, *, shift: bool = True, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean (B, T) mask of the positions whose logits a token-level term uses.

    With ``shift=True`` position t is valid when its *next-token* label ``labels[:, t+1]`` is not -100 (the
    logit at t predicts token t+1); the last position is never valid. With packed / padding-free rows,
    ``position_ids`` marks document starts (position id 0): the position before a document start is never
    valid, so no term mixes two documents. ``shift=False`` reproduces the authors' off-by-one mask.
    """
    if not shift:
        return labels != IGNORE_INDEX
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    if position_ids is not None:
        pos = position_ids.reshape(labels.shape)
        mask[:, :-1] &= pos[:, 1:] != 0
    return mask


def select_positions(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift: bool = True,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows of causal-LM ``logits`` (B, T, V) whose next-token label in ``labels`` (B, T) is not -100 -> (M, V)."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T).")
    return logits[valid_position_mask(labels, shift=shift, position_ids=position_ids)]
