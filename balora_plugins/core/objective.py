"""`BALoRAObjective`: the one object every trainer adapter calls.

It validates the model, installs the reference (:mod:`.reference`), captures the decoder backbone's final
hidden states (the stable place every TRL/transformers version computes), and on each micro-batch returns
the weighted regularizer loss — scaled exactly as the host trainer scales its cross-entropy (docs/method.md §3.3) —
together with per-term metrics.

Scaling (see :class:`LossScaling`): a row term (consistency; NLG entropy) is a sum over valid rows divided
by the host's ``num_items_in_batch`` (times the host's ×world-size factor) when the host normalises its
token loss that way, else a micro-batch mean that the host then divides by the accumulation steps. A matrix
term (SVD; NLU decorrelation) is a per-micro-batch statistic: the optimizer step sees its mean over the
micro-batches (and, under DDP, over ranks).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import BALoRAConfig
from ..functional import valid_position_mask
from . import distributed
from . import reference as ref
from .fused import HiddenView, LogitsView, OutputHead, chunked_row_terms
from .model import (
    check_head_config,
    check_head_reproduces_logits,
    check_reference_head,
    check_trained_parameters,
    classifier_head,
    dropout_warning,
    multi_label_error,
    new_head_warning,
    output_head,
    replay_backbone,
    validate_model,
)
from .plugins import collect_terms
from .precomputed import PrecomputedReference
from .refcache import ReferenceCache, reference_state
from .terms import MATRIX, ROW, TemperedEntropyRows, Term


# ---------------------------------------------------------------------------------------------- scaling
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

    def row_weight(self, lam: float, local_rows: int, by_items: bool) -> float:
        """Weight turning a row-sum into the host's normalisation.

        λ·world/N when the host normalises its token loss by ``num_items_in_batch`` (NLG); otherwise a micro-batch
        mean λ/M that, like a matrix term, is averaged over the accumulation steps — by the host when it divides
        by them, else here (BERT-style classifiers accept ``**kwargs``, so the Trainer skips that division while
        their cross-entropy ignores the item count; the BA-LoRA terms stay split-invariant regardless).
        """
        if by_items and self.num_items_in_batch is not None:
            return lam * self.world_factor / max(float(self.num_items_in_batch), 1.0)
        return self.matrix_weight(lam) / max(local_rows, 1)

    def matrix_weight(self, lam: float) -> float:
        return lam if self.host_divides_by_ga else lam / max(self.ga_steps, 1)


# ---------------------------------------------------------------------------------------------- reference sources
class OnlineReference:
    """The reference source that runs the reference forward on every micro-batch (the adapter snapshot, the
    disabled adapter or a separate model; :mod:`.reference`). The other source is
    :class:`~balora_plugins.core.precomputed.PrecomputedReference` (``reference='precomputed'``): both give the
    objective the reference rows of the valid positions and the reference's mean tempered entropy."""

    def __init__(self, objective: BALoRAObjective):
        self.objective = objective

    def rows(self, model: nn.Module, inputs: Mapping[str, Any], mask: torch.Tensor) -> torch.Tensor:
        """The reference's final hidden states (M, d) at the valid positions ``mask`` (B, T)."""
        # Every rank runs the reference forward, rows or not: collectives under ZeRO-3 and FSDP.
        with distributed.unsharded_root(model):
            return self.objective.reference_hidden(model)[mask]

    def mean_entropy(self, ref_rows: torch.Tensor) -> tuple[float, int]:
        """(mean over rows of H(softmax(Z_ref/T)), |V| or C) from hidden states (M, d) sent through the frozen head
        chunk by chunk (NLG: never the (M, |V|) logits at once) or from logits (M, C) (NLU)."""
        obj = self.objective
        kernel = TemperedEntropyRows(obj.config.consistency_temperature)
        with torch.no_grad(), torch.autocast(device_type=ref_rows.device.type, enabled=False):
            if obj.head is not None:  # NLG: hidden states through the head (NLU keeps no head)
                _, sums = chunked_row_terms(ref_rows, None, obj.head, [kernel], [0.0], obj.config.chunk_size)
                return float(sums[0]) / ref_rows.shape[0], obj.head.weight.shape[0]
            return float(kernel(ref_rows.float(), None).mean()), ref_rows.shape[-1]

    def check_dataset(self, dataset: Any) -> None:
        """Nothing to check: the reference forward sees every batch."""


