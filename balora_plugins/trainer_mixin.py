"""The one transformers-``Trainer`` integration every adapter shares.

:class:`BALoRATrainerMixin` adds BA-LoRA to any ``transformers.Trainer`` subclass by overriding as little as
possible: ``compute_loss`` (adds the regularizer to the host's loss, scaled like it), ``log`` (merges the
``balora/...`` metrics into the logs every ``report_to`` backend sees), ``_save`` (writes the BA-LoRA config and
the initial adapter beside every checkpoint), ``save_model`` (a final save — not a checkpoint — becomes the
artefact users serve: :meth:`~BALoRATrainerMixin._balora_write_artefacts`), ``create_model_card`` (adds BA-LoRA's
section and tags to the host's card) and ``_load_from_checkpoint`` (restores the reference on resume).

The TRL trainer and the axolotl trainer inherit it; the callback mixes it into an existing trainer instance.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from collections import defaultdict
from typing import Any

import torch
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

from .config import BALoRAConfig
from .core import distributed
from .core.card import TAGS, update_model_card
from .core.export import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    APPROXIMATE_REASON,
    INITIAL_DIR,
    export_plain_lora,
    find_initial_adapter,
    load_initial_adapter,
    resume_adapter_dir,
    save_initial_adapter,
    write_servable_layout,
)
from .core.objective import BALoRAObjective, LossScaling
from .core.reference import (
    REF_ADAPTER,
    adapter_state,
    init_is_approximate,
    lora_init,
    restore_residual_base,
    unwrap,
)

logger = logging.getLogger(__name__)

_SAVED_KEYS = ("labels", "position_ids", "shift_labels")


class BALoRATrainerMixin:
    """Mix in *before* a ``transformers.Trainer`` subclass: ``class T(BALoRATrainerMixin, SFTTrainer)``.

    Call :meth:`_balora_setup` once the host ``__init__`` has wrapped the model with PEFT.
    """

    balora: BALoRAObjective

    def _balora_setup(
        self, balora_config: BALoRAConfig | str | dict | None, ref_model=None, extra_plugins=()
    ) -> None:
        self.balora = BALoRAObjective(balora_config, ref_model=ref_model, extra_plugins=extra_plugins)
        distributed.check_engine(self.accelerator)
        self.balora.prepare(self.model)
        # a precomputed reference: every training example must have its rows, checked now
        self.balora.check_dataset(getattr(self, "train_dataset", None))
        if (
            self.balora.mode == "precomputed"
            and self.balora.rewrites_base
            and self._balora_step0_dir() is None
        ):
            self._balora_save_step0()
        # prepare() keeps the step-0 snapshot whenever the base was rewritten, also with a separate reference model:
        # it is what turns the trained adapter into the plain LoRA users serve (core/export.py).
        peft_model = unwrap(self.model)
        add_tags = getattr(peft_model, "add_model_tags", None)  # into PEFT's card on every save_pretrained
        if callable(add_tags):
            add_tags(list(TAGS))
        if ref_model is not None:
            self.balora.ref_model = self._balora_placed(ref_model)

    def _balora_step0_dir(self) -> str | None:
        return self.__dict__.get("_balora_step0")

    def _balora_save_step0(self) -> None:
        """reference='precomputed' on a rewritten base keeps no snapshot adapter in memory: the step-0 adapter, which
        the exports and every checkpoint need (core/export.py), goes to a temporary folder now (every rank: a
        collective when an engine shards the adapter; the main process writes) and is copied into each save."""
        peft_model = unwrap(self.model)
        name = self.balora.adapter_name
        state = distributed.full_adapter_state(peft_model, name, wrapped=self.model_wrapped)
        if not self.args.should_save:
            return
        folder = tempfile.mkdtemp(prefix="balora_step0_")
        save_initial_adapter(peft_model, folder, adapter_name=name, source=name, state=state)
        weakref.finalize(self, shutil.rmtree, folder, True)
        self.__dict__["_balora_step0"] = folder

    def _balora_placed(self, ref_model):
        """``ref_model`` placed like TRL places its own reference model (DeepSpeed: an inference engine, sharded
        under ZeRO-3); once per model, since a callback attaches again to save."""
        placed = getattr(self, "_balora_placed_ref", None)
        if placed is None or placed[0] is not ref_model:
            placed = self._balora_placed_ref = (
                ref_model,
                distributed.prepare_reference_model(ref_model, self.accelerator),
            )
        return placed[1]

    # ------------------------------------------------------------------ guard against silent overwrites
    def train(self, resume_from_checkpoint=None, *args: Any, **kwargs: Any):
        if not resume_from_checkpoint and self.args.should_save:
            earlier = earlier_balora_checkpoints(self.args.output_dir)
            if earlier:
                raise FileExistsError(
                    f"output_dir={self.args.output_dir!r} already holds BA-LoRA checkpoints from an earlier run "
                    f"({', '.join(earlier[:3])}{', ...' if len(earlier) > 3 else ''}); training would overwrite them "
                    "silently. Resume with trainer.train(resume_from_checkpoint=True), choose a new output_dir, "
                    "or delete the old checkpoints."
                )
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
        self._balora_record(metrics, "train" if training else "eval")
        if training:
            loss = loss + reg.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ logging
    def _balora_record(self, metrics: dict[str, float], mode: str) -> None:
        """Keep one micro-batch's ``balora/...`` metrics until :meth:`log`.

        Hosts with a metric store of their own write there instead (TRL: ``self._metrics``; axolotl:
        ``store_metrics``) by overriding this method. The plain transformers ``Trainer`` has none, so the metrics
        wait in ``_balora_metrics`` (created on first use) and :meth:`log` merges them into the record.
        """
        store = self.__dict__.setdefault(
            "_balora_metrics", {"train": defaultdict(list), "eval": defaultdict(list)}
        )
        for k, v in metrics.items():
            store[mode][k].append(v)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        stores = self.__dict__.get("_balora_metrics")
        if stores is not None:
            mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
            prefix = "eval_" if mode == "eval" else ""
            for k, vals in stores[mode].items():
                if vals:  # skip counts are running totals: the last one, not a mean
                    logs[prefix + k] = vals[-1] if k.startswith("balora/skipped_") else sum(vals) / len(vals)
            stores[mode].clear()
        return super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ saving and resuming
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        self.balora.config.save_pretrained(output_dir)
        peft_model = unwrap(self.model)
        gathered = getattr(self, "_balora_ref_state", None)  # when an engine shards it: see save_model
        if REF_ADAPTER in peft_model.peft_config and (
            gathered is not None or find_initial_adapter(output_dir) is None
        ):
            save_initial_adapter(
                peft_model, os.path.join(output_dir, INITIAL_DIR), REF_ADAPTER, state=gathered
            )
        elif self._balora_step0_dir() is not None and find_initial_adapter(output_dir) is None:
            shutil.copytree(
                self._balora_step0_dir(), os.path.join(output_dir, INITIAL_DIR), dirs_exist_ok=True
            )

    def _save_checkpoint(self, model, trial, *args: Any, **kwargs: Any):
        # A checkpoint keeps the trainable form at its root (resume loads it there): save_model must not convert it.
        self._balora_in_checkpoint = True
        try:
            return super()._save_checkpoint(model, trial, *args, **kwargs)
        finally:
            self._balora_in_checkpoint = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Every save outside a checkpoint is a final one and ends with the artefact — also the one push_to_hub
        # makes (save_model(_internal_call=True)) before it uploads args.output_dir.
        # Every rank calls save_model, the main process alone calls _save (transformers 5.16) and the engine's own
        # saving gathers parameters module by module: the snapshot is gathered here, before it (ZeRO-3, FSDP).
        self._balora_ref_state = self._balora_full_reference()
        try:
            with distributed.full_state_dict_saving(self.accelerator):  # FSDP: the adapter files are written
                super().save_model(output_dir, _internal_call=_internal_call)
        finally:
            self._balora_ref_state = None
        if not getattr(self, "_balora_in_checkpoint", False):
            self._balora_write_artefacts(output_dir if output_dir is not None else self.args.output_dir)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # With hub_strategy="every_save" (the default) the Trainer copies each checkpoint's adapter files into
        # output_dir and uploads that: give it the servable adapter of the checkpoint instead, from a folder the
        # upload ignores ("_*"). The "checkpoint" strategies also upload the checkpoint itself, which must stay
        # trainable: they push the checkpoint as it is.
        peft_model = unwrap(self.model)
        init = peft_model.peft_config[self.balora.adapter_name].init_lora_weights
        if (
            self.args.hub_strategy != "every_save"
            or not self.balora.rewrites_base
            or init_is_approximate(init)
        ):
            return super()._push_from_checkpoint(checkpoint_folder)
        staging = os.path.join(self.args.output_dir, "_balora_push")
        if self.is_world_process_zero():
            export_plain_lora(checkpoint_folder, staging, overwrite=True)
        try:
            return super()._push_from_checkpoint(staging)  # copies from it synchronously, uploads output_dir
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _balora_write_artefacts(self, output_dir: str) -> None:
        """Make the final save in ``output_dir`` the artefact users serve (README "What you get after training").

        The one place that does it, called after the host has saved the model there (by :meth:`save_model`, the
        callback and the axolotl plugin): ``balora_config.json``; for PiSSA-like inits the plain-LoRA adapter that
        serves on the untouched base at the root and the trainable form in ``balora_resume/``
        (:func:`~balora_plugins.core.export.write_servable_layout`); BA-LoRA's section and tags in the model card.
        File operations on the main process only (no collectives), idempotent.
        """
        if not self.args.should_save:
            return
        self.balora.config.save_pretrained(output_dir)
        init = unwrap(self.model).peft_config[self.balora.adapter_name].init_lora_weights
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
        if os.path.isfile(os.path.join(output_dir, ADAPTER_CONFIG)):
            self._balora_update_card(output_dir)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The host's card (TRL: its template; transformers / axolotl: TrainingSummary), then BA-LoRA's section."""
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero() and getattr(self, "balora", None) is not None:
            self._balora_update_card(self.args.output_dir)

    def _balora_update_card(self, directory: str) -> None:
        # The host's own tags: TRL's `_tag_names`, axolotl's `tag_names` (both reach the card only on some paths).
        host_tags = [*getattr(self, "_tag_names", ()), *getattr(self, "tag_names", ())]
        repo_id = getattr(self, "hub_model_id", None) or getattr(self.args, "hub_model_id", None)
        update_model_card(directory, self.balora.config, tags=host_tags, repo_id=repo_id)

    def _balora_full_reference(self) -> dict[str, torch.Tensor] | None:
        """The snapshot adapter's full weights when an engine shards them (a collective: every rank), else None."""
        if REF_ADAPTER not in unwrap(self.model).peft_config:
            return None
        return distributed.full_adapter_state(unwrap(self.model), REF_ADAPTER, wrapped=self.model_wrapped)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # The final output of a run holds the trainable form in balora_resume/ (its root: the converted plain LoRA).
        resume_from_checkpoint = resume_adapter_dir(resume_from_checkpoint)
        model = model if model is not None else self.model
        # this process's own initial adapter, before the checkpoint's replaces it (transformers 5.24 loads balora_ref/)
        fresh = self._balora_own_initial(model)
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        if os.path.isfile(os.path.join(resume_from_checkpoint, "adapter_model.safetensors")):
            # transformers 5.16 (axolotl 0.19's pin), seeing adapter sub-folders (our balora_ref/), loads only those
            # and silently keeps the fresh trained adapter; 5.24 loads both. Reload it (a no-op where it was loaded).
            load_initial_adapter(
                unwrap(model), resume_from_checkpoint, self.balora.adapter_name, wrapped=model
            )
        self._balora_restore_reference(resume_from_checkpoint, model, fresh)

    def _balora_own_initial(self, model) -> dict[str, torch.Tensor] | None:
        """This process's initial adapter when it holds it whole (None without a snapshot or when it is sharded)."""
        peft_model = unwrap(model)
        if REF_ADAPTER not in peft_model.peft_config:
            return None
        if distributed.adapter_is_sharded(peft_model, REF_ADAPTER, wrapped=model):
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
            if self._balora_step0_dir() is not None:
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
        mine = load_file(os.path.join(self._balora_step0_dir(), ADAPTER_WEIGHTS))
        same = theirs.keys() == mine.keys() and all(
            torch.allclose(theirs[k].float(), mine[k].float(), rtol=1e-5, atol=1e-7) for k in mine
        )
        if not same:
            init = lora_init(unwrap(self.model), self.balora.adapter_name)
            raise ValueError(
                f"resuming with reference='precomputed': the checkpoint's step-0 adapter differs from this run's "
                f"(init_lora_weights={init!r} drew another randomised SVD), so the frozen base is not the residual "
                "the checkpoint was trained on, and no snapshot adapter is kept to set it back. Resume with "
                "init_lora_weights='pissa' (exact, deterministic SVD), or with reference='auto'."
            )
        shutil.copytree(initial, self._balora_step0_dir(), dirs_exist_ok=True)


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


def earlier_balora_checkpoints(output_dir: str) -> list[str]:
    """Names of ``checkpoint-*`` folders in ``output_dir`` written by a BA-LoRA trainer (hold balora_config.json)."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    return sorted(
        d
        for d in os.listdir(output_dir)
        if d.startswith("checkpoint-") and os.path.isfile(os.path.join(output_dir, d, "balora_config.json"))
    )


def mix_into(trainer: Any) -> type:
    """Swap ``trainer``'s class for a subclass with :class:`BALoRATrainerMixin` in front; returns the old class."""
    cls = type(trainer)
    if issubclass(cls, BALoRATrainerMixin):
        return cls
    trainer.__class__ = type(
        f"BALoRA{cls.__name__}", (BALoRATrainerMixin, cls), {"__module__": cls.__module__}
    )
    return cls
