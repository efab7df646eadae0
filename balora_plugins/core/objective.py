"""`BALoRAObjective`: the one object every trainer adapter calls.

It validates the model, installs the reference (:mod:`.reference`), asks the task's rows strategy (:mod:`.rows`,
chosen once: the captured final hidden states of a causal LM, or a classifier's logits) for each micro-batch's
rows and reference rows, and returns the weighted regularizer loss — scaled exactly as the host trainer scales
its cross-entropy (docs/method.md §3.3) — together with per-term metrics. The weights follow the λ schedule
(:mod:`balora_plugins.schedule`).

Scaling (see :class:`~.scaling.LossScaling`): a row term (consistency; NLG entropy) is a sum over valid rows
times the task's row weight — divided by the host's ``num_items_in_batch`` (times the host's ×world-size
factor) when the host normalises its token loss that way, else a micro-batch mean that the host then divides
by the accumulation steps. A matrix term (SVD; NLU decorrelation) is a per-micro-batch statistic: the
optimizer step sees its mean over the micro-batches (and, under DDP, over ranks).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..config import BALoRAConfig
from ..schedule import reference_confidence as confidence_from_entropy
from . import reference as ref
from .fused import OutputHead
from .model import check_trained_parameters, dropout_warning, validate_model
from .plugins import collect_terms
from .refcache import ReferenceCache
from .rows import RowBatch, TaskRows, task_rows
from .scaling import LossScaling
from .terms import MATRIX, ROW, Term

__all__ = ["BALoRAObjective", "LossScaling"]


class BALoRAObjective:
    """Shared BA-LoRA core: reference, rows, the terms, scaling, metrics.

    Typical use by an adapter::

        obj = BALoRAObjective(config, ref_model=None).prepare(model)     # once, before step 1
        loss = host_loss + obj.compute(model, inputs, scaling=..., progress=step / max_steps)[0]
    """

    def __init__(
        self,
        config: BALoRAConfig | str | dict | None = None,
        *,
        ref_model: nn.Module | None = None,
        extra_plugins: Sequence[Any] = (),
        adapter_name: str = "default",
    ):
        self.config = BALoRAConfig.coerce(config)
        self.ref_model = ref_model
        self.adapter_name = adapter_name
        self.terms: list[Term] = collect_terms(self.config, extra_plugins)
        self.mode: str | None = None
        # where the rows and the reference rows come from, for this config's task: chosen once
        self.rows: TaskRows = task_rows(self)
        self._peft_model: nn.Module | None = None
        self.skipped: dict[str, int] = {}
        self._warned: set[str] = set()  # warnings given at construction (prepare runs again at train begin)

    # ------------------------------------------------------------------ setup
    def prepare(self, model: nn.Module) -> BALoRAObjective:
        """Validate ``model`` and install the reference and the rows strategy (NLG: the capture hook). Idempotent.

        Before anything is changed: a ``ref_model`` that is part of the trained model is refused. Then the model
        checks (:func:`~.model.validate_model`), the reference (:func:`~.reference.prepare_reference`: decided once,
        recorded on the model), and the task's own checks (:meth:`~.rows.TaskRows.check`; NLG: the replayed
        backbone and the output head, checked on one probe forward of a few tokens).
        """
        peft_model = ref.unwrap(model)
        # checks first: nothing of the user's (the model, a ref_model) is changed when one of them refuses
        if self.ref_model is not None:
            ref.check_separate_reference(self.ref_model, peft_model)
        validate_model(peft_model, self.config, self.adapter_name)
        mode = ref.resolve_mode(self.config.reference, peft_model, self.ref_model, self.adapter_name)
        if mode != "model":
            check_trained_parameters(peft_model, self.adapter_name)
        elif self.config.reference_head == "current":
            raise ValueError(
                "BALoRAConfig.reference_head='current' reads the reference's features through the head being "
                "trained, which a separate ref_model does not hold. Omit ref_model (the adapter snapshot or the "
                "disabled adapter is the pre-trained backbone) or set reference_head='initial'."
            )
        for text in self.rows.check(peft_model, peft_model.get_base_model(), mode, self.terms):
            self._warn_once(text)
        # then install
        self._peft_model = peft_model
        self.mode = ref.prepare_reference(
            peft_model, self.config.reference, self.ref_model, self.adapter_name
        )
        self._warn_once(dropout_warning(peft_model, self.adapter_name))
        self.rows.install()
        if self.ref_model is not None:
            self.ref_model.eval()  # (a DeepSpeed engine's eval() returns None)
            self.ref_model.requires_grad_(False)
        return self

    def check_dataset(self, dataset: Any) -> None:
        """Refuse, before step 1, a training dataset the reference source cannot serve (a precomputed reference
        without rows for some of its examples); a no-op for the online reference."""
        self.rows.check_dataset(dataset)

    # ------------------------------------------------------------------ the rows strategy's state
    @property
    def head(self) -> OutputHead | None:
        """NLG: the frozen output head the rows are read through (None for NLU, and before :meth:`prepare`)."""
        return self.rows.head

    @property
    def num_classes(self) -> int | None:
        """NLU: the classifier's number of classes (None for NLG, and before :meth:`prepare`)."""
        return self.rows.num_classes

    @property
    def reference_cache(self) -> ReferenceCache | None:
        """NLU with ``reference_cache=True``: the exact per-example cache of the reference logits, else None."""
        return self.rows.reference_cache

    @property
    def needs_logits(self) -> bool:
        """Whether :meth:`compute` needs the logits of the host's forward (NLU)."""
        return self.rows.needs_logits

    @property
    def rewrites_base(self) -> bool:
        """Whether the trained adapter's frozen base is not the pre-trained model (decided at :meth:`prepare`):
        the exports must then convert the adapter (docs/method.md §1)."""
        return self._peft_model is not None and ref.has_residual_base(self._peft_model, self.adapter_name)

    @property
    def backbone_path(self) -> str | None:
        """NLG: the path, in the base model, of the backbone whose forward is captured and replayed."""
        return self.rows.backbone_path

    @property
    def captured_hidden(self) -> torch.Tensor | None:
        """The final hidden states (B, T, d) of the student's last decoder forward (NLG), or None."""
        return self.rows.captured_hidden

    def release_capture(self) -> None:
        """Drop the captured forward (its hidden states and inputs) once it has been used."""
        self.rows.release_capture()

    def remove_hooks(self) -> None:
        """Remove the capture hook (NLG); :meth:`prepare` installs it again."""
        self.rows.remove_hooks()

    def reference_hidden(self, model: nn.Module) -> torch.Tensor:
        """NLG: the reference's final hidden states (B, T, d) for the micro-batch the student just ran (no grad)."""
        return self.rows.reference_hidden(model)

    def valid_mask(self, inputs: Mapping[str, Any], hidden: torch.Tensor) -> torch.Tensor:
        """NLG: (B, T) bool, the positions whose next-token label is trained."""
        return self.rows.valid_mask(inputs, hidden)

    def reference_logits(self, model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
        """NLU: the reference's classifier logits (B, C) for ``inputs`` (no grad)."""
        return self.rows.reference_logits(model, inputs)

    # ------------------------------------------------------------------ the loss
    def compute(
        self,
        model: nn.Module,
        inputs: Mapping[str, Any],
        *,
        logits: torch.Tensor | None = None,
        scaling: LossScaling | None = None,
        progress: float = 0.0,
        step: int | None = None,
        total_steps: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted regularizer loss of the micro-batch the model just ran, and its metrics.

        Args:
            model: the (possibly wrapped) PEFT model that ran the forward.
            inputs: the micro-batch (``labels`` (B, T) for NLG; optional ``position_ids`` / ``shift_labels``).
            logits: NLU only: the classifier logits (B, C) of that forward.
            scaling: the host's loss scaling for this step (default: a plain micro-batch mean).
            progress: global_step / max_steps in [0, 1], for the λ schedules.
            step, total_steps: the global optimizer step and the total number of steps (needed by
                ``schedule_whole_steps``; see :meth:`BALoRAConfig.lambdas_at`).

        Returns:
            ``(loss, metrics)``: a 0-d tensor to add to the host's loss and a dict of floats keyed
            ``balora/...``.
        """
        try:
            return self._compute(model, inputs, logits, scaling, progress, step, total_steps)
        finally:
            self.rows.end_step()

    def _compute(
        self, model, inputs, logits, scaling, progress, step, total_steps
    ) -> tuple[torch.Tensor, dict[str, float]]:
        scaling = scaling or LossScaling()
        schedule = self.config.schedule
        lambdas = schedule.at(progress, step=step, total_steps=total_steps)
        weights = {t.name: t.weight(lambdas) for t in self.terms}
        metrics: dict[str, float] = {f"balora/lambda_{k}": v for k, v in weights.items()}
        need_ref = any(t.needs_reference and weights[t.name] > 0 for t in self.terms)
        batch = self.rows.micro_batch(model, inputs, logits, need_ref)
        if batch is None:  # legitimate (a prompt truncated to the max length): nothing to regularise
            self.skipped["no_valid_rows"] = self.skipped.get("no_valid_rows", 0) + 1
            metrics["balora/skipped_no_valid_rows"] = float(self.skipped["no_valid_rows"])
            return torch.zeros((), device="cpu", dtype=torch.float32), metrics
        device = batch.rows.device
        loss = torch.zeros((), device=device, dtype=torch.float32)
        metrics["balora/rows"] = float(batch.rows.shape[0])
        if schedule.adaptive and batch.reference is not None:
            confidence = self.reference_confidence(batch.reference)
            lambdas = schedule.with_confidence(lambdas, confidence)
            weights = {t.name: t.weight(lambdas) for t in self.terms}
            metrics.update({f"balora/lambda_{k}": v for k, v in weights.items()})
            metrics["balora/reference_confidence"] = confidence
        with torch.autocast(device_type=device.type, enabled=False):
            row_terms = [t for t in self.terms if t.level == ROW and weights[t.name] > 0]
            loss = loss + self._row_loss(row_terms, batch, weights, scaling, metrics)
            for t in self.terms:
                if t.level != MATRIX or weights[t.name] <= 0:
                    continue
                # constant for this shape: skipped, so its effective weight is 0
                if t.is_noop(*batch.view.shape):
                    metrics[f"balora/lambda_{t.name}"] = 0.0
                    continue
                try:
                    value = t.matrix(batch.view)
                except torch.linalg.LinAlgError:  # svdvals/eigh raise on non-finite input instead of NaN
                    value = torch.tensor(float("nan"))
                if not self._finite(t.name, value, metrics):
                    continue
                loss = loss + scaling.matrix_weight(weights[t.name]) * value
                self._record(metrics, t.name, float(value.detach()), weights[t.name])
        metrics["balora/loss"] = float(sum((v for k, v in metrics.items() if k.endswith("_weighted")), 0.0))
        self._check_gradient(model, loss, weights, metrics)
        return loss, metrics

    def _check_gradient(self, model, loss: torch.Tensor, weights, metrics: dict[str, float]) -> None:
        """Refuse to train on when a term with λ > 0 was computed but carries no gradient (the terms would be logged
        as usual and act on nothing): a training forward under ``torch.no_grad``, or a host path BA-LoRA does not
        know."""
        active = [t.name for t in self.terms if weights[t.name] > 0 and f"balora/{t.name}" in metrics]
        if not active or loss.requires_grad or not torch.is_grad_enabled() or not ref.unwrap(model).training:
            return
        raise RuntimeError(
            f"BA-LoRA's terms {active} have λ > 0 but no gradient on this training micro-batch: they were computed "
            "on a forward run without gradient, so they would be logged and never trained. Call the model with "
            "gradients enabled before objective.compute (the trainers do), or report the host trainer and version."
        )

    def reference_confidence(self, ref_rows: Any) -> float:
        """c = 1 − clamp(H / log|V|, 0, 1), H the mean over rows of the entropy of softmax(Z_ref/T).

        ``ref_rows``: the reference's valid rows — hidden states (M, d) sent through the frozen head chunk by
        chunk (NLG: never the (M, |V|) logits at once), stored top-k rows (precomputed) or logits (M, C) (NLU).
        No gradient: the adaptive λ1 is a constant of the micro-batch. It runs before the fused pass because that
        pass folds every term's weighted gradient into one buffer, so λ1 must be known first (docs/method.md §3.1,
        adaptive λ1).
        """
        return confidence_from_entropy(*self.rows.reference_entropy(ref_rows))

    def _row_loss(self, terms, batch: RowBatch, weights, scaling: LossScaling, metrics) -> torch.Tensor:
        """Σ over the row ``terms`` of weight × row sum; a non-finite term is skipped and the rest recomputed."""
        m = batch.rows.shape[0]
        while terms:
            fns = [t.row_kernel() for t in terms]
            w = [self.rows.row_weight(scaling, weights[t.name], m) for t in terms]
            total, sums = self.rows.row_sums(batch, fns, w)
            bad = [t for t, s in zip(terms, sums.tolist(), strict=True) if not math.isfinite(s)]
            if not bad:
                for t, s in zip(terms, sums.tolist(), strict=True):
                    self._record(metrics, t.name, s / m, weights[t.name])
                return total
            for t in bad:
                self._finite(t.name, torch.tensor(float("nan")), metrics)
            terms = [t for t in terms if t not in bad]  # recompute without the non-finite terms
        return batch.rows.new_zeros((), dtype=torch.float32)

    # ------------------------------------------------------------------ helpers
    def _warn_once(self, text: str | None) -> None:
        if text is not None and text not in self._warned:
            self._warned.add(text)
            warnings.warn(text, UserWarning, stacklevel=3)

    @staticmethod
    def _record(metrics: dict[str, float], name: str, raw: float, lam: float) -> None:
        metrics[f"balora/{name}"] = raw
        metrics[f"balora/{name}_weighted"] = lam * raw

    def _finite(self, name: str, value: torch.Tensor, metrics: dict[str, float]) -> bool:
        if bool(torch.isfinite(value.detach()).all()):
            return True
        if self.config.on_nonfinite == "raise":
            raise FloatingPointError(
                f"BA-LoRA term {name!r} is not finite ({float(value)}); on_nonfinite='raise'."
            )
        self.skipped[name] = self.skipped.get(name, 0) + 1
        metrics[f"balora/skipped_{name}"] = float(self.skipped[name])
        warnings.warn(
            f"BA-LoRA term {name!r} is not finite on this micro-batch and is skipped "
            f"({self.skipped[name]} time(s) so far); training continues.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
