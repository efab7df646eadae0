"""The trainer the BA-LoRA plugin hands to axolotl: axolotl's own SFT trainer with the shared mixin in front.

Packing, optimizers, schedulers and checkpointing stay axolotl's; :class:`~balora_plugins.trainer_mixin.BALoRATrainerMixin`
adds the regularizer, the saved reference and the artefact users serve (README "What you get after training"). Metrics go through axolotl's metric
store (``store_metrics``), so they are reduced and rounded like axolotl's own and reach every ``report_to``.
"""

from __future__ import annotations

from typing import Any

from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.utils.import_helper import get_cls_from_module_str

from ..trainer_mixin import BALoRATrainerMixin


class AxolotlBALoRATrainer(BALoRATrainerMixin, AxolotlTrainer):
    """``AxolotlTrainer`` + BA-LoRA. Set up by the plugin's ``post_trainer_create``, or pass ``balora_config=``."""

    # axolotl's push_to_hub passes these to the card (AxolotlTrainer.push_to_hub); BA-LoRA's card update adds them
    # on every save (core/card.py).
    tag_names = ["axolotl", "ba-lora", "peft"]

    def __init__(self, *args: Any, balora_config=None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.balora = None
        if balora_config is not None:
            self._balora_setup(balora_config)

    def _balora_record(self, metrics: dict[str, float], mode: str) -> None:
        prefix = "eval_" if mode == "eval" else ""
        self.store_metrics(
            {
                prefix + k: (float(v), "max" if k.startswith("balora/skipped_") else "mean")
                for k, v in metrics.items()
            },
            train_eval=mode,
        )

    def train(self, *args: Any, **kwargs: Any):
        if self.balora is None:
            raise RuntimeError(
                f"{type(self).__name__} was created without BA-LoRA settings: list "
                "balora_plugins.axolotl.BALoRAPlugin under `plugins:` (its post_trainer_create sets it up) "
                "or pass balora_config=... to the constructor."
            )
        return super().train(*args, **kwargs)


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
