"""`BALoRASFTTrainer`: TRL's ``SFTTrainer`` with the BA-LoRA regularizers.

A drop-in subclass: the same constructor plus ``balora_config`` (a :class:`~balora_plugins.BALoRAConfig`, a preset
name, a dict, or None for ``"iclr2026-nlg"``), ``ref_model=`` (a separate reference model, optional) and
``extra_plugins=`` (extra pluggy plugins contributing terms, the keyword every door uses). Everything else — the loss scaling, the metrics,
saving, resuming — is :class:`~balora_plugins.trainer_mixin.BALoRATrainerMixin`; the maths is in :mod:`balora_plugins.core`.

Works with TRL 1.9 – 1.16. TRL 1.9 – 1.14 computes the SFT loss with a chunked NLL and 1.15+ with a fused LM head;
neither returns logits, so the terms are computed from the decoder backbone's final hidden states, which every
version computes. Completion-only / assistant-only losses reach ``compute_loss`` as ``labels`` with -100 on
untrained tokens; packed and padding-free batches carry ``position_ids`` (0 at each document start, where TRL also
sets the label to -100), so the core's shifted valid-row mask never pairs a position with the next document.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn
from trl import SFTTrainer

from .config import BALoRAConfig
from .core.card import PAPER
from .core.model import validate_model
from .core.reference import is_peft_model, resolve_mode
from .trainer_mixin import BALoRATrainerMixin

__all__ = ["BALoRASFTTrainer"]


class BALoRASFTTrainer(BALoRATrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` + BA-LoRA. Takes every ``SFTTrainer`` argument, plus:

    Args:
        balora_config: the regularizer settings: a ``BALoRAConfig``, a preset name (``"iclr2026-nlg"``,
            ``"v5-nlg"``, ...), a dict of fields, or None (``"iclr2026-nlg"``).
        ref_model: an explicit reference model for the consistency term (default: the frozen initial adapter
            for PiSSA-like inits, the adapter switched off for plain LoRA init; no second model in memory).
        extra_plugins: extra pluggy plugins implementing the ``balora_plugins`` hooks (additional terms); the
            same keyword as on :class:`~balora_plugins.callback.BALoRACallback` (``balora_plugins=`` is its
            deprecated 0.1 spelling).

    The model must be a LoRA ``PeftModel`` or come with ``peft_config=LoraConfig(...)``
    (``init_lora_weights="pissa"`` / ``"pissa_niter_N"`` / ``True``). Bad combinations raise before any step.
    """

    # TRL's model-card mechanism (trl/trainer/base_trainer.py, the same in TRL 1.9 - 1.16): SFTTrainer.__init__ puts
    # `_tag_names` on the model (so PEFT's card carries them too) and create_model_card — on every checkpoint and on
    # push_to_hub — fills "trained with {_name}, a method introduced in {_paper}" and the citation from them.
    _tag_names = ["trl", "sft", "ba-lora", "peft"]
    _name = "BA-LoRA"
    _paper = PAPER

    def __init__(
        self,
        model: str | nn.Module,
        *args: Any,
        balora_config: BALoRAConfig | str | dict | None = None,
        ref_model: nn.Module | None = None,
        extra_plugins: Sequence[Any] = (),
        **kwargs: Any,
    ):
        if "balora_plugins" in kwargs:  # the 0.1.0 name of extra_plugins
            if extra_plugins:
                raise TypeError("pass extra terms once: extra_plugins=... (balora_plugins= is its old name).")
            warnings.warn(
                "BALoRASFTTrainer(balora_plugins=...) is renamed extra_plugins=... (the keyword every door uses); "
                "the old name will be removed in 0.3.",
                FutureWarning,
                stacklevel=2,
            )
            extra_plugins = kwargs.pop("balora_plugins")
        # A bad config or model fails here, before TRL prepares the data or runs PiSSA's SVD.
        config = BALoRAConfig.coerce(balora_config)
        if isinstance(model, nn.Module):
            _check_before_wrap(model, kwargs.get("peft_config"), config, ref_model)
        super().__init__(model, *args, **kwargs)
        self._balora_setup(config, ref_model=ref_model, extra_plugins=extra_plugins)


def _check_before_wrap(
    model: nn.Module, peft_config: Any, config: BALoRAConfig, ref_model: nn.Module | None
) -> None:
    """Refuse bad input before ``SFTTrainer.__init__`` runs PiSSA's SVD (or its own, less specific, checks).

    A ``PeftModel`` gets the core's full :func:`validate_model`; a plain model without ``peft_config`` has no
    adapter; a ``peft_config`` must leave the output head frozen. The rest is re-checked after wrapping.
    """
    if is_peft_model(model) or peft_config is None:
        validate_model(model, config)
        resolve_mode(config.reference, model, ref_model)
        return
    from peft.tuners.tuners_utils import check_target_module_exists

    head = model.get_output_embeddings() if config.task == "nlg" else None
    names = [n for n, m in model.named_modules() if m is head and n]
    saved = getattr(peft_config, "modules_to_save", None) or ()
    # target_modules=None means PEFT's per-architecture defaults, which never include the head
    targeted = peft_config.target_modules is not None and any(
        check_target_module_exists(peft_config, n) for n in names
    )
    if targeted or any(n.split(".")[-1] in saved for n in names):
        raise ValueError(
            f"BA-LoRA computes its terms from the frozen output head, but peft_config targets it ({names[0]!r} in "
            f"target_modules={peft_config.target_modules!r} / modules_to_save={saved!r}). Remove it and keep the "
            "head frozen."
        )
