"""The one transformers-``Trainer`` integration every adapter shares.

:class:`BALoRATrainerMixin` adds BA-LoRA to any ``transformers.Trainer`` subclass by overriding as little as
possible: ``compute_loss`` (adds the regularizer to the host's loss, scaled like it), ``log`` (merges the
``balora/...`` metrics into the logs every ``report_to`` backend sees), ``_save`` (writes the BA-LoRA config and
the initial adapter beside every checkpoint), ``save_model`` (adds a plain-LoRA export) and
``_load_from_checkpoint`` (restores the reference from the checkpoint on resume).

The TRL trainer and the axolotl trainer inherit it; the callback mixes it into an existing trainer instance.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Any

import torch
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

from .config import BALoRAConfig
from .core import distributed
from .core.export import (
    ADAPTER_WEIGHTS,
    INITIAL_DIR,
    export_plain_lora,
    find_initial_adapter,
    load_initial_adapter,
    save_initial_adapter,
)
from .core.objective import BALoRAObjective, LossScaling
from .core.reference import REF_ADAPTER, has_residual_base, unwrap

logger = logging.getLogger(__name__)

PLAIN_LORA_DIR = "plain_lora"
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
        self._balora_metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        distributed.check_engine(self.accelerator)
        self.balora.prepare(self.model)
        self._balora_keep_initial()
        if ref_model is not None:
            self.balora.ref_model = self._balora_placed(ref_model)

    def _balora_keep_initial(self) -> None:
        """reference='model' adds no snapshot adapter, but the plain-LoRA export of a PiSSA-type adapter needs its
        step-0 weights: keep a CPU copy (the rank-r factors), written as balora_ref/ with every save. Kept across a
        callback's detach/attach, which must not take the trained weights for the initial ones."""
        peft_model, adapter = unwrap(self.model), self.balora.adapter_name
        if self.balora.mode != "model" or not has_residual_base(peft_model, adapter):
            return
        if getattr(self, "_balora_initial", None) is None:
            self._balora_initial = distributed.full_adapter_state(
                peft_model, adapter, wrapped=self.model, always=True
            )

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
                self._balora_restore_reference(checkpoint, self.model)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ------------------------------------------------------------------ loss
    def _balora_progress(self) -> float:
        state = getattr(self, "state", None)
        if state is None or not getattr(state, "max_steps", 0):
            return 0.0
        return state.global_step / state.max_steps

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
        reg, metrics = self.balora.compute(
            model, batch, logits=logits, scaling=scaling, progress=self._balora_progress()
        )
        self._balora_record(metrics, "train" if training else "eval")
        if training:
            loss = loss + reg.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ logging
    def _balora_record(self, metrics: dict[str, float], mode: str) -> None:
        """Keep one micro-batch's ``balora/...`` metrics until :meth:`log` (hosts with a metric store override)."""
        store = self._balora_metrics[mode]
        for k, v in metrics.items():
            store[k].append(v)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        store = self._balora_metrics[mode]
        prefix = "eval_" if mode == "eval" else ""
        for k, vals in store.items():
            if vals:
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
        peft_model = unwrap(self.model)
        initial_dir = os.path.join(output_dir, INITIAL_DIR)
        if self.balora.mode == "adapter_snapshot":
            gathered = getattr(self, "_balora_ref_state", None)  # when an engine shards it: see save_model
            if gathered is not None or find_initial_adapter(output_dir) is None:
                save_initial_adapter(peft_model, initial_dir, REF_ADAPTER, state=gathered)
        elif getattr(self, "_balora_initial", None) is not None:  # reference='model', PiSSA-type adapter
            save_initial_adapter(peft_model, initial_dir, state=self._balora_initial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Every rank calls save_model, the main process alone calls _save (transformers 5.16) and the engine's own
        # saving gathers parameters module by module: gather the snapshot here, before it (ZeRO-3, FSDP).
        self._balora_ref_state = self._balora_full_reference()
        try:
            with distributed.full_state_dict_saving(self.accelerator):  # FSDP: the adapter files are written
                super().save_model(output_dir, _internal_call=_internal_call)
        finally:
            self._balora_ref_state = None
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not _internal_call:
            self._balora_export(output_dir)

    def _balora_export(self, output_dir: str) -> None:
        """Write ``plain_lora/`` (serves on the untouched base) from the PiSSA adapter saved in ``output_dir``."""
        if not self.args.should_save or not has_residual_base(unwrap(self.model)):
            return
        target = os.path.join(output_dir, PLAIN_LORA_DIR)
        export_plain_lora(output_dir, target, overwrite=True)  # our own artefact of this save, refreshed
        logger.info("BA-LoRA: plain-LoRA export (serves on the untouched base model) written to %s", target)

    def _balora_full_reference(self) -> dict[str, torch.Tensor] | None:
        """The snapshot adapter's full weights when an engine shards them (a collective: every rank), else None."""
        if self.balora.mode != "adapter_snapshot":
            return None
        return distributed.full_adapter_state(unwrap(self.model), REF_ADAPTER, wrapped=self.model_wrapped)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        model = model if model is not None else self.model
        if os.path.isfile(os.path.join(resume_from_checkpoint, "adapter_model.safetensors")):
            # transformers 5.16 (axolotl 0.19's pin), seeing adapter sub-folders (our balora_ref/), loads only those
            # and silently keeps the fresh trained adapter; 5.24 loads both. Reload it (a no-op where it was loaded).
            load_initial_adapter(
                unwrap(model), resume_from_checkpoint, self.balora.adapter_name, wrapped=model
            )
        self._balora_restore_reference(resume_from_checkpoint, model)

    def _balora_restore_reference(self, checkpoint: str, model) -> None:
        """Load the reference snapshot from ``checkpoint``'s balora_ref/ (every rank: a collective when sharded)."""
        initial = find_initial_adapter(checkpoint)
        if self.balora.mode == "model" and initial is not None and getattr(self, "_balora_initial", None):
            self._balora_initial = load_file(
                os.path.join(initial, ADAPTER_WEIGHTS)
            )  # the run's step-0 adapter
        if self.balora.mode != "adapter_snapshot":
            return
        if initial is None:
            raise FileNotFoundError(
                f"BA-LoRA: checkpoint {checkpoint!r} holds no {INITIAL_DIR}/ (the frozen initial adapter); "
                "without it the reference would be rebuilt from the current weights. Resume from a checkpoint "
                "written by a BA-LoRA trainer."
            )
        load_initial_adapter(unwrap(model), initial, REF_ADAPTER, wrapped=model)


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
