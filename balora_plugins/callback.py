"""`BALoRACallback`: BA-LoRA for the plain transformers ``Trainer`` and its subclasses.

The main path is explicit — build the Trainer, then attach the callback to it before ``train()``::

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds)
    BALoRACallback("iclr2026-nlg").attach(trainer)
    trainer.train()

A ``TrainerCallback`` sees no inputs, outputs or loss, and editing gradients in the optimizer events would be
wrong under DeepSpeed (the step has happened), gradient clipping and DDP (docs/method.md §3.3). So the callback takes a
handle on its trainer — like transformers' ``JITCheckpointCallback.set_trainer`` and axolotl's KD temperature
callback — and swaps *that instance's* class for a subclass with :class:`~balora_plugins.trainer_mixin.BALoRATrainerMixin`
in front (:func:`~balora_plugins.trainer_mixin.mix_into`). The regularizer is then part of the loss the Trainer
backpropagates, scaled like its own loss; the metrics reach ``log_history`` and every ``report_to`` backend;
checkpoints carry the reference; resume restores it. The class stays swapped after ``train()``, so the usual
``trainer.save_model()`` writes the BA-LoRA artefacts and ``trainer.evaluate()`` reports the terms;
:meth:`BALoRACallback.detach` gives the trainer its own class back.

The convenience: ``Trainer(..., callbacks=[BALoRACallback("iclr2026-nlg")])`` attaches by itself.
transformers 5.16 – 5.24 hand a callback no trainer (``CallbackHandler`` passes the model, processing class,
optimizer, scheduler and dataloaders; ``set_trainer`` is called only on transformers' own
``JITCheckpointCallback``), but ``Trainer.__init__`` fires ``on_init_end`` on the callbacks it was given, with
the Trainer on the call stack: the callback takes the frame whose ``self`` is a ``Trainer`` holding this very
callback and attaches to it. That is before ``train()`` loads a checkpoint, so resuming restores the reference
from it. If a transformers release fires ``on_init_end`` differently and no such frame exists, the callback
raises there and then instead of letting the Trainer train without the terms. A callback added after
construction (``trainer.add_callback``) never sees ``on_init_end``: use ``attach``.

Host losses: the mixin wraps ``Trainer.compute_loss`` whole, so a ``compute_loss_func`` or label smoothing keeps
computing the task loss (the labels it pops are restored for BA-LoRA) and the regularizer follows the scaling
rule the Trainer applies to that loss (``trainer_mixin.host_loss_scaling``): both compose.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import transformers
from transformers import Trainer, TrainerCallback

from .config import BALoRAConfig
from .trainer_mixin import BALoRATrainerMixin, BALoRATrainerState, mix_into

__all__ = ["BALoRACallback"]

_NOT_ATTACHED = (
    "BALoRACallback has no trainer: it was added after the Trainer was built (trainer.add_callback), so it never "
    "saw Trainer.__init__. Write `BALoRACallback(config).attach(trainer)` before trainer.train() instead (attach "
    "also registers the callback)."
)
_NOT_FOUND = (
    "BALoRACallback got on_init_end but found no Trainer holding it on the call stack: transformers {version} "
    "builds its Trainer differently from 5.16 - 5.24, where Trainer.__init__ fires on_init_end itself. Rather than "
    "let the Trainer train without the BA-LoRA terms, the callback stops here. Build the Trainer without it and "
    "call `BALoRACallback(config).attach(trainer)` before trainer.train()."
)


class BALoRACallback(TrainerCallback):
    """Adds the BA-LoRA regularizers to a ``transformers.Trainer`` (or subclass).

    ``BALoRACallback(config).attach(trainer)`` puts BA-LoRA into a built trainer (the main path);
    ``Trainer(..., callbacks=[BALoRACallback(config)])`` attaches it from the Trainer's ``on_init_end`` (the
    convenience).

    Args:
        config: a :class:`~balora_plugins.BALoRAConfig`, a preset name (``"iclr2026-nlg"``, ``"iclr2026-nlu"``,
            ...), a dict of fields, or None for the defaults. ``task`` must match the model: ``nlg`` for a causal
            LM, ``nlu`` for a sequence classifier.
        ref_model: an explicit reference model (``reference='model'``); default: the frozen initial adapter.
        extra_plugins: extra pluggy plugins contributing terms.

    The trainer's model must be a PEFT LoRA model. Errors about the model or the config are raised when the
    callback attaches (in ``attach``, or inside ``Trainer(...)``), before step 1.
    """

    def __init__(
        self,
        config: BALoRAConfig | str | dict | None = None,
        *,
        ref_model=None,
        extra_plugins: Sequence[Any] = (),
    ):
        self.config = BALoRAConfig.coerce(config)
        self.ref_model = ref_model
        self.extra_plugins = tuple(extra_plugins)
        self.trainer: Trainer | None = None
        self._host_cls: type | None = None  # the trainer's own class while the mixin is in, else None
        self._state: BALoRATrainerState | None = None  # the trainer's BA-LoRA state while detached

    @property
    def host_class(self) -> type | None:
        """The trainer's own class while BA-LoRA is mixed into it (attached), else None."""
        return self._host_cls

    # ------------------------------------------------------------------ attaching
    def attach(self, trainer: Trainer) -> BALoRACallback:
        """Put BA-LoRA into ``trainer`` now (and register this callback with it); returns ``self``.

        The main path (a callback passed to the Trainer's constructor calls it from ``on_init_end``). Call it
        before ``train()``: on resume the reference adapter is restored while the checkpoint loads, which
        happens inside ``train()`` before any callback event.
        """
        if self.trainer is not None and self.trainer is not trainer:
            raise ValueError(
                "this BALoRACallback is already attached to another trainer; create one callback per trainer."
            )
        if self._host_cls is not None:
            return self
        if isinstance(trainer, BALoRATrainerMixin):
            raise ValueError(
                f"{type(trainer).__name__} already adds BA-LoRA (a BALoRATrainerMixin subclass such as "
                "BALoRASFTTrainer, or another BALoRACallback attached first); use one BALoRACallback on a plain "
                "trainer, or the BA-LoRA trainer without the callback."
            )
        host = mix_into(trainer, self._state)
        try:
            trainer.balora_setup(self.config, ref_model=self.ref_model, extra_plugins=self.extra_plugins)
        except BaseException:
            released = trainer.balora_release()
            if self.trainer is trainer:  # attached before: keep its state for the next attach
                self._state = released
            trainer.__class__ = host
            raise
        self._host_cls, self.trainer, self._state = host, trainer, None
        if not any(cb is self for cb in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        return self

    def detach(self) -> None:
        """Give the trainer its own class back and remove the hidden-state hook.

        Not done by ``train()``: after training the trainer keeps BA-LoRA, so ``trainer.save_model()`` writes the
        BA-LoRA artefacts. After ``detach`` the frozen ``balora_ref`` adapter stays in the model and
        :meth:`save_model` still writes everything; a ``train()`` attaches again.
        """
        trainer, host = self.trainer, self._host_cls
        if trainer is None or host is None:
            return
        # kept for the next attach: the step-0 adapter and the placed ref_model stay those of the first
        self._state = trainer.balora_release()
        trainer.__class__ = host
        self._host_cls = None

    def save_model(self, output_dir: str | None = None) -> None:
        """``trainer.save_model(output_dir)`` with the BA-LoRA extras, also after :meth:`detach`.

        Writes the artefact users serve (README "What you get after training"): the adapter that loads with
        plain PEFT on the untouched base model at the root, ``balora_config.json``, the model card and, for
        PiSSA-like inits, the trainable form with its initial adapter in ``balora_resume/``.
        """
        if self.trainer is None:
            raise RuntimeError(_NOT_ATTACHED)
        attached = self._host_cls is not None
        self.attach(self.trainer)
        try:
            self.trainer.save_model(output_dir)
        finally:
            if not attached:
                self.detach()

    def _find_trainer(self) -> Trainer | None:
        """The ``Trainer`` on the call stack whose callbacks hold this callback (inside ``Trainer.__init__``)."""
        frame = sys._getframe(1)
        while frame is not None:
            obj = frame.f_locals.get("self")
            if isinstance(obj, Trainer):
                handler = getattr(obj, "callback_handler", None)
                if handler is not None and any(cb is self for cb in handler.callbacks):
                    return obj
            frame = frame.f_back
        return None

    # ------------------------------------------------------------------ events
    def on_init_end(self, args, state, control, **kwargs):
        trainer = self._find_trainer()
        if trainer is None:
            raise RuntimeError(_NOT_FOUND.format(version=transformers.__version__))
        self.attach(trainer)  # refuses a second trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise RuntimeError(_NOT_ATTACHED)
        if self._host_cls is None:  # detached since: attach again
            self.attach(self.trainer)
        else:  # model_init builds a new model inside train(); prepare() is idempotent for the same model
            self.trainer.balora.prepare(self.trainer.model)

    def on_train_end(self, args, state, control, **kwargs):
        # Stay attached (save_model, evaluate); only drop the last forward's captured tensors.
        if self._host_cls is not None:
            self.trainer.balora.release_capture()
