"""BA-LoRA for axolotl: add ``plugins: [balora_plugins.axolotl.BALoRAPlugin]`` (and optional ``balora_*`` keys).

Hooks, in the order axolotl calls them:

* ``register`` (raw YAML): unset ``lora_*_kernel`` keys are set to false before axolotl would auto-enable its
  fused kernels (see ``args.KERNEL_REASON``).
* config validation (:class:`~.args.BALoRAArgs`): key types/values, then one validator per rule: misspelled
  ``balora_*`` keys, ``adapter: lora``/``qlora``, no PiSSA on a quantised base, no RL / reward model / KD trainer /
  ReLoRA, no MLP/embedding LoRA kernels, the axolotl release (``compat.py``, the one place releases differ).
* ``load_datasets`` (``axolotl train`` only, before the data and the model load): an ``output_dir`` holding BA-LoRA
  checkpoints of an earlier run is refused unless ``resume_from_checkpoint`` / ``auto_resume_from_checkpoints``
  resumes it or ``balora_overwrite_output_dir`` overwrites it (returns None: axolotl loads the data itself).
* ``pre_lora_load``: under DeepSpeed ZeRO-3, keeps the DeepSpeed config registered so PEFT's PiSSA init gathers
  the partitioned base weights (axolotl drops it after loading the model). QPiSSA (``adapter: qlora``,
  ``load_in_4bit``, a PiSSA init): axolotl's LoRA is created with plain init (PEFT refuses PiSSA on 4-bit layers).
* ``post_lora_load``: QPiSSA: PiSSA of the full-precision weights of ``base_model`` with the residual quantised
  into the 4-bit layers (docs/qlora.md); then validates the PEFT model, decides the reference and adds the frozen
  snapshot of the initial adapter on a rewritten base (PiSSA created here, or a pre-initialised PiSSA pair from
  ``lora_model_dir``).
* ``post_model_load``: checks axolotl left the trained adapter trainable and the snapshot frozen.
* ``get_training_args_mixin`` / ``get_training_args``: the ``balora_*`` values travel on axolotl's
  ``TrainingArguments`` (:class:`~.args.BALoRATrainingArgsMixin`), as axolotl's own KD plugin hands over its keys.
* ``get_trainer_cls``: :class:`~.trainer.AxolotlBALoRATrainer` (axolotl's own SFT trainer with
  :class:`~balora_plugins.trainer_mixin.BALoRATrainerMixin` in front), which configures itself from ``self.args``.
* ``post_trainer_create``: checks axolotl built that trainer (not another plugin's).
* ``post_train`` (called twice by axolotl): makes ``output_dir`` the artefact users serve — the plain-LoRA adapter
  for the untouched base at its root, the trainable form in ``balora_resume/``, BA-LoRA's model card.

axolotl 0.19 only *logs* a plugin whose import raises ``ImportError`` and then drops its keys, so a broken install
is turned into a ``RuntimeError`` here: the run stops instead of training without BA-LoRA (0.21 raises itself).
"""

from __future__ import annotations

try:
    from axolotl.integrations.base import BasePlugin
    from axolotl.utils.logging import get_logger

    from ..core import (
        REF_ADAPTER,
        init_rewrites_base,
        lora_init,
        prepare_reference,
        qpissa_initialize,
        unwrap,
        validate_model,
        weight_source,
    )
    from ..engines import zero3_config_for_adapter_init
    from . import compat
    from .args import (
        KERNEL_KEYS,
        KERNEL_REASON,
        PLUGIN,
        TRAINING_ARGS,
        BALoRAArgs,
        balora_config_from_cfg,
        no_silent_overwrite,
        plugin_listed,
        training_args_from_cfg,
    )
except ImportError as _exc:  # axolotl would swallow an ImportError and train without BA-LoRA
    raise RuntimeError(
        f"balora_plugins.axolotl.BALoRAPlugin cannot be imported ({type(_exc).__name__}: {_exc}). axolotl 0.19 only "
        "logs a plugin that fails to import and then trains WITHOUT it, so this run stops here. Repair the install "
        "(pip install 'balora-plugins[axolotl]'), or remove the plugin line and every balora_* key."
    ) from _exc

LOG = get_logger("axolotl.integrations.balora")  # axolotl hides INFO from loggers outside axolotl.*

__all__ = ["BALoRAPlugin", "BALoRAArgs"]


