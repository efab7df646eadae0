"""The λ schedule: the weights λ1, λ2, λ3 of the BA-LoRA terms over training (docs/method.md §3.1).

* λ1 (consistency): ``constant``; ``cosine``, a cosine decay from λ1 to ``cosine_final_ratio``·λ1; or
  ``adaptive``, per micro-batch λ1 = λ1_min + (λ1_max − λ1_min)·c with c = 1 − H/log|V| the confidence of the
  reference (H its mean tempered entropy over the valid rows).
* λ2, λ3 (diversity, SVD): ``constant``; ``warmup``, 0 for the first ``warmup_start`` of training, then a linear
  ramp over ``warmup_ramp``; ``linear_warmup`` / ``quadratic_warmup``, rising from 0 as (progress/warmup_start) or
  its square. The boundaries are exact fractions of training, or with ``whole_steps`` rounded down to whole
  optimizer steps as the authors' script does.

This module owns the arithmetic; the settings are fields of :class:`~balora_plugins.config.BALoRAConfig`, which
builds a :class:`LambdaSchedule` from them (``BALoRAConfig.schedule``) and validates them. It imports nothing of the
package, so the config can use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

CONSISTENCY_SCHEDULES = ("constant", "cosine", "adaptive")
REGULARIZER_SCHEDULES = ("constant", "warmup", "linear_warmup", "quadratic_warmup")


def consistency_bounds(
    lambda_consistency: float, low: float | None, high: float | None
) -> tuple[float, float]:
    """(λ1_min, λ1_max) of the adaptive schedule: ``low`` and ``high``, or 0.1·λ1 and λ1 where unset (the
    authors')."""
    return (
        0.1 * lambda_consistency if low is None else float(low),
        float(lambda_consistency) if high is None else float(high),
    )


def reference_confidence(entropy: float, width: int) -> float:
    """c = 1 − clamp(H / log|V|, 0, 1) for the reference's mean tempered entropy H over ``width`` = |V| (NLG) or C
    (NLU) outcomes; 0 when H is not finite or there is a single outcome (nothing is known of its confidence)."""
    if not math.isfinite(entropy) or width < 2:
        return 0.0
    return 1.0 - min(max(entropy / math.log(width), 0.0), 1.0)


@dataclass(frozen=True)
class LambdaSchedule:
    """The weights of the three terms as a function of training progress (and, for an adaptive λ1, of the
    reference's confidence on the micro-batch).

    Attributes:
        lambda_consistency, lambda_diversity, lambda_svd: the base weights λ1, λ2, λ3.
        consistency: the λ1 schedule (:data:`CONSISTENCY_SCHEDULES`).
        cosine_final_ratio: final fraction of λ1 under ``cosine``.
        consistency_min, consistency_max: the adaptive λ1's bounds; None = 0.1·λ1 and λ1.
        regularizer: the λ2/λ3 schedule (:data:`REGULARIZER_SCHEDULES`).
        warmup_start, warmup_ramp: fractions of training (see the module docstring).
        whole_steps: boundaries rounded down to whole optimizer steps (the authors' script).
    """

    lambda_consistency: float
    lambda_diversity: float
    lambda_svd: float
    consistency: str = "constant"
    cosine_final_ratio: float = 0.1
    consistency_min: float | None = None
    consistency_max: float | None = None
    regularizer: str = "constant"
    warmup_start: float = 0.2
    warmup_ramp: float = 0.05
    whole_steps: bool = False

    @classmethod
    def from_settings(cls, settings: Any) -> LambdaSchedule:
        """The schedule of an object with :class:`~balora_plugins.config.BALoRAConfig`'s field names."""
        return cls(
            lambda_consistency=settings.lambda_consistency,
            lambda_diversity=settings.lambda_diversity,
            lambda_svd=settings.lambda_svd,
            consistency=settings.consistency_schedule,
            cosine_final_ratio=settings.cosine_final_ratio,
            consistency_min=settings.lambda_consistency_min,
            consistency_max=settings.lambda_consistency_max,
            regularizer=settings.regularizer_schedule,
            warmup_start=settings.warmup_start,
            warmup_ramp=settings.warmup_ramp,
            whole_steps=settings.schedule_whole_steps,
        )

    @property
    def base(self) -> dict[str, float]:
        """The unscheduled weights, keyed by term name."""
        return {
            "consistency": self.lambda_consistency,
            "diversity": self.lambda_diversity,
            "svd": self.lambda_svd,
        }

    @property
    def adaptive(self) -> bool:
        """Whether λ1 depends on the micro-batch (:meth:`with_confidence`)."""
        return self.consistency == "adaptive"

    @property
    def consistency_bounds(self) -> tuple[float, float]:
        """(λ1_min, λ1_max) of the adaptive schedule (:func:`consistency_bounds`)."""
        return consistency_bounds(self.lambda_consistency, self.consistency_min, self.consistency_max)

    def adaptive_consistency(self, confidence: float) -> float:
        """λ1 = λ1_min + (λ1_max − λ1_min)·c for the reference's confidence c in [0, 1] (docs/method.md §3.1)."""
        low, high = self.consistency_bounds
        return low + (high - low) * min(max(float(confidence), 0.0), 1.0)

    def with_confidence(self, lambdas: dict[str, float], confidence: float) -> dict[str, float]:
        """``lambdas`` (from :meth:`at`) with the adaptive λ1 of a micro-batch whose reference has ``confidence``."""
        return {**lambdas, "consistency": self.adaptive_consistency(confidence)}

    def at(
        self, progress: float, step: int | None = None, total_steps: int | None = None
    ) -> dict[str, float]:
        """The three weights at ``progress`` = global_step / max_steps in [0, 1] (clamped).

        With ``whole_steps`` the schedules run on ``step`` (the global optimizer step, from 0) of ``total_steps``
        instead (progress = step / total_steps), with the authors' integer warm-up boundaries; a λ2/λ3 warm-up then
        needs ``step``. Under the adaptive λ1 this returns its upper bound λ1_max, which :meth:`with_confidence`
        lowers by the reference's confidence.
        """
        lam = self.base
        whole = self.whole_steps and self.regularizer != "constant"
        if whole and step is None:
            raise ValueError(
                "BALoRAConfig.schedule_whole_steps=True runs the λ2/λ3 warm-up on whole optimizer steps: pass "
                "lambdas_at(progress, step=global_step, total_steps=max_steps) (the trainers do), or set "
                "schedule_whole_steps=False."
            )
        total = max(int(total_steps or 1), 1)  # as the authors' script: max(int(max_steps or 1), 1)
        if self.whole_steps and step is not None:
            progress = step / total
        p = min(max(float(progress), 0.0), 1.0)
        if self.consistency == "cosine":
            r = self.cosine_final_ratio
            lam["consistency"] *= r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p))
        elif self.adaptive:
            lam["consistency"] = self.consistency_bounds[1]
        if self.regularizer != "constant":
            f = self.warmup_factor_steps(int(step), total) if whole else self.warmup_factor(p)
            lam["diversity"] *= f
            lam["svd"] *= f
        return lam

    def warmup_factor(self, p: float) -> float:
        """λ2/λ3 factor at progress ``p`` in [0, 1], boundaries at exact fractions of training."""
        start = self.warmup_start
        if self.regularizer != "warmup":  # linear_warmup / quadratic_warmup over [0, start)
            f = p / start if p < start else 1.0
            return f * f if self.regularizer == "quadratic_warmup" else f
        if p < start:
            return 0.0
        if self.warmup_ramp == 0 or p >= start + self.warmup_ramp:
            return 1.0
        return (p - start) / self.warmup_ramp

    def warmup_factor_steps(self, s: int, total: int) -> float:
        """λ2/λ3 factor at global step ``s`` of ``total``, boundaries rounded down to whole steps (the authors')."""
        w = int(self.warmup_start * total)
        if self.regularizer != "warmup":
            f = s / w if s < w else 1.0
            return f * f if self.regularizer == "quadratic_warmup" else f
        r = max(int(self.warmup_ramp * total), 1)
        if s < w:
            return 0.0
        if s < w + r:
            return (s - w) / r
        return 1.0
