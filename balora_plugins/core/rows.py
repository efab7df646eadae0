"""Where the terms' rows come from: one strategy per task, chosen once when the objective is built.

The BA-LoRA terms act on *rows*, one per trained unit, and on the reference's rows at the same units:

* :class:`TokenRows` (``task='nlg'``): per trained token the student's final hidden state (M, d), captured by a
  forward hook on the decoder backbone; the reference's hidden states from a replay of that backbone in reference
  mode (:class:`OnlineReference`) or the stored top-k rows of a precomputed reference
  (:class:`~.precomputed.PrecomputedReference`), chosen at ``prepare``; the frozen output head turns them into
  logits chunk by chunk (:func:`~.fused.chunked_row_terms`, never the (M, |V|) logits at once). A row sum is
  normalised like the host's token loss (:meth:`~.scaling.LossScaling.token_weight`).
* :class:`ExampleRows` (``task='nlu'``): per example the classifier logits (B, C) of the host's forward; the
  reference's logits from a reference forward, or from the exact per-example cache (:mod:`.refcache`). A row sum is
  a micro-batch mean (:meth:`~.scaling.LossScaling.example_weight`).

:func:`task_rows` picks the class, the way PEFT resolves a ``LoraVariant`` once per adapter; the objective
(:mod:`.objective`) then only asks it for the micro-batch's rows, the row weight and the row sums, and keeps the
weights, the scaling, the metrics and the non-finite handling itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..config import BALoRAConfig
from ..functional import valid_position_mask
from . import distributed
from . import reference as ref
from .fused import HiddenView, LogitsView, OutputHead, TopKRows, chunked_row_terms
from .model import (
    check_head_config,
    check_head_reproduces_logits,
    check_reference_head,
    classifier_head,
    multi_label_error,
    new_head_warning,
    output_head,
    replay_backbone,
)
from .precomputed import PrecomputedReference
from .refcache import ReferenceCache, reference_state
from .scaling import LossScaling
from .terms import TemperedEntropyRows, Term

RowKernelFn = Callable[[torch.Tensor, Any], torch.Tensor]
"""A row kernel: (rows (M, D) logits, reference rows or None) -> (M,) per-row values (:mod:`.terms`)."""


class Owner(Protocol):
    """What a rows strategy reads of the objective that holds it (:class:`~.objective.BALoRAObjective`): the
    settings, the separate reference model (which a trainer may replace by its placed copy after ``prepare``), the
    reference mode ``prepare`` installed, and the objective's public reference forwards (which delegate to the
    strategy; going through them keeps one place to observe or wrap a reference forward)."""

    config: BALoRAConfig
    adapter_name: str
    ref_model: nn.Module | None
    mode: str | None

    def reference_hidden(self, model: nn.Module) -> torch.Tensor: ...

    def reference_logits(self, model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor: ...


@dataclass
class RowBatch:
    """One micro-batch's rows.

    Attributes:
        rows: (M, d) hidden states of the trained tokens (NLG) or (B, C) classifier logits (NLU), with gradient.
        reference: the reference's rows at the same units — (M, d) hidden states, :class:`~.fused.TopKRows`
            (precomputed) or (B, C) logits — or None when no term with λ > 0 needs the reference.
        view: what a matrix term reads (:class:`~.fused.HiddenView` through the head, or
            :class:`~.fused.LogitsView`).
    """

    rows: torch.Tensor
    reference: torch.Tensor | TopKRows | None
    view: LogitsView


class TaskRows:
    """The rows of one task (subclasses: :class:`TokenRows`, :class:`ExampleRows`), for the objective ``owner``."""

    needs_logits = False
    """Whether :meth:`micro_batch` needs the logits of the host's forward (a door must then pass them)."""

    def __init__(self, owner: Owner):
        self.owner = owner
        self.head: OutputHead | None = None  # NLG
        self.backbone_path: str | None = None  # NLG
        self.num_classes: int | None = None  # NLU
        self.reference_cache: ReferenceCache | None = None  # NLU

    @property
    def config(self) -> BALoRAConfig:
        return self.owner.config

    # ------------------------------------------------------------------ setup (objective.prepare)
    def check(self, peft_model: nn.Module, base: nn.Module, mode: str, terms: Sequence[Term]) -> list[str]:
        """The task's checks of ``peft_model`` (its base model ``base``) for reference ``mode``, before anything is
        installed; returns the warnings to give (once)."""
        raise NotImplementedError

    def install(self) -> None:
        """Install what :meth:`check` decided (after the reference is prepared: ``owner.mode`` is set)."""

    def check_dataset(self, dataset: Any) -> None:
        """Refuse, before step 1, a training dataset the reference cannot serve; a no-op by default."""

    # ------------------------------------------------------------------ per micro-batch
    def micro_batch(
        self,
        model: nn.Module,
        inputs: Mapping[str, Any],
        logits: torch.Tensor | None,
        need_reference: bool,
    ) -> RowBatch | None:
        """The rows of the micro-batch the model just ran (None: no row to regularise), and the reference's rows
        when ``need_reference``."""
        raise NotImplementedError

    def row_weight(self, scaling: LossScaling, lam: float, num_rows: int) -> float:
        """The weight of a row term's sum over ``num_rows`` rows, on the host's scale."""
        raise NotImplementedError

    def row_sums(
        self, batch: RowBatch, fns: Sequence[RowKernelFn], weights: Sequence[float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ_i w_i·Σ_rows fn_i, with gradient; (len(fns),) the detached row sums of each kernel)."""
        raise NotImplementedError

    def reference_entropy(self, ref_rows: Any) -> tuple[float, int]:
        """(mean over rows of H(softmax(Z_ref/T)), the number of outcomes |V| or C), no gradient."""
        raise NotImplementedError

    def end_step(self) -> None:
        """Drop what is not kept between micro-batches."""

    # ------------------------------------------------------------------ the NLG capture (no-ops for NLU)
    @property
    def captured_hidden(self) -> torch.Tensor | None:
        return None

    def release_capture(self) -> None:
        pass

    def remove_hooks(self) -> None:
        pass

    def reference_hidden(self, model: nn.Module) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} has no hidden-state capture (task={self.config.task!r}).")

    def valid_mask(self, inputs: Mapping[str, Any], hidden: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} has no token positions (task={self.config.task!r}).")

    def reference_logits(self, model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} reads no classifier logits (task={self.config.task!r}).")


# ---------------------------------------------------------------------------------------------- NLG
class OnlineReference:
    """The NLG reference source that runs the reference forward on every micro-batch (the adapter snapshot, the
    disabled adapter or a separate model; :mod:`.reference`). The other source is
    :class:`~balora_plugins.core.precomputed.PrecomputedReference` (``reference='precomputed'``): both give the
    rows of the valid positions and the reference's mean tempered entropy."""

    def __init__(self, rows: TokenRows):
        self.token_rows = rows

    def rows(self, model: nn.Module, inputs: Mapping[str, Any], mask: torch.Tensor) -> torch.Tensor:
        """The reference's final hidden states (M, d) at the valid positions ``mask`` (B, T)."""
        # Every rank runs the reference forward, rows or not: collectives under ZeRO-3 and FSDP.
        with distributed.unsharded_root(model):
            return self.token_rows.owner.reference_hidden(model)[mask]

    def mean_entropy(self, ref_rows: torch.Tensor) -> tuple[float, int]:
        """(mean over rows of H(softmax(Z_ref/T)), |V|) from hidden states (M, d) sent through the frozen head
        chunk by chunk (never the (M, |V|) logits at once)."""
        head, config = self.token_rows.head, self.token_rows.config
        kernel = TemperedEntropyRows(config.consistency_temperature)
        with torch.no_grad(), torch.autocast(device_type=ref_rows.device.type, enabled=False):
            _, sums = chunked_row_terms(ref_rows, None, head, [kernel], [0.0], config.chunk_size)
        return float(sums[0]) / ref_rows.shape[0], head.weight.shape[0]

    def check_dataset(self, dataset: Any) -> None:
        """Nothing to check: the reference forward sees every batch."""


class TokenRows(TaskRows):
    """NLG: the final hidden states of the trained tokens, through the frozen output head."""

    def __init__(self, owner: Owner):
        super().__init__(owner)
        self.backbone: nn.Module | None = None
        self.source: OnlineReference | PrecomputedReference = OnlineReference(self)
        self._hook = None
        self._captured: dict[str, Any] | None = None
        self._in_reference = False
        self._planned: tuple[nn.Module, str | None, OnlineReference | PrecomputedReference] | None = None

    # ------------------------------------------------------------------ setup
    def check(self, peft_model: nn.Module, base: nn.Module, mode: str, terms: Sequence[Term]) -> list[str]:
        """The reference source (a precomputed store: checked against the model at step 0), the output head, and
        the replayed backbone, checked on one probe forward of a few tokens (:func:`~.model.replay_backbone`,
        :func:`~.model.check_head_reproduces_logits`)."""
        source = self._reference_source(mode, peft_model, base, terms)
        self.head = output_head(base)
        backbone, path = self.backbone, self.backbone_path
        if backbone is None or not any(m is backbone for m in base.modules()):
            path, backbone, probe = replay_backbone(peft_model, self.owner.adapter_name)
            if probe is not None:
                check_head_reproduces_logits(self.head, probe, peft_model)
            else:  # the weights are not materialised: decide from the config
                check_head_config(peft_model)
        if self.owner.ref_model is not None:
            check_reference_head(self.head, self.owner.ref_model)
        self._planned = (backbone, path, source)
        return []

    def _reference_source(
        self, mode: str, peft_model: nn.Module, base: nn.Module, terms: Sequence[Term]
    ) -> OnlineReference | PrecomputedReference:
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
        source.check_kernels(terms, self.config.lambdas)
        source.check_model(peft_model, base)
        return source

    def install(self) -> None:
        """The reference source, and the capture hook on the backbone (once per backbone)."""
        backbone, path, self.source = self._planned
        self._planned = None
        if backbone is not self.backbone:
            self.remove_hooks()
            self.backbone, self.backbone_path = backbone, path
            self._hook = backbone.register_forward_hook(self._capture, with_kwargs=True)

    def check_dataset(self, dataset: Any) -> None:
        """The reference source's check (a precomputed store must hold every example)."""
        self.source.check_dataset(dataset)

    # ------------------------------------------------------------------ the capture
    @property
    def captured_hidden(self) -> torch.Tensor | None:
        """The final hidden states (B, T, d) of the student's last decoder forward, or None."""
        return None if self._captured is None else self._captured["hidden"]

    def release_capture(self) -> None:
        self._captured = None

    def remove_hooks(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.backbone = None
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
        mode = self.owner.mode
        self._in_reference = True
        try:
            if mode == "model":
                inner = ref.unwrap(self.owner.ref_model)
                inner = inner.get_base_model() if ref.is_peft_model(inner) else inner
                # the same module of the reference model as the student's replayed backbone
                with torch.no_grad():
                    out = inner.get_submodule(self.backbone_path)(*cap["args"], **kwargs)
            else:
                inner = ref.unwrap(model)
                with ref.reference_mode(inner, mode), contextlib.ExitStack() as stack:
                    # one matmul per projection when cheaper (no copy kept)
                    if mode == "adapter_snapshot":
                        stack.enter_context(ref.merged_snapshot_forward(inner))
                    out = self.backbone(*cap["args"], **kwargs)
        finally:
            self._in_reference = False
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

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

    # ------------------------------------------------------------------ per micro-batch
    def micro_batch(self, model, inputs, logits, need_reference) -> RowBatch | None:
        """The captured hidden states at the valid positions (M, d), the reference's rows there, and the view
        through the head; None when no position of the micro-batch is trained."""
        if self._captured is None:
            raise RuntimeError(
                "BA-LoRA saw no decoder forward for this micro-batch: call objective.compute right after the "
                "model's forward, on the model passed to prepare()."
            )
        hidden = self._captured["hidden"]
        mask = self.valid_mask(inputs, hidden)
        # Every rank reads the head, rows or not: a collective under ZeRO-3 and FSDP (so is an online reference
        # forward: OnlineReference.rows). The head is read afresh (FSDP2 swaps the module's parameters after
        # prepare()); a sharded head is copied whole for the step while its parameter stays the Gram-factor cache's
        # key (FSDP1: its root unit gathered).
        with distributed.unsharded_root(model, fsdp2=False):
            self.head = output_head(ref.unwrap(model).get_base_model())
        ref_rows = self.source.rows(model, inputs, mask) if need_reference else None
        self._captured = None
        if not bool(mask.any()):  # legitimate (a prompt truncated to the max length): nothing to regularise
            return None
        rows = hidden[mask]
        return RowBatch(rows, ref_rows, HiddenView(rows, self.head, self.config.chunk_size))

    def row_weight(self, scaling: LossScaling, lam: float, num_rows: int) -> float:
        return scaling.token_weight(lam, num_rows)

    def row_sums(self, batch, fns, weights) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused chunked pass through the head (:func:`~.fused.chunked_row_terms`)."""
        return chunked_row_terms(batch.rows, batch.reference, self.head, fns, weights, self.config.chunk_size)

    def reference_entropy(self, ref_rows) -> tuple[float, int]:
        return self.source.mean_entropy(ref_rows)

    def end_step(self) -> None:
        if self.head is not None and self.head.source is not None:
            self.head = None  # a sharded head's per-step full copy (core/distributed.py) is not kept


# ---------------------------------------------------------------------------------------------- NLU
class ExampleRows(TaskRows):
    """NLU: the classifier logits of each example; the reference's logits by a reference forward or from the exact
    reference cache (``BALoRAConfig.reference_cache``, :mod:`.refcache`)."""

    needs_logits = True

    def __init__(self, owner: Owner):
        super().__init__(owner)
        self.reference_cache = ReferenceCache() if self.config.reference_cache else None
        self.head_kept: list[nn.Module] = []  # reference_head='current': the head the reference reads through

    def check(self, peft_model: nn.Module, base: nn.Module, mode: str, terms: Sequence[Term]) -> list[str]:
        """The number of classes against k; a new, randomly initialised head is warned about."""
        self.num_classes = int(base.config.num_labels)
        self.config.check_num_classes(self.num_classes)
        warning = new_head_warning(peft_model, self.config)
        self.head_kept = classifier_head(peft_model) if self.config.reference_head == "current" else []
        return [] if warning is None else [warning]

    def reference_logits(self, model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
        """The reference's classifier logits (B, C) for ``inputs`` (no grad): the pre-trained backbone read through
        the step-0 head, or through the current head under ``reference_head='current'``."""
        fwd = {k: v for k, v in inputs.items() if k != "labels"}
        if self.owner.mode == "model":
            with torch.no_grad():
                return self.owner.ref_model(**fwd).logits
        inner = ref.unwrap(model)
        with ref.reference_mode(inner, self.owner.mode, keep=self.head_kept):
            return inner(**fwd).logits

    def micro_batch(self, model, inputs, logits, need_reference) -> RowBatch:
        """The logits (B, C) and the reference's logits (from the cache where it holds them)."""
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
            # transformers infers multi-label from them; refused before a step
            raise multi_label_error(type(base).__name__)
        ref_logits = None
        if need_reference and self.reference_cache is not None:
            fwd = {k: v for k, v in inputs.items() if k != "labels"}
            owner = self.owner
            state = reference_state(ref.unwrap(owner.ref_model if owner.mode == "model" else model))
            ref_logits = self.reference_cache.logits(
                fwd, lambda sub: owner.reference_logits(model, sub), state
            )
        elif need_reference:
            ref_logits = self.owner.reference_logits(model, inputs)
        return RowBatch(logits, ref_logits, LogitsView(logits))

    def row_weight(self, scaling: LossScaling, lam: float, num_rows: int) -> float:
        return scaling.example_weight(lam, num_rows)

    def row_sums(self, batch, fns, weights) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernels on the (B, C) logits directly."""
        rows, reference = batch.rows.float(), None if batch.reference is None else batch.reference.float()
        vals = [fn(rows, reference).sum() for fn in fns]
        total = sum(w * v for w, v in zip(weights, vals, strict=True))
        return total, torch.stack([v.detach() for v in vals])

    def reference_entropy(self, ref_rows: torch.Tensor) -> tuple[float, int]:
        """From the reference logits (B, C)."""
        kernel = TemperedEntropyRows(self.config.consistency_temperature)
        with torch.no_grad(), torch.autocast(device_type=ref_rows.device.type, enabled=False):
            return float(kernel(ref_rows.float(), None).mean()), ref_rows.shape[-1]


ROWS: dict[str, type[TaskRows]] = {"nlg": TokenRows, "nlu": ExampleRows}
"""The rows strategy of each ``BALoRAConfig.task``."""


def task_rows(owner: Owner) -> TaskRows:
    """The rows strategy of ``owner.config.task`` (chosen once, by the objective's constructor)."""
    return ROWS[owner.config.task](owner)
