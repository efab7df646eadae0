"""`LossScaling`: how the host trainer scales the loss a ``compute_loss`` returns, and the weights that put a BA-LoRA
term on the same scale (docs/method.md §3.3).

A row term (consistency; NLG entropy) is a sum over rows times a row weight: per token (:meth:`token_weight`, NLG,
the host's ``num_items_in_batch`` normalisation) or per example (:meth:`example_weight`, NLU, a micro-batch mean);
which one is the task's (:mod:`.rows`). A matrix term (SVD; NLU decorrelation) is a per-micro-batch statistic
(:meth:`matrix_weight`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LossScaling:
    """How the host trainer scales the loss a ``compute_loss`` returns.

    Attributes:
        num_items_in_batch: the token count the host divided its summed cross-entropy by (over all micro-batches
            of the optimizer step, and all ranks when tokens are averaged across devices), or None.
        world_factor: the factor the host multiplied its token-normalised loss by (DDP averages gradients).
        ga_steps: gradient-accumulation micro-batches in the current optimizer step.
        host_divides_by_ga: whether the host divides the returned loss by ``ga_steps`` afterwards.
    """

    num_items_in_batch: float | None = None
    world_factor: float = 1.0
    ga_steps: int = 1
    host_divides_by_ga: bool = True

    def token_weight(self, lam: float, local_rows: int) -> float:
        """Weight turning a sum over ``local_rows`` token rows into the host's normalisation: λ·world/N when the
        host normalises its token loss by ``num_items_in_batch`` (NLG), else :meth:`example_weight`."""
        if self.num_items_in_batch is not None:
            return lam * self.world_factor / max(float(self.num_items_in_batch), 1.0)
        return self.example_weight(lam, local_rows)

    def example_weight(self, lam: float, local_rows: int) -> float:
        """Weight turning a sum over ``local_rows`` rows into a micro-batch mean λ/M that, like a matrix term, is
        averaged over the accumulation steps — by the host when it divides by them, else here (BERT-style
        classifiers accept ``**kwargs``, so the Trainer skips that division while their cross-entropy ignores the
        item count; the BA-LoRA terms stay split-invariant regardless)."""
        return self.matrix_weight(lam) / max(local_rows, 1)

    def row_weight(self, lam: float, local_rows: int, by_items: bool) -> float:
        """:meth:`token_weight` when ``by_items``, else :meth:`example_weight`."""
        return self.token_weight(lam, local_rows) if by_items else self.example_weight(lam, local_rows)

    def matrix_weight(self, lam: float) -> float:
        """Weight of a per-micro-batch statistic: λ, divided by the accumulation steps unless the host does."""
        return lam if self.host_divides_by_ga else lam / max(self.ga_steps, 1)