class BALoRAPlugin(BasePlugin):
    """BA-LoRA regularizers (consistency, diversity, SVD) for axolotl's LoRA SFT."""

    def __init__(self):
        super().__init__()
        self._trainer = None
        self._post_train_calls = 0
        self._zero3_config = None  # transformers keeps only a weak reference to it
        self._qpissa_init = None  # the PiSSA init QPiSSA applies after axolotl created a plain-init LoRA

    def get_input_args(self) -> str:
        return "balora_plugins.axolotl.args.BALoRAArgs"

    def register(self, cfg):
        self._trainer, self._post_train_calls = None, 0  # axolotl keeps one plugin instance per process ...
        if not plugin_listed(cfg):  # ... and calls every registered plugin's hooks, listed or not
            return
        unset = [k for k in KERNEL_KEYS if cfg.get(k) is None]
        for key in unset:
            cfg[key] = False
        if unset:
            LOG.warning("BA-LoRA: %s set to false (%s).", ", ".join(unset), KERNEL_REASON)

    def load_datasets(self, cfg, preprocess: bool = False):
        # the first hook of `axolotl train` after validation (merge-lora, inference, ... never call it)
        if plugin_listed(cfg) and not preprocess:
            no_silent_overwrite(cfg)
        return None  # axolotl loads the datasets itself

    def pre_lora_load(self, cfg, model):
        if not plugin_listed(cfg):
            return
        # DeepSpeed ZeRO-3: PEFT's PiSSA init must see the partitioned base weights whole
        self._zero3_config = zero3_config_for_adapter_init(cfg.deepspeed, model)
        init = cfg.peft_init_lora_weights
        if cfg.load_in_4bit and not cfg.lora_model_dir and str(init or "").lower().startswith("pissa"):
            self._qpissa_init = init  # QPiSSA: plain init now (PEFT refuses PiSSA on 4-bit), PiSSA after
            cfg.peft_init_lora_weights = None

    def post_lora_load(self, cfg, model):
        if not plugin_listed(cfg):
            return
        peft_model = unwrap(model)
        config = balora_config_from_cfg(cfg)
        if self._qpissa_init is not None:
            init, self._qpissa_init = self._qpissa_init, None
            cfg.peft_init_lora_weights = init
            done = qpissa_initialize(
                peft_model, init, weight_source(peft_model.get_base_model(), cfg.base_model)
            )
            LOG.info("BA-LoRA: QPiSSA (%s) on %d 4-bit layers, residual re-quantised", init, len(done))
        if cfg.lora_model_dir and init_rewrites_base(lora_init(peft_model)):
            # PEFT re-ran the init on load (its config names it): the base is a fresh residual and the adapter
            # holds the saved weights, so neither the step-0 adapter nor the base it was trained on is here.
            raise ValueError(
                f"lora_model_dir={cfg.lora_model_dir!r} holds an adapter whose config says init_lora_weights="
                f"{lora_init(peft_model)!r}: PEFT ran that init again on load, rewriting the base, so the adapter is "
                "not on the base it was saved with. Resume a BA-LoRA run with `resume_from_checkpoint`; or load a "
                "pre-initialised PiSSA pair the way PEFT's recipe saves it — `base_model:` the residual model, "
                "`lora_model_dir:` the adapter saved with init_lora_weights=True (BA-LoRA recognises the pair); or "
                "start from a plain-init LoRA adapter."
            )
        validate_model(peft_model, config)
        mode = prepare_reference(peft_model, config.reference)  # adds the snapshot on a rewritten base
        LOG.info("BA-LoRA: reference mode %r, config %s", mode, config.to_dict())

    def post_model_load(self, cfg, model):
        if not plugin_listed(cfg):
            return
        params = list(unwrap(model).named_parameters())
        frozen_ref = all(not p.requires_grad for n, p in params if f".{REF_ADAPTER}." in n)
        if not frozen_ref or not any(p.requires_grad for n, p in params if ".default." in n):
            raise RuntimeError(
                f"BA-LoRA: after axolotl's model setup the trained adapter 'default' must be trainable and the "
                f"reference snapshot {REF_ADAPTER!r} frozen (trainable parameters now: "
                f"{[n for n, p in params if p.requires_grad][:4]}...). Please report this with your config."
            )

    def get_training_args_mixin(self) -> str:
        return "balora_plugins.axolotl.args.BALoRATrainingArgsMixin"

    def get_training_args(self, cfg):
        if not plugin_listed(cfg):
            return None
        if not compat.training_args_accept(list(TRAINING_ARGS)):
            raise RuntimeError(
                "BA-LoRA: axolotl's AxolotlTrainingArguments was built before the plugin was registered in this "
                "process (axolotl.core.training_args imported first), so it has no balora_* fields and the "
                "settings cannot reach the trainer. Run `axolotl train` in a fresh process, or call "
                "axolotl.utils.config.prepare_plugins(cfg) before importing axolotl's trainer builder."
            )
        return training_args_from_cfg(cfg)

    def get_trainer_cls(self, cfg):
        if not plugin_listed(cfg):
            return None
        from .trainer import trainer_class

        return trainer_class(cfg)

    def post_trainer_create(self, cfg, trainer):
        if not plugin_listed(cfg):
            return
        if getattr(trainer, "balora", None) is None:  # axolotl uses the first trainer class a plugin returns
            raise RuntimeError(
                f"BA-LoRA: axolotl built a {type(trainer).__name__}, not the plugin's trainer: a plugin listed before "
                f"{PLUGIN} handed axolotl its own trainer class, so the regularizers would not run. List "
                f"{PLUGIN} first under `plugins:` or remove the other plugin."
            )
        self._trainer = trainer

    def post_train(self, cfg, model):
        # axolotl 0.19 - 0.21 (axolotl/train.py) calls post_train twice: right after trainer.train(), and at the very
        # end of train(), after its own final save (save_trained_model: model.save_pretrained(output_dir), which
        # bypasses Trainer.save_model and writes the trainable PiSSA form back to the root), its model card or hub
        # push (through trainer.push_to_hub, whose save writes the artefact before the upload) and the teardown of
        # the process group.
        trainer = self._trainer
        if trainer is None:
            return
        self._post_train_calls += 1
        if self._post_train_calls == 1:
            # every rank is here, so the trainer's save may gather weights (DeepSpeed / FSDP); it ends with the
            # artefact, in case axolotl's own save below returns early (ReLoRA, expert parallel)
            trainer.save_model(cfg.output_dir, _internal_call=True)
        else:
            # no process group any more: file operations on the main process only, on what axolotl saved
            trainer.balora_write_artefacts(cfg.output_dir)
            self._trainer = None
