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
from . import reference as ref
from .fused import HiddenView, LogitsView, OutputHead, chunked_row_terms
from .model import check_reference_head, decoder_of, output_head, validate_model
from .plugins import collect_terms
from .refcache import ReferenceCache, reference_state
from .terms import MATRIX, ROW, Term


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
        self._hook = None
        self._captured: dict[str, Any] | None = None
        self._in_reference = False
        self.skipped: dict[str, int] = {}
        self.num_classes: int | None = None
        # NLU only (the config refuses it for NLG): reference logits per example, exact (core/refcache.py)
        self.reference_cache = ReferenceCache() if self.config.reference_cache else None

    # ------------------------------------------------------------------ setup
    def prepare(self, model: nn.Module) -> BALoRAObjective:
        """Validate ``model`` and install the reference and the capture hook. Idempotent."""
        peft_model = ref.unwrap(model)
        validate_model(peft_model, self.config, self.adapter_name)
        self.mode = ref.resolve_mode(self.config.reference, peft_model, self.ref_model, self.adapter_name)
        if self.mode == "adapter_snapshot" and ref.REF_ADAPTER not in peft_model.peft_config:
            ref.add_snapshot_adapter(peft_model, self.adapter_name)
        base = peft_model.get_base_model()
        if self.config.task == "nlg":
            self.head = output_head(base)
            backbone = decoder_of(base)
            if backbone is not self._backbone:
                self.remove_hooks()
                self._backbone = backbone
                self._hook = backbone.register_forward_hook(self._capture, with_kwargs=True)
        else:
            self.num_classes = int(base.config.num_labels)
            self.config.check_num_classes(self.num_classes)
        if self.ref_model is not None:
            self.ref_model.eval().requires_grad_(False)
            if self.config.task == "nlg":
                check_reference_head(self.head, self.ref_model)
        return self

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
                with torch.no_grad():
                    out = decoder_of(ref.unwrap(self.ref_model))(*cap["args"], **kwargs)
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

    def _reference_logits(self, model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
        fwd = {k: v for k, v in inputs.items() if k != "labels"}
        if self.mode == "model":
            with torch.no_grad():
                return self.ref_model(**fwd).logits
        inner = ref.unwrap(model)
        with ref.reference_mode(inner, self.mode):
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
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted regularizer loss of the micro-batch the model just ran, and its metrics.

        Args:
            model: the (possibly wrapped) PEFT model that ran the forward.
            inputs: the micro-batch (``labels`` (B, T) for NLG; optional ``position_ids`` / ``shift_labels``).
            logits: NLU only: the classifier logits (B, C) of that forward.
            scaling: the host's loss scaling for this step (default: a plain micro-batch mean).
            progress: global_step / max_steps in [0, 1], for the λ schedules.

        Returns:
            ``(loss, metrics)``: a 0-d tensor to add to the host's loss and a dict of floats keyed
            ``balora/...``.
        """
        scaling = scaling or LossScaling()
        lambdas = self.config.lambdas_at(progress)
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
        with torch.autocast(device_type=device.type, enabled=False):
            row_terms = [t for t in self.terms if t.level == ROW and weights[t.name] > 0]
            loss = loss + self._row_loss(row_terms, rows, ref_rows, weights, scaling, by_items, m, metrics)
            for t in self.terms:
                if t.level != MATRIX or weights[t.name] <= 0 or t.is_noop(*view.shape):
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
        return loss, metrics

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
        # read the head afresh: FSDP2 swaps the module's parameters after prepare()
        self.head = output_head(ref.unwrap(model).get_base_model())
        mask = self.valid_mask(inputs, hidden)
        need_ref = any(t.needs_reference and weights[t.name] > 0 for t in self.terms)
        if not bool(mask.any()):
            self._finite("no_valid_rows", torch.tensor(float("nan")), metrics)
            self._captured = None
            return None, None, None, True
        rows = hidden[mask]
        ref_rows = self.reference_hidden(model)[mask] if need_ref else None
        self._captured = None
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
        need_ref = any(t.needs_reference and weights[t.name] > 0 for t in self.terms)
        ref_logits = None
        if need_ref and self.reference_cache is not None:
            fwd = {k: v for k, v in inputs.items() if k != "labels"}
            state = reference_state(ref.unwrap(self.ref_model if self.mode == "model" else model))
            ref_logits = self.reference_cache.logits(
                fwd, lambda sub: self._reference_logits(model, sub), state
            )
        elif need_ref:
            ref_logits = self._reference_logits(model, inputs)
        return logits, ref_logits, LogitsView(logits), False

    # ------------------------------------------------------------------ helpers
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
