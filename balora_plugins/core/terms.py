"""The three built-in BA-LoRA terms, each a small object stating its per-row or per-matrix formula.

Row terms (consistency; NLG diversity) give one value per row of the logits; the chunked driver sums
them chunk by chunk and the objective normalises the sum like the host's cross-entropy. Matrix terms
(SVD; NLU decorrelation) are per-micro-batch statistics of the whole logits matrix, seen through a
:class:`~balora_plugins.core.fused.LogitsView` that can avoid materialising the logits.

This module is registered through the ``balora_plugins`` entry-point group (see ``pyproject.toml``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import functional as Fn
from ..config import BALoRAConfig
from .hookspecs import hookimpl

ROW = "row"
MATRIX = "matrix"


@dataclass
class Term:
    """Base class of a regulariser term.

    Subclasses set ``name``, ``level`` (``"row"`` or ``"matrix"``), ``needs_reference`` and implement
    :meth:`rows` (row terms: (M, C) logits, (M, C) reference logits or None -> (M,)) or :meth:`matrix`
    (matrix terms: a LogitsView -> 0-d tensor). :meth:`weight` maps the scheduled λs to this term's weight;
    a third-party term may ignore them and return its own constant.
    """

    name: str = "term"
    level: str = ROW
    needs_reference: bool = False

    def weight(self, lambdas: dict[str, float]) -> float:
        return float(lambdas.get(self.name, 0.0))

    def rows(self, logits: torch.Tensor, ref_logits: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover
        raise TypeError(f"term {self.name!r} is a row term but does not define rows()")

    def matrix(self, view) -> torch.Tensor:  # pragma: no cover
        raise TypeError(f"term {self.name!r} is a matrix term but does not define matrix()")

    def is_noop(self, num_rows: int, num_cols: int) -> bool:
        """True when the term is constant for logits of this shape (so it is skipped)."""
        return False


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


class EntropyDiversity(Term):
    """L_DR for NLG: minus the entropy of each position's top-K renormalised distribution."""

    def __init__(self, config: BALoRAConfig):
        super().__init__(name="diversity", level=ROW)
        self.top_k = config.entropy_top_k

    def rows(self, logits, ref_logits):
        return -Fn.entropy_rows(logits, self.top_k)


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


@hookimpl
def balora_terms(config: BALoRAConfig) -> list[Term]:
    diversity = EntropyDiversity(config) if config.diversity_kind == "entropy" else Decorrelation(config)
    return [Consistency(config), diversity, SVDShare(config)]
