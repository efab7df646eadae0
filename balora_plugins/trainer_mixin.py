"""The one transformers-``Trainer`` integration every adapter shares.

:class:`BALoRATrainerMixin` adds BA-LoRA to any ``transformers.Trainer`` subclass by overriding as little as
possible: ``compute_loss`` (adds the regularizer to the host's loss, scaled like it), ``log`` (merges the
``balora/...`` metrics into the logs every ``report_to`` backend sees), ``_save`` (writes the BA-LoRA config and
the initial adapter beside every save), ``save_model`` (every save — the final one and each ``checkpoint-N/`` —
becomes the artefact users serve: :meth:`~BALoRATrainerMixin.balora_write_artefacts`), ``create_model_card``
(adds BA-LoRA's section and tags to the host's card), ``push_to_hub`` / ``_push_from_checkpoint`` (what goes up),
and ``_load_from_checkpoint`` / ``_load_best_model`` (load the trainable form from ``balora_resume/`` and restore
the reference on resume).

The TRL trainer and the axolotl trainer inherit it; the callback mixes it into an existing trainer instance.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers.trainer_utils import get_last_checkpoint

from .config import CONFIG_NAME, BALoRAConfig
from .core import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    APPROXIMATE_REASON,
    CARD_NAME,
    HELD_RESUME_DIR,
    INITIAL_DIR,
    REF_ADAPTER,
    RESUME_DIR,
    TAGS,
    BALoRAObjective,
    LossScaling,
    adapter_is_sharded,
    adapter_state,
    find_initial_adapter,
    full_adapter_state,
    init_is_approximate,
    init_rewrites_base,
    load_initial_adapter,
    lora_init,
    name_base_model,
    quantization_note,
    restore_residual_base,
    resume_adapter_dir,
    save_initial_adapter,
    unwrap,
    update_model_card,
    write_servable_layout,
)
from .engines import check_engine, full_state_dict_saving, prepare_reference_model

logger = logging.getLogger(__name__)

_SAVED_KEYS = ("labels", "position_ids", "shift_labels")
FSDP_STATE_PREFIX = (
    "pytorch_model_fsdp"  # transformers' FSDP_MODEL_NAME: the model state FSDP checkpoints hold
)
# push_to_hub uploads args.output_dir except "_*": balora_resume/ waits here unless it is meant to go up
RESUME_HUB_STRATEGIES = ("checkpoint", "all_checkpoints")


def metric_store() -> dict[str, defaultdict[str, list[float]]]:
    """An empty per-mode store of micro-batch metrics: ``{"train": {name: [values]}, "eval": {...}}``."""
    return {"train": defaultdict(list), "eval": defaultdict(list)}


@dataclass
class BALoRATrainerState:
    """What a BA-LoRA trainer keeps besides its :class:`~balora_plugins.core.BALoRAObjective`, all initialised.

    Made once per trainer (:meth:`BALoRATrainerMixin.balora_init`); a
    :class:`~balora_plugins.callback.BALoRACallback` takes it along when it detaches and gives it back when it
    attaches again, so the step-0 adapter and the placed reference model of the first attachment are the ones
    every later save and resume uses.
    """

    metrics: dict[str, defaultdict[str, list[float]]] = field(default_factory=metric_store)
    """The micro-batch ``balora/*`` metrics waiting for ``log``, for hosts without a metric store of their own
    (the plain ``Trainer``); TRL's and axolotl's trainers write into theirs (``balora_record``)."""
    step0_dir: str | None = None
    """reference='precomputed' on a rewritten base: the temporary folder with the step-0 adapter, else None."""
    placed_ref: tuple[nn.Module, nn.Module] | None = None
    """(the explicit ``ref_model`` given, that model placed for the run's engine), else None."""
    ref_state: dict[str, torch.Tensor] | None = None
    """During ``save_model`` under an engine that shards the snapshot adapter: its gathered full weights."""
    hold_resume: bool = False
    """During ``push_to_hub`` when ``balora_resume/`` must not go up: it waits in ``_balora_resume.hold``."""


class BALoRATrainerMixin:
    """Mix in *before* a ``transformers.Trainer`` subclass: ``class T(BALoRATrainerMixin, SFTTrainer)``.

    Its ``__init__`` initialises BA-LoRA's state before the host's; call :meth:`balora_setup` once the host
    ``__init__`` has wrapped the model with PEFT. An existing trainer instance gets the mixin through
    :func:`mix_into` instead (the callback).

    What other modules use: :meth:`balora_setup`, :meth:`balora_record` (overridden by hosts with a metric
    store), :meth:`balora_write_artefacts`, :meth:`balora_update_card`, :meth:`balora_release` and
    :attr:`balora_peft_model`.
    """

    balora: BALoRAObjective | None
    """The objective (None before :meth:`balora_setup`)."""
    balora_state: BALoRATrainerState

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.balora_init()
        super().__init__(*args, **kwargs)

    def balora_init(self, state: BALoRATrainerState | None = None) -> None:
        """Initialise BA-LoRA's attributes: no objective yet, ``state`` (a fresh one when None)."""
        self.balora = None
        self.balora_state = state if state is not None else BALoRATrainerState()

    def balora_setup(
        self, balora_config: BALoRAConfig | str | dict | None, ref_model=None, extra_plugins=()
    ) -> None:
        """Build the objective for this trainer's PEFT model: checks the engine, the model and the data (a
        precomputed reference), adds the reference snapshot, and places an explicit ``ref_model`` for the
        engine. Errors are raised here, before step 1."""
        self.balora = BALoRAObjective(balora_config, ref_model=ref_model, extra_plugins=extra_plugins)
        self.balora_state.metrics = metric_store()
        check_engine(self.accelerator, self.balora_peft_model)
        self.balora.prepare(self.model)
        # a precomputed reference: every training example must have its rows, checked now
        self.balora.check_dataset(getattr(self, "train_dataset", None))
        if (
            self.balora.mode == "precomputed"
            and self.balora.rewrites_base
            and self.balora_state.step0_dir is None
        ):
            self._balora_save_step0()
        # prepare() keeps the step-0 snapshot whenever the base was rewritten, also with a separate reference model:
        # it is what turns the trained adapter into the plain LoRA users serve (core/export.py).
        # PEFT's card gets the tags on every save_pretrained
        add_tags = getattr(self.balora_peft_model, "add_model_tags", None)
        if callable(add_tags):
            add_tags(list(TAGS))
        if ref_model is not None:
            self.balora.ref_model = self._balora_placed(ref_model)

    def balora_release(self) -> BALoRATrainerState:
        """Remove the objective's hooks and BA-LoRA's attributes from this trainer; returns the state, which
        :func:`mix_into` gives back when BA-LoRA is mixed in again."""
        if self.balora is not None:
            self.balora.remove_hooks()
        state = self.balora_state
        del self.balora, self.balora_state
        return state

    @property
    def balora_peft_model(self) -> nn.Module:
        """The trained ``PeftModel`` (``self.model`` without compile / DDP / engine wrappers)."""
        return unwrap(self.model)

    def _balora_save_step0(self) -> None:
        """reference='precomputed' on a rewritten base keeps no snapshot adapter in memory: the step-0 adapter, which
        the exports and every checkpoint need (core/export.py), goes to a temporary folder now (every rank: a
        collective when an engine shards the adapter; the main process writes) and is copied into each save.
        The folder lives as long as the state that names it."""
        peft_model = self.balora_peft_model
        name = self.balora.adapter_name
        state = full_adapter_state(peft_model, name, wrapped=self.model_wrapped)
        if not self.args.should_save:
            return
        folder = tempfile.mkdtemp(prefix="balora_step0_")
        save_initial_adapter(peft_model, folder, adapter_name=name, source=name, state=state)
        weakref.finalize(self.balora_state, shutil.rmtree, folder, True)
        self.balora_state.step0_dir = folder

    def _balora_placed(self, ref_model: nn.Module) -> nn.Module:
        """``ref_model`` placed like TRL places its own reference model (DeepSpeed: an inference engine, sharded
        under ZeRO-3); once per model, since a callback attaches again to save."""
        placed = self.balora_state.placed_ref
        if placed is None or placed[0] is not ref_model:
            placed = self.balora_state.placed_ref = (
                ref_model,
                prepare_reference_model(ref_model, self.accelerator),
            )
        return placed[1]

    # ------------------------------------------------------------------ guard against silent overwrites
    def train(self, resume_from_checkpoint=None, *args: Any, **kwargs: Any):
        if (
            not resume_from_checkpoint
            and self.args.should_save
            and not self.balora.config.overwrite_output_dir
        ):
            # TRL's arguments and axolotl train's first hook refuse earlier (they know the resume intent there)
            refuse_overwriting_checkpoints(self.args.output_dir, **TRAINER_HINTS)
        if resume_from_checkpoint and getattr(self, "is_deepspeed_enabled", False):
            # DeepSpeed resumes from its own checkpoint files and never calls _load_from_checkpoint; under ZeRO-3
            # they hold no frozen parameter, so the reference snapshot comes from the checkpoint's balora_ref/.
            checkpoint = resume_from_checkpoint
            if not isinstance(checkpoint, str):
                checkpoint = get_last_checkpoint(self.args.output_dir)
            if checkpoint is not None:
                checkpoint = resume_adapter_dir(checkpoint)
                self._balora_restore_reference(checkpoint, self.model, self._balora_own_initial(self.model))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ------------------------------------------------------------------ loss
    def _balora_progress(self) -> tuple[float, int, int]:
        """(progress, global_step, max_steps) for the λ schedules: progress = global_step / max_steps in [0, 1].

        ``global_step`` counts the optimizer steps done so far (0 during the first one), as the authors' script
        reads it; before ``train()`` (an early ``evaluate()``) all three are 0.
        """
        state = getattr(self, "state", None)
        step, total = int(getattr(state, "global_step", 0) or 0), int(getattr(state, "max_steps", 0) or 0)
        return (step / total if total else 0.0), step, total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        saved = {k: inputs[k] for k in _SAVED_KEYS if k in inputs}  # the host may pop labels
        nlu = self.balora.config.task == "nlu"
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs or nlu, num_items_in_batch=num_items_in_batch
        )
        loss, outputs = result if (return_outputs or nlu) else (result, None)
        training = unwrap(model).training
        batch = {**inputs, **saved}
        logits = outputs["logits"] if nlu else None
        scaling = host_loss_scaling(self, num_items_in_batch) if training else LossScaling()
        progress, step, total = self._balora_progress()
        reg, metrics = self.balora.compute(
            model, batch, logits=logits, scaling=scaling, progress=progress, step=step, total_steps=total
        )
        metrics[TASK_LOSS] = task_loss_value(loss, scaling)
        self.balora_record(metrics, "train" if training else "eval")
        if training:
            loss = loss + reg.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ logging
    def balora_record(self, metrics: dict[str, float], mode: str) -> None:
        """Keep one micro-batch's ``balora/...`` metrics until :meth:`log` (``mode``: "train" or "eval").

        Hosts with a metric store of their own write there instead (TRL: ``self._metrics``; axolotl:
        ``store_metrics``) by overriding this method. The plain transformers ``Trainer`` has none, so the metrics
        wait in ``balora_state.metrics`` and :meth:`log` merges them into the record.
        """
        for k, v in metrics.items():
            self.balora_state.metrics[mode][k].append(v)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        store = self.balora_state.metrics[mode]  # empty for hosts with their own store
        prefix = "eval_" if mode == "eval" else ""
        for k, vals in store.items():
            if vals:  # skip counts are running totals: the last one, not a mean
                logs[prefix + k] = vals[-1] if k.startswith("balora/skipped_") else sum(vals) / len(vals)
        store.clear()
        return super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ saving and resuming
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        self.balora.config.save_pretrained(output_dir)
        peft_model = self.balora_peft_model
        gathered = self.balora_state.ref_state  # when an engine shards it: see save_model
        if REF_ADAPTER in peft_model.peft_config and (
            gathered is not None or find_initial_adapter(output_dir) is None
        ):
            save_initial_adapter(
                peft_model, os.path.join(output_dir, INITIAL_DIR), REF_ADAPTER, state=gathered
            )
        elif self.balora_state.step0_dir is not None and find_initial_adapter(output_dir) is None:
            shutil.copytree(
                self.balora_state.step0_dir, os.path.join(output_dir, INITIAL_DIR), dirs_exist_ok=True
            )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Every save ends with the artefact users serve — the final one, each checkpoint-N/ (Trainer._save_checkpoint
        # saves through here before it writes the optimizer, scheduler, RNG and engine state beside it) and the one
        # push_to_hub makes (save_model(_internal_call=True)) before it uploads args.output_dir.
        # Every rank calls save_model, the main process alone calls _save (transformers 5.16) and the engine's own
        # saving gathers parameters module by module: the snapshot is gathered here, before it (ZeRO-3, FSDP).
        self.balora_state.ref_state = self._balora_full_reference()
        try:
            with full_state_dict_saving(self.accelerator):  # FSDP: the adapter files are written
                super().save_model(output_dir, _internal_call=_internal_call)
        finally:
            self.balora_state.ref_state = None
        self.balora_write_artefacts(output_dir if output_dir is not None else self.args.output_dir)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # hub_strategy "every_save" / "checkpoint" / "all_checkpoints" push args.output_dir at every checkpoint, after
        # the Trainer copies the checkpoint's adapter files into it — the servable root now. The checkpoint's card
        # and balora_config.json go with them (when the Trainer pushes: not with "end", nor while an earlier push is
        # still uploading), so every push shows the card of what it uploads; the "checkpoint" strategies upload the
        # checkpoint folder itself as well, balora_resume/ included (docs/usage.md, "What a run writes").
        busy = (
            not self.args.hub_always_push
            and self.push_in_progress is not None
            and not self.push_in_progress.is_done()
        )
        strategy = getattr(self.args.hub_strategy, "value", self.args.hub_strategy)
        if self.is_world_process_zero() and strategy != "end" and not busy:
            for name in (CARD_NAME, CONFIG_NAME):
                src = os.path.join(checkpoint_folder, name)
                if os.path.isfile(src):
                    shutil.copy(src, os.path.join(self.args.output_dir, name))
        return super()._push_from_checkpoint(checkpoint_folder)

    def push_to_hub(self, *args: Any, **kwargs: Any):
        """``Trainer.push_to_hub``, uploading ``balora_resume/`` only where the user pushes to resume.

        The servable root and its card always go up; the trainable form in ``balora_resume/`` only with
        ``hub_strategy`` ``"checkpoint"`` / ``"all_checkpoints"`` or ``hub_push_resume=True`` (docs/usage.md, "What a run writes").
        Otherwise it waits in ``_balora_resume.hold`` (``"_*"`` is what the Trainer's upload skips) until the upload
        has finished — also with ``blocking=False``, which then waits for it.
        """
        strategy = getattr(self.args.hub_strategy, "value", self.args.hub_strategy)
        keep = self.balora.config.hub_push_resume or strategy in RESUME_HUB_STRATEGIES
        self.balora_state.hold_resume = not keep
        try:
            result = super().push_to_hub(*args, **kwargs)
            if not keep and hasattr(result, "result"):
                result.result()  # a Future (blocking=False): the held folder goes back once it is uploaded
            return result
        finally:
            self.balora_state.hold_resume = False
            hold = os.path.join(self.args.output_dir, HELD_RESUME_DIR)
            if self.args.should_save and os.path.isdir(hold):
                os.replace(hold, os.path.join(self.args.output_dir, RESUME_DIR))
                self.balora_update_card(self.args.output_dir)  # the local card: balora_resume/ is here again

    def balora_write_artefacts(self, output_dir: str) -> None:
        """Give ``output_dir`` — a final save or a ``checkpoint-N/`` — the layout users serve (README "What you get
        after training").

        The one place that does it, called after the host has saved the model there (by :meth:`save_model`, the
        callback and the axolotl plugin): ``balora_config.json``; for PiSSA-like inits the plain-LoRA adapter that
        serves on the untouched base at the root and the trainable form in ``balora_resume/``
        (:func:`~balora_plugins.core.export.write_servable_layout`); the root's ``base_model_name_or_path`` naming the
        model it serves on (:meth:`_balora_served_base`); BA-LoRA's section, tags and PEFT's metadata in the model
        card. File operations on the main process only (no collectives), idempotent.
        """
        if not self.args.should_save:
            return
        self.balora.config.save_pretrained(output_dir)
        init = self.balora_peft_model.peft_config[self.balora.adapter_name].init_lora_weights
        if init_is_approximate(init):
            logger.warning(
                "BA-LoRA: %s stays the adapter as trained (no plain LoRA: %s)", output_dir, APPROXIMATE_REASON
            )
        resume = write_servable_layout(output_dir)
        if resume is not None:
            logger.info(
                "BA-LoRA: %s holds the plain LoRA adapter for the untouched base model; the trainable (residual-base) "
                "form is in %s",
                output_dir,
                resume,
            )
        base, residual = self._balora_served_base()
        if base is not None or residual is not None:
            name_base_model(output_dir, base)
        if os.path.isfile(os.path.join(output_dir, ADAPTER_CONFIG)):
            self.balora_update_card(output_dir)
        if self.balora_state.hold_resume and os.path.isdir(os.path.join(output_dir, RESUME_DIR)):
            os.replace(os.path.join(output_dir, RESUME_DIR), os.path.join(output_dir, HELD_RESUME_DIR))

    def _balora_served_base(self) -> tuple[str | None, str | None]:
        """(the pre-trained model the saved root serves on, None when unknown; the residual base training loaded, or
        None when training loaded the pre-trained model itself).

        ``served_base`` when set. A pre-initialised PiSSA pair (its config says a plain init, its base was rewritten
        before training) was loaded on its residual: the adapter's own ``base_model_name_or_path`` names the
        original model when it differs from the residual (PEFT's recipe saves the pair from a model loaded by name),
        else the original is unknown. Otherwise (None, None): PEFT's name of the loaded model stays.
        """
        peft_model = self.balora_peft_model
        name = self.balora.adapter_name
        residual = None
        if self.balora.rewrites_base and not init_rewrites_base(lora_init(peft_model, name)):
            residual = getattr(peft_model.get_base_model(), "name_or_path", None) or None
            residual = residual or "the residual model"
        base = self.balora.config.served_base
        if base is None and residual is not None:
            declared = peft_model.peft_config[name].base_model_name_or_path or None
            base = declared if declared != residual else None
        return base, residual

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The host's card (TRL: its template; transformers / axolotl: TrainingSummary), then BA-LoRA's section."""
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero() and self.balora is not None:
            self.balora_update_card(self.args.output_dir)

    def balora_update_card(self, directory: str) -> None:
        """Add BA-LoRA's section, tags and PEFT's metadata to the model card in ``directory`` (a final save or
        a ``checkpoint-N/``; :func:`~balora_plugins.core.update_model_card`)."""
        # The host's own tags: TRL's `_tag_names`, axolotl's `tag_names` (both reach the card only on some paths).
        host_tags = [*getattr(self, "_tag_names", ()), *getattr(self, "tag_names", ())]
        repo_id = getattr(self, "hub_model_id", None) or getattr(self.args, "hub_model_id", None)
        _, residual = self._balora_served_base()
        engine: tuple[str, ...] = ()
        if os.path.basename(os.path.normpath(directory)).startswith("checkpoint-"):
            # written after the adapter, by _save_checkpoint: the card names them now
            if getattr(self, "is_deepspeed_enabled", False):
                engine = (f"global_step{self.state.global_step}",)
            elif getattr(self, "is_fsdp_enabled", False):
                engine = ("pytorch_model_fsdp*",)
        update_model_card(
            directory,
            self.balora.config,
            tags=host_tags,
            repo_id=repo_id,
            residual=residual,
            engine_files=engine,
            base_quantization=quantization_note(self.balora_peft_model),  # a 4-bit base: what serving means
        )

    def _balora_full_reference(self) -> dict[str, torch.Tensor] | None:
        """The snapshot adapter's full weights when an engine shards them (a collective: every rank), else None."""
        if REF_ADAPTER not in self.balora_peft_model.peft_config:
            return None
        return full_adapter_state(self.balora_peft_model, REF_ADAPTER, wrapped=self.model_wrapped)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # A checkpoint (and a final output) holds the trainable form in balora_resume/, its root the converted plain
        # LoRA; an FSDP checkpoint's model shards (the trainable form as well) stay at the root, where the host reads
        # them. Optimizer, scheduler, RNG and trainer state are read by the host from the root, as it wrote them.
        trainable = resume_adapter_dir(resume_from_checkpoint)
        model = model if model is not None else self.model
        # this process's own initial adapter, before the checkpoint's replaces it (transformers 5.24 loads balora_ref/)
        fresh = self._balora_own_initial(model)
        super()._load_from_checkpoint(host_state_dir(resume_from_checkpoint, trainable), model=model)
        if os.path.isfile(os.path.join(trainable, "adapter_model.safetensors")):
            # transformers 5.16 (axolotl 0.19's pin), seeing adapter sub-folders (our balora_ref/), loads only those
            # and silently keeps the fresh trained adapter; 5.24 loads both; FSDP loads the model shards. Reload it
            # (a no-op where it was loaded).
            load_initial_adapter(unwrap(model), trainable, self.balora.adapter_name, wrapped=model)
        self._balora_restore_reference(trainable, model, fresh)

    def _load_best_model(self) -> None:
        # load_best_model_at_end: the host loads the adapter from the best checkpoint's root, now the rank-2r plain
        # LoRA; the trained form it must load is in balora_resume/ (engines read their own state at the root).
        best = self.state.best_model_checkpoint
        trainable = resume_adapter_dir(best) if best else best
        if getattr(self, "is_deepspeed_enabled", False) or host_state_dir(best, trainable) == best:
            return super()._load_best_model()
        self.state.best_model_checkpoint = trainable
        try:
            super()._load_best_model()
        finally:
            self.state.best_model_checkpoint = best

    def _balora_own_initial(self, model) -> dict[str, torch.Tensor] | None:
        """This process's initial adapter when it holds it whole (None without a snapshot or when it is sharded)."""
        peft_model = unwrap(model)
        if REF_ADAPTER not in peft_model.peft_config:
            return None
        if adapter_is_sharded(peft_model, REF_ADAPTER, wrapped=model):
            init = lora_init(peft_model, self.balora.adapter_name)
            if isinstance(init, str) and "niter" in init.lower():
                raise ValueError(
                    f"resuming init_lora_weights={init!r} under a sharded engine (ZeRO-3 after its start, FSDP): this "
                    "run drew another randomised SVD, so its frozen base is not the residual the checkpoint was "
                    "trained on, and a sharded base cannot be set back. Resume with init_lora_weights='pissa' (exact, "
                    "deterministic SVD), or with DeepSpeed, which restores before it shards."
                )
            return None
        return adapter_state(peft_model, REF_ADAPTER)

    def _balora_restore_reference(
        self, checkpoint: str, model, fresh: dict[str, torch.Tensor] | None
    ) -> None:
        """Load the reference snapshot from ``checkpoint``'s balora_ref/ (every rank: a collective when sharded);
        after a randomised init, set the frozen base back to the checkpoint's residual (``fresh``: this run's own
        initial adapter)."""
        peft_model = unwrap(model)
        if REF_ADAPTER not in peft_model.peft_config:
            if self.balora_state.step0_dir is not None:
                self._balora_check_step0(checkpoint)
            return
        initial = find_initial_adapter(checkpoint)
        if initial is None:
            raise FileNotFoundError(
                f"BA-LoRA: checkpoint {checkpoint!r} holds no {INITIAL_DIR}/ (the frozen initial adapter); "
                "without it the reference would be rebuilt from the current weights. Resume from a checkpoint "
                "written by a BA-LoRA trainer."
            )
        load_initial_adapter(peft_model, initial, REF_ADAPTER, wrapped=model)
        if fresh is not None:  # a randomised init (pissa_niter_N) left another residual base in this process
            fixed = restore_residual_base(peft_model, fresh)
            if fixed:
                logger.warning(
                    "BA-LoRA: the checkpoint's initial adapter differs from this run's randomised init in %d layer(s); "
                    "their frozen base weights were set back to the checkpoint's residual (W_res = W - s·B0A0).",
                    len(fixed),
                )

    def _balora_check_step0(self, checkpoint: str) -> None:
        """reference='precomputed': the checkpoint's step-0 adapter must be this run's (no snapshot adapter is
        kept to set a randomised init's residual base back to the checkpoint's)."""
        initial = find_initial_adapter(checkpoint)
        if initial is None:
            raise FileNotFoundError(
                f"BA-LoRA: checkpoint {checkpoint!r} holds no {INITIAL_DIR}/ (the step-0 adapter the exports need); "
                "resume from a checkpoint written by a BA-LoRA trainer."
            )
        theirs = load_file(os.path.join(initial, ADAPTER_WEIGHTS))
        mine = load_file(os.path.join(self.balora_state.step0_dir, ADAPTER_WEIGHTS))
        same = theirs.keys() == mine.keys() and all(
            torch.allclose(theirs[k].float(), mine[k].float(), rtol=1e-5, atol=1e-7) for k in mine
        )
        if not same:
            init = lora_init(self.balora_peft_model, self.balora.adapter_name)
            raise ValueError(
                f"resuming with reference='precomputed': the checkpoint's step-0 adapter differs from this run's "
                f"(init_lora_weights={init!r} drew another randomised SVD), so the frozen base is not the residual "
                "the checkpoint was trained on, and no snapshot adapter is kept to set it back. Resume with "
                "init_lora_weights='pissa' (exact, deterministic SVD), or with reference='auto'."
            )
        shutil.copytree(initial, self.balora_state.step0_dir, dirs_exist_ok=True)


TASK_LOSS = "balora/task_loss"
"""The host's own loss without the BA-LoRA terms (``loss`` = task loss + Σ λ·term in training)."""


def task_loss_value(loss: torch.Tensor, scaling: LossScaling) -> float:
    """One micro-batch's task loss on the scale of the host's logged ``loss``, so that the metric stores' mean over
    the micro-batches of a logging interval equals the host's ``loss`` when all λ = 0.

    The host logs, per optimizer step, the sum over its micro-batches of the loss after its accumulation rule: a
    loss normalised by the step's ``num_items_in_batch`` is summed as it is (so each micro-batch counts ``ga_steps``
    times here), a micro-batch mean is divided by ``ga_steps`` (so it counts once). In evaluation (no scaling)
    it is the micro-batch's loss, which ``eval_loss`` averages too.
    """
    value = float(loss.detach().float().mean())
    return value if scaling.host_divides_by_ga else value * max(scaling.ga_steps, 1)


def host_loss_scaling(trainer: Any, num_items_in_batch: Any) -> LossScaling:
    """How ``trainer`` (a transformers ``Trainer`` or subclass: TRL, axolotl) scales the loss of this step.

    Mirrors ``Trainer.training_step`` / ``compute_loss``: the loss is divided by ``num_items_in_batch`` (summed
    over the step's micro-batches and, with ``average_tokens_across_devices``, over ranks, then multiplied by the
    number of data-parallel ranks) when the model accepts loss kwargs or a ``compute_loss_func`` is set;
    otherwise the Trainer divides the micro-batch loss by the accumulation steps.
    """
    args = trainer.args
    ga = getattr(trainer, "current_gradient_accumulation_steps", None) or args.gradient_accumulation_steps
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (
            bool(getattr(trainer, "model_accepts_loss_kwargs", False)) and num_items_in_batch is not None
        ) or (getattr(trainer, "compute_loss_func", None) is not None)
    n = None if num_items_in_batch is None else float(torch.as_tensor(num_items_in_batch).sum().item())
    world = 1.0
    if n is not None and getattr(args, "average_tokens_across_devices", False):
        # as Trainer/SFTTrainer.compute_loss: tensor-parallel ranks share a batch, DataParallel uses n_gpu
        tp = trainer.get_tp_size() if callable(getattr(trainer, "get_tp_size", None)) else 1
        world = float(trainer.accelerator.num_processes // max(int(tp), 1))
        if getattr(args, "n_gpu", 1) > 1:
            world = float(args.n_gpu)
    return LossScaling(
        num_items_in_batch=n, world_factor=world, ga_steps=int(ga), host_divides_by_ga=not scaled
    )


def host_state_dir(checkpoint: str, trainable: str) -> str:
    """Where the host loads a checkpoint's model from: its root when an engine wrote its own model state there (FSDP's
    ``pytorch_model_fsdp*``: the trainable form), else ``trainable`` (the folder with the trainable adapter)."""
    if checkpoint and os.path.isdir(checkpoint):
        if any(name.startswith(FSDP_STATE_PREFIX) for name in os.listdir(checkpoint)):
            return checkpoint
    return trainable


def earlier_balora_checkpoints(output_dir: str) -> list[str]:
    """Names of the ``checkpoint-N`` folders in ``output_dir`` written by a BA-LoRA trainer (they hold
    balora_config.json), in step order."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    found = [
        d
        for d in os.listdir(output_dir)
        if d.startswith("checkpoint-") and os.path.isfile(os.path.join(output_dir, d, "balora_config.json"))
    ]
    step = {d: d[len("checkpoint-") :] for d in found}
    return sorted(found, key=lambda d: (int(step[d]) if step[d].isdigit() else -1, d))


TRAINER_HINTS = dict(
    resume="call trainer.train(resume_from_checkpoint=True) (the latest: {latest}), or on a TRL script's command "
    "line pass --resume_from_checkpoint {latest}",
    overwrite="set the BA-LoRA setting overwrite_output_dir (BALoRAConfig(overwrite_output_dir=True), "
    "--balora_overwrite_output_dir true)",
)
"""How a Trainer user (TRL's Python API, the callback) resumes or opts out: the mixin's refusal names both."""


def refuse_overwriting_checkpoints(output_dir: str, *, resume: str, overwrite: str) -> None:
    """Raise ``FileExistsError`` when ``output_dir`` holds BA-LoRA checkpoints of an earlier run.

    ``resume`` and ``overwrite`` say, in the door's own terms (``{latest}``: the newest checkpoint's path), how to
    continue that run and how to start over in the same folder (the ``overwrite_output_dir`` setting).
    """
    earlier = earlier_balora_checkpoints(output_dir)
    if not earlier:
        return
    latest = os.path.join(output_dir, earlier[-1])
    names = ", ".join(earlier[:3]) + (", ..." if len(earlier) > 3 else "")
    raise FileExistsError(
        f"output_dir={output_dir!r} already holds BA-LoRA checkpoints of an earlier run ({names}); a new run "
        f"would overwrite them. To continue that run, {resume.format(latest=latest)}. To start over, choose "
        f"another output_dir, or {overwrite}."
    )


def mix_into(trainer: Any, state: BALoRATrainerState | None = None) -> type:
    """Swap ``trainer``'s class for a subclass with :class:`BALoRATrainerMixin` in front and initialise
    BA-LoRA's attributes (``state``: what :meth:`~BALoRATrainerMixin.balora_release` returned earlier, else a
    fresh one), as the mixin's ``__init__`` does for a trainer built with it; returns the old class. Then call
    :meth:`~BALoRATrainerMixin.balora_setup`."""
    cls = type(trainer)
    if issubclass(cls, BALoRATrainerMixin):
        return cls
    trainer.__class__ = type(
        f"BALoRA{cls.__name__}", (BALoRATrainerMixin, cls), {"__module__": cls.__module__}
    )
    trainer.balora_init(state)
    return cls
