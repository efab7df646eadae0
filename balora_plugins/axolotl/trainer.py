"""The trainer the BA-LoRA plugin hands to axolotl: axolotl's own SFT trainer with the shared mixin in front.

Packing, optimizers, schedulers and checkpointing stay axolotl's; :class:`~balora_plugins.trainer_mixin.BALoRATrainerMixin`
adds the regularizer, the saved reference and the artefact users serve (README "What you get after training").
The trainer reads its settings from ``self.args`` (the ``balora_*`` fields axolotl mixes into its
``TrainingArguments`` from the plugin's ``get_training_args_mixin``, filled by ``get_training_args``), and its
metrics go through axolotl's one metric store
(``store_metrics``; the mixin never creates its own here), so they are reduced and rounded like axolotl's own and reach every ``report_to``.
"""

from __future__ import annotations

from typing import Any

from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.utils.import_helper import get_cls_from_module_str

from ..trainer_mixin import BALoRATrainerMixin
from .args import TRAINING_ARGS, balora_config_from_cfg


class AxolotlBALoRATrainer(BALoRATrainerMixin, AxolotlTrainer):
    """``AxolotlTrainer`` + BA-LoRA, configured from ``args`` (an ``AxolotlTrainingArguments`` carrying
    :class:`~balora_plugins.axolotl.args.BALoRATrainingArgsMixin`; unset fields take the preset's values)."""

    # axolotl's push_to_hub passes these to the card (AxolotlTrainer.push_to_hub); BA-LoRA's card update adds them
    # on every save (core/card.py).
    tag_names = ["axolotl", "ba-lora", "peft"]

    def __init__(self, *args: Any, **kwargs: Any):
        if "balora_config" in kwargs:
            raise TypeError(
                f"{type(self).__name__} takes no balora_config={kwargs['balora_config']!r}: it reads its settings "
                "from the balora_* fields of its TrainingArguments (balora_preset, balora_lambda_svd, ...). Put "
                "them in the axolotl YAML, or pass them to the arguments, or use BALoRASFTTrainer / BALoRACallback "
                "outside axolotl."
            )
        super().__init__(*args, **kwargs)
        missing = [k for k in TRAINING_ARGS if not hasattr(self.args, k)]
        if missing:
            raise RuntimeError(
                f"{type(self).__name__} needs its BA-LoRA settings on its TrainingArguments, but "
                f"{type(self.args).__name__} has no {missing[0]!r}: list balora_plugins.axolotl.BALoRAPlugin under "
                "`plugins:` (axolotl then mixes BALoRATrainingArgsMixin into AxolotlTrainingArguments), or build "
                "the arguments from a dataclass deriving from both."
            )
        self.balora_setup(balora_config_from_cfg({k: getattr(self.args, k) for k in TRAINING_ARGS}))

    def balora_record(self, metrics: dict[str, float], mode: str) -> None:
        prefix = "eval_" if mode == "eval" else ""
        self.store_metrics(
            {
                prefix + k: (float(v), "max" if k.startswith("balora/skipped_") else "mean")
                for k, v in metrics.items()
            },
            train_eval=mode,
        )


def trainer_class(cfg) -> type[AxolotlTrainer]:
    """:class:`AxolotlBALoRATrainer`, or the YAML's ``trainer_cls`` with BA-LoRA in front of it."""
    if not cfg.trainer_cls:
        return AxolotlBALoRATrainer
    host = get_cls_from_module_str(cfg.trainer_cls)
    if not (isinstance(host, type) and issubclass(host, AxolotlTrainer)):
        raise ValueError(
            f"trainer_cls={cfg.trainer_cls!r} is not a subclass of axolotl's AxolotlTrainer; the BA-LoRA plugin "
            "can only add its loss to one. Remove `trainer_cls` or derive it from AxolotlTrainer."
        )
    return type(f"BALoRA{host.__name__}", (AxolotlBALoRATrainer, host), {"__module__": host.__module__})
