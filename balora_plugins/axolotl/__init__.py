"""BA-LoRA for axolotl: add ``plugins: [balora_plugins.axolotl.BALoRAPlugin]`` (and optional ``balora_*`` keys).

Hooks, in the order axolotl calls them:

* ``register`` (raw YAML): unset ``lora_*_kernel`` keys are set to false before axolotl would auto-enable its
  fused kernels (see ``args.KERNEL_REASON``).
* config validation (:class:`~.args.BALoRAArgs`): key types/values, misspelled ``balora_*`` keys,
  ``adapter: lora``, no RL / reward model / ReLoRA, no MLP/embedding LoRA kernels.
* ``pre_lora_load``: under DeepSpeed ZeRO-3, keeps the DeepSpeed config registered so PEFT's PiSSA init gathers
  the partitioned base weights (axolotl drops it after loading the model).
* ``post_lora_load``: validates the PEFT model and adds the frozen snapshot of the initial (PiSSA) adapter.
* ``post_model_load``: checks axolotl left the trained adapter trainable and the snapshot frozen.
* ``get_trainer_cls`` / ``post_trainer_create``: :class:`~.trainer.AxolotlBALoRATrainer` (axolotl's own SFT
  trainer with :class:`~balora_plugins.trainer_mixin.BALoRATrainerMixin` in front), set up with the YAML's config.
* ``post_train``: saves the final adapter through the trainer and writes ``plain_lora/`` beside it.

axolotl only *logs* a plugin whose import raises ``ImportError`` and then drops its keys, so a broken install
is turned into a ``RuntimeError`` here: the run stops instead of training without BA-LoRA.
"""

from __future__ import annotations

try:
    from axolotl.integrations.base import BasePlugin
    from axolotl.utils.logging import get_logger

    from ..core.distributed import zero3_config_for_adapter_init
    from ..core.objective import BALoRAObjective
    from ..core.reference import REF_ADAPTER, has_residual_base, unwrap
    from .args import KERNEL_KEYS, KERNEL_REASON, BALoRAArgs, balora_config_from_cfg, plugin_listed
except ImportError as _exc:  # axolotl would swallow an ImportError and train without BA-LoRA
    raise RuntimeError(
        f"balora_plugins.axolotl.BALoRAPlugin cannot be imported ({type(_exc).__name__}: {_exc}). axolotl only logs "
        "a plugin that fails to import and then trains WITHOUT it, so this run stops here. Repair the install "
        "(pip install 'balora-plugins[axolotl]'), or remove the plugin line and every balora_* key."
    ) from _exc

LOG = get_logger("axolotl.integrations.balora")  # axolotl hides INFO from loggers outside axolotl.*

__all__ = ["BALoRAPlugin", "BALoRAArgs"]


class BALoRAPlugin(BasePlugin):
    """BA-LoRA regularizers (consistency, diversity, SVD) for axolotl's LoRA SFT."""

    def __init__(self):
        super().__init__()
        self._trainer = None
        self._zero3_config = None  # transformers keeps only a weak reference to it

    def get_input_args(self) -> str:
        return "balora_plugins.axolotl.args.BALoRAArgs"

    def register(self, cfg):
        self._trainer = None  # axolotl keeps one plugin instance per process ...
        if not plugin_listed(cfg):  # ... and calls every registered plugin's hooks, listed or not
            return
        unset = [k for k in KERNEL_KEYS if cfg.get(k) is None]
        for key in unset:
            cfg[key] = False
        if unset:
            LOG.warning("BA-LoRA: %s set to false (%s).", ", ".join(unset), KERNEL_REASON)

    def pre_lora_load(self, cfg, model):
        if plugin_listed(
            cfg
        ):  # DeepSpeed ZeRO-3: PEFT's PiSSA init must see the partitioned base weights whole
            self._zero3_config = zero3_config_for_adapter_init(cfg.deepspeed, model)

    def post_lora_load(self, cfg, model):
        if not plugin_listed(cfg):
            return
        peft_model = unwrap(model)
        if cfg.lora_model_dir and has_residual_base(peft_model):
            raise ValueError(
                f"lora_model_dir={cfg.lora_model_dir!r} holds a PiSSA-type adapter: its frozen base must be the "
                "residual it was trained on, and its step-0 adapter is not the one loaded. Resume a BA-LoRA run with "
                "`resume_from_checkpoint`, or start from a plain-init LoRA adapter."
            )
        objective = BALoRAObjective(balora_config_from_cfg(cfg)).prepare(peft_model)  # adds the snapshot
        objective.remove_hooks()  # the trainer's own objective captures the forwards
        LOG.info("BA-LoRA: reference mode %r, config %s", objective.mode, objective.config.to_dict())

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

    def get_trainer_cls(self, cfg):
        if not plugin_listed(cfg):
            return None
        from .trainer import trainer_class

        return trainer_class(cfg)

    def post_trainer_create(self, cfg, trainer):
        if not plugin_listed(cfg):
            return
        if getattr(trainer, "balora", None) is None:
            trainer._balora_setup(balora_config_from_cfg(cfg))
        self._trainer = trainer

    def post_train(self, cfg, model):
        # axolotl calls post_train right after trainer.train() and again after its own final save
        # (model.save_pretrained, which bypasses Trainer.save_model): save and export on the first call,
        # before axolotl's hub push, through the trainer's own save path.
        trainer, self._trainer = self._trainer, None
        if trainer is None:
            return
        trainer.save_model(cfg.output_dir, _internal_call=True)  # adapter, balora_ref/, balora_config.json
        trainer._balora_export(cfg.output_dir)