# ---------------------------------------------------------------------------------------------- objective
class BALoRAObjective:
    """Shared BA-LoRA core: reference, hidden-state capture, the terms, scaling, metrics.

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
        self.head: OutputHead | None = None
        self._backbone: nn.Module | None = None
        self._backbone_path: str | None = None
        self._peft_model: nn.Module | None = None
        self._hook = None
        self._captured: dict[str, Any] | None = None
        self._in_reference = False
        self.skipped: dict[str, int] = {}
        self.num_classes: int | None = None
        self._head_kept: list[
            nn.Module
        ] = []  # NLU, reference_head='current': the head the reference reads through
        self._warned: set[str] = set()  # warnings given at construction (prepare runs again at train begin)
        # NLU only (the config refuses it for NLG): reference logits per example, exact (core/refcache.py)
        self.reference_cache = ReferenceCache() if self.config.reference_cache else None
        # where the reference rows come from: chosen once by prepare()
        self.source: OnlineReference | PrecomputedReference = OnlineReference(self)

    # ------------------------------------------------------------------ setup
    def prepare(self, model: nn.Module) -> BALoRAObjective:
        """Validate ``model`` and install the reference and the capture hook. Idempotent.

        Before anything is changed: a ``ref_model`` that is part of the trained model is refused. Then the model
        checks (:func:`~.model.validate_model`), the reference (:func:`~.reference.prepare_reference`: decided once,
        recorded on the model), and for NLG the replayed backbone and the output head, checked on one probe
        forward of a few tokens (:func:`~.model.replay_backbone`, :func:`~.model.check_head_reproduces_logits`).
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
        base = peft_model.get_base_model()
        source = self._reference_source(mode, peft_model, base)
        backbone, path = self._backbone, self._backbone_path
        if self.config.task == "nlg":
            self.head = output_head(base)
            if backbone is None or not any(m is backbone for m in base.modules()):
                path, backbone, probe = replay_backbone(peft_model, self.adapter_name)
                if probe is not None:
                    check_head_reproduces_logits(self.head, probe, peft_model)
                else:  # the weights are not materialised: decide from the config
                    check_head_config(peft_model)
            if self.ref_model is not None:
                check_reference_head(self.head, self.ref_model)
        else:
            self.num_classes = int(base.config.num_labels)
            self.config.check_num_classes(self.num_classes)
            self._warn_once(new_head_warning(peft_model, self.config))
            self._head_kept = classifier_head(peft_model) if self.config.reference_head == "current" else []
        # then install
        self._peft_model = peft_model
        self.source = source
        self.mode = ref.prepare_reference(
            peft_model, self.config.reference, self.ref_model, self.adapter_name
        )
        self._warn_once(dropout_warning(peft_model, self.adapter_name))
        if self.config.task == "nlg" and backbone is not self._backbone:
            self.remove_hooks()
            self._backbone, self._backbone_path = backbone, path
            self._hook = backbone.register_forward_hook(self._capture, with_kwargs=True)
        if self.ref_model is not None:
            self.ref_model.eval()  # (a DeepSpeed engine's eval() returns None)
            self.ref_model.requires_grad_(False)
        return self

    def _reference_source(self, mode: str, peft_model: nn.Module, base: nn.Module):
        """The reference source for ``mode``, checked against the model (a precomputed store: before anything is
        installed, on the model at step 0; reused when prepare() runs again)."""
        if mode != "precomputed":
            return OnlineReference(self)
        current = self.source
        if isinstance(current, PrecomputedReference) and current.store.path == str(
            self.config.reference_path
        ):
            return current
        source = PrecomputedReference(self.config.reference_path, self.config.consistency_temperature)
        source.check_kernels(self.terms, self.config.lambdas)
        source.check_model(peft_model, base)
        return source

    def check_dataset(self, dataset: Any) -> None:
        """Refuse, before step 1, a training dataset the reference source cannot serve (a precomputed reference
        without rows for some of its examples); a no-op for the online reference."""
        self.source.check_dataset(dataset)

    @property
    def rewrites_base(self) -> bool:
        """Whether the trained adapter's frozen base is not the pre-trained model (decided at :meth:`prepare`):
        the exports must then convert the adapter (docs/method.md §1)."""
        return self._peft_model is not None and ref.has_residual_base(self._peft_model, self.adapter_name)

    @property
    def captured_hidden(self) -> torch.Tensor | None:
        """The final hidden states (B, T, d) of the student's last decoder forward (NLG), or None."""
        return None if self._captured is None else self._captured["hidden"]

    def release_capture(self) -> None:
        """Drop the captured forward (its hidden states and inputs) once it has been used."""
        self._captured = None

    def remove_hooks(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._backbone = None
        self._captured = None

    def _capture(self, module, args, kwargs, output) -> None:
        if self._in_reference:
            return
        if module.training and not torch.is_grad_enabled():
            # While training, only a forward that carries gradient is the student's: TRL 1.16 computes a label-
            # smoothed or compute_loss_func loss on one forward, then runs a second one under no_grad for its
            # metrics (and a third with return_outputs); keeping the last would leave the terms without gradient.
            return
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        # Did the student's forward end up with a KV cache? (use_cache comes from the config and is switched off
        # under gradient checkpointing inside the backbone.) The reference forward does the same, see below.
        used_cache = None
        if isinstance(output, Mapping):  # a ModelOutput lists only the fields that are set
            used_cache = output.get("cache") is not None or output.get("past_key_values") is not None
        self._captured = {"args": args, "kwargs": kwargs, "hidden": hidden, "used_cache": used_cache}

    # ------------------------------------------------------------------ reference forwards
    def reference_hidden(self, model: nn.Module) -> torch.Tensor:
        """The reference's final hidden states (B, T, d) for the micro-batch the student just ran (no grad)."""
        cap = self._captured
        kwargs = dict(cap["kwargs"])
        # Same attention mask as the student's forward: transformers 5 builds a block-diagonal mask for packed
        # position_ids only without a KV cache, so the reference uses a cache exactly when the student did
        # (it runs in eval mode, where gradient checkpointing no longer turns the cache off). A cache object
        # the student's forward filled is dropped (the model starts a fresh one if it uses any).
        if cap.get("used_cache") is not None:
            kwargs["use_cache"] = cap["used_cache"]
        for key in ("past_key_values", "cache"):
            if kwargs.get(key) is not None:
                kwargs[key] = None
        self._in_reference = True
        try:
            if self.mode == "model":
                inner = ref.unwrap(self.ref_model)
                inner = inner.get_base_model() if ref.is_peft_model(inner) else inner
                with (
                    torch.no_grad()
                ):  # the same module of the reference model as the student's replayed backbone
                    out = inner.get_submodule(self._backbone_path)(*cap["args"], **kwargs)
            else:
                inner = ref.unwrap(model)
                with ref.reference_mode(inner, self.mode), contextlib.ExitStack() as stack:
                    if (
                        self.mode == "adapter_snapshot"
                    ):  # one matmul per projection when cheaper (no copy kept)
                        stack.enter_context(ref.merged_snapshot_forward(inner))
                    out = self._backbone(*cap["args"], **kwargs)
        finally:
            self._in_reference = False
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def reference_logits(self, model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
        """NLU: the reference's classifier logits (B, C) for ``inputs`` (no grad): the pre-trained backbone read
        through the step-0 head, or through the current head under ``reference_head='current'``."""
        fwd = {k: v for k, v in inputs.items() if k != "labels"}
        if self.mode == "model":
            with torch.no_grad():
                return self.ref_model(**fwd).logits
        inner = ref.unwrap(model)
        with ref.reference_mode(inner, self.mode, keep=self._head_kept):
            return inner(**fwd).logits

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
            if self.head is not None and self.head.source is not None:
                self.head = None  # a sharded head's per-step full copy (core/distributed.py) is not kept

    def _compute(
        self, model, inputs, logits, scaling, progress, step, total_steps
    ) -> tuple[torch.Tensor, dict[str, float]]:
        scaling = scaling or LossScaling()
        lambdas = self.config.lambdas_at(progress, step=step, total_steps=total_steps)
        weights = {t.name: t.weight(lambdas) for t in self.terms}
        metrics: dict[str, float] = {f"balora/lambda_{k}": v for k, v in weights.items()}
        if self.config.task == "nlg":
            rows, ref_rows, view, by_items = self._nlg_rows(model, inputs, weights, metrics)
        else:
            rows, ref_rows, view, by_items = self._nlu_rows(model, inputs, logits, weights)
        device = rows.device if rows is not None else torch.device("cpu")
        loss = torch.zeros((), device=device, dtype=torch.float32)
        if rows is None:
            return loss, metrics
        m = rows.shape[0]
        metrics["balora/rows"] = float(m)
        if self.config.consistency_schedule == "adaptive" and ref_rows is not None:
            confidence = self.reference_confidence(ref_rows)
            lambdas["consistency"] = self.config.adaptive_lambda_consistency(confidence)
            weights = {t.name: t.weight(lambdas) for t in self.terms}
            metrics.update({f"balora/lambda_{k}": v for k, v in weights.items()})
            metrics["balora/reference_confidence"] = confidence
        with torch.autocast(device_type=device.type, enabled=False):
            row_terms = [t for t in self.terms if t.level == ROW and weights[t.name] > 0]
            loss = loss + self._row_loss(row_terms, rows, ref_rows, weights, scaling, by_items, m, metrics)
            for t in self.terms:
                if t.level != MATRIX or weights[t.name] <= 0:
                    continue
                if t.is_noop(*view.shape):  # constant for this shape: skipped, so its effective weight is 0
                    metrics[f"balora/lambda_{t.name}"] = 0.0
                    continue
                try:
                    value = t.matrix(view)
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

    def reference_confidence(self, ref_rows: torch.Tensor) -> float:
        """c = 1 − clamp(H / log|V|, 0, 1), H the mean over rows of the entropy of softmax(Z_ref/T).

        ``ref_rows``: the reference's valid rows — hidden states (M, d) sent through the frozen head chunk by
        chunk (NLG: never the (M, |V|) logits at once) or logits (M, C) (NLU). No gradient: the adaptive λ1 is
        a constant of the micro-batch. It runs before the fused pass because that pass folds every term's
        weighted gradient into one buffer, so λ1 must be known first (docs/method.md §3.1, adaptive λ1).
        """
        entropy, width = self.source.mean_entropy(ref_rows)
        if not math.isfinite(entropy) or width < 2:  # no information about the reference's confidence
            return 0.0
        return 1.0 - min(max(entropy / math.log(width), 0.0), 1.0)

    def _row_loss(self, terms, rows, ref_rows, weights, scaling, by_items, m, metrics) -> torch.Tensor:
        while terms:
            fns = [t.row_kernel() for t in terms]
            w = [scaling.row_weight(weights[t.name], m, by_items) for t in terms]
            if self.head is not None and self.config.task == "nlg":
                total, sums = chunked_row_terms(rows, ref_rows, self.head, fns, w, self.config.chunk_size)
            else:
                vals = [fn(rows.float(), None if ref_rows is None else ref_rows.float()).sum() for fn in fns]
                sums = torch.stack([v.detach() for v in vals])
                total = sum(wi * v for wi, v in zip(w, vals, strict=True))
            bad = [t for t, s in zip(terms, sums.tolist(), strict=True) if not math.isfinite(s)]
            if not bad:
                for t, s in zip(terms, sums.tolist(), strict=True):
                    self._record(metrics, t.name, s / m, weights[t.name])
                return total
            for t in bad:
                self._finite(t.name, torch.tensor(float("nan")), metrics)
            terms = [t for t in terms if t not in bad]  # recompute without the non-finite terms
        return rows.new_zeros((), dtype=torch.float32)

    def _nlg_rows(self, model, inputs, weights, metrics):
        if self._captured is None:
            raise RuntimeError(
                "BA-LoRA saw no decoder forward for this micro-batch: call objective.compute right after the "
                "model's forward, on the model passed to prepare()."
            )
        hidden = self._captured["hidden"]
        mask = self.valid_mask(inputs, hidden)
        need_ref = any(t.needs_reference and weights[t.name] > 0 for t in self.terms)
        # Every rank reads the head, rows or not: a collective under ZeRO-3 and FSDP (so is an online reference
        # forward: OnlineReference.rows). The head is read afresh (FSDP2 swaps the module's parameters after
        # prepare()); a sharded head is copied whole for the step while its parameter stays the Gram-factor cache's
        # key (FSDP1: its root unit gathered).
        with distributed.unsharded_root(model, fsdp2=False):
            self.head = output_head(ref.unwrap(model).get_base_model())
        ref_rows = self.source.rows(model, inputs, mask) if need_ref else None
        self._captured = None
        if not bool(mask.any()):  # legitimate (a prompt truncated to the max length): nothing to regularise
            self.skipped["no_valid_rows"] = self.skipped.get("no_valid_rows", 0) + 1
            metrics["balora/skipped_no_valid_rows"] = float(self.skipped["no_valid_rows"])
            return None, None, None, True
        rows = hidden[mask]
        return rows, ref_rows, HiddenView(rows, self.head, self.config.chunk_size), True

    def valid_mask(self, inputs: Mapping[str, Any], hidden: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: the positions whose next-token label is trained (``shift_labels`` / shifted ``labels``)."""
        if inputs.get("shift_labels") is not None:
            mask = inputs["shift_labels"] != -100
        elif inputs.get("labels") is not None:
            mask = valid_position_mask(
                inputs["labels"], shift=self.config.shift_labels, position_ids=inputs.get("position_ids")
            )
        else:
            raise ValueError(
                "BA-LoRA (task='nlg') needs `labels` (B, T) in the batch to know which positions are trained; "
                "use a collator that sets labels (-100 on prompt/padding tokens)."
            )
        if mask.shape != hidden.shape[:2]:
            raise ValueError(
                f"label mask {tuple(mask.shape)} does not match hidden states {tuple(hidden.shape[:2])}"
            )
        return mask.to(hidden.device)

    def _nlu_rows(self, model, inputs, logits, weights):
        if logits is None:
            raise ValueError(
                "BA-LoRA (task='nlu') needs the classifier logits (B, C) of the forward: pass logits=."
            )
        labels = inputs.get("labels")
        base = ref.unwrap(model).get_base_model()
        multi_hot = (
            isinstance(labels, torch.Tensor) and labels.is_floating_point() and labels.shape == logits.shape
        )
        if multi_hot and getattr(base.config, "problem_type", None) != "single_label_classification":
            raise multi_label_error(
                type(base).__name__
            )  # transformers infers multi-label from them; before a step
        need_ref = any(t.needs_reference and weights[t.name] > 0 for t in self.terms)
        ref_logits = None
        if need_ref and self.reference_cache is not None:
            fwd = {k: v for k, v in inputs.items() if k != "labels"}
            state = reference_state(ref.unwrap(self.ref_model if self.mode == "model" else model))
            ref_logits = self.reference_cache.logits(
                fwd, lambda sub: self.reference_logits(model, sub), state
            )
        elif need_ref:
            ref_logits = self.reference_logits(model, inputs)
        return logits, ref_logits, LogitsView(logits), False

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
