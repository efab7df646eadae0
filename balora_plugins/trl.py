"""`BALoRASFTTrainer` and `BALoRASFTConfig`: TRL's ``SFTTrainer`` and ``SFTConfig`` with the BA-LoRA regularizers.

A drop-in subclass: the same constructor plus ``balora_config`` (a :class:`~balora_plugins.BALoRAConfig`, a preset
name, a dict, or None for ``"iclr2026-nlg"``), ``ref_model=`` (a separate reference model or its id/path, optional)
and ``extra_plugins=`` (extra pluggy plugins contributing terms, the keyword every door uses). The settings can
instead travel in the training arguments, the TRL way (``GKDConfig(SFTConfig)``, ``DPOConfig``):
:class:`BALoRASFTConfig` carries every ``BALoRAConfig`` field as a ``balora_*`` field, so ``TrlParser`` /
``HfArgumentParser`` scripts and their YAML files take the BA-LoRA keys and every tracker records them with the
other arguments. Everything else — the loss scaling, saving, resuming — is
:class:`~balora_plugins.trainer_mixin.BALoRATrainerMixin`; the maths is in :mod:`balora_plugins.core`. The
``balora/*`` metrics go into TRL's own metric store (``self._metrics``), beside ``entropy`` and
``mean_token_accuracy``.

Works with TRL 1.9 – 1.16. TRL 1.9 – 1.14 computes the SFT loss with a chunked NLL and 1.15+ with a fused LM head;
neither returns logits, so the terms are computed from the decoder backbone's final hidden states, which every
version computes. Completion-only / assistant-only losses reach ``compute_loss`` as ``labels`` with -100 on
untrained tokens; packed and padding-free batches carry ``position_ids`` (0 at each document start, where TRL also
sets the label to -100), so the core's shifted valid-row mask never pairs a position with the next document.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn
from trl import SFTConfig, SFTTrainer

from .arguments import DEFAULT_PRESET, BALoRAFields, add_balora_fields, balora_field_names
from .config import PRESETS, BALoRAConfig
from .core.card import PAPER
from .core.model import validate_model
from .core.reference import is_peft_model, resolve_mode, unwrap
from .trainer_mixin import BALoRATrainerMixin

__all__ = ["BALoRASFTConfig", "BALoRASFTTrainer", "sft_train_dataset"]

NLG_PRESETS = tuple(name for name, values in PRESETS.items() if values["task"] == "nlg")


# ---------------------------------------------------------------------------------------------- the config
@add_balora_fields(presets=NLG_PRESETS)
class BALoRASFTConfig(BALoRAFields, SFTConfig):
    """``trl.SFTConfig`` plus every BA-LoRA setting as a ``balora_*`` field (``balora_lambda_svd``, ...).

    ``balora_preset`` (default ``"iclr2026-nlg"``) picks the preset that the other ``balora_*`` fields override,
    as in the axolotl YAML; the fields are generated from ``BALoRAConfig`` (:mod:`balora_plugins.arguments`). The
    settings are validated here, with the field names in the errors; afterwards every ``balora_*`` field holds
    the value that trains, so trackers record the effective settings. :meth:`to_balora_config` returns them as a
    :class:`~balora_plugins.BALoRAConfig`.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        # What the user set (before the fields are filled in): only these can disagree with balora_config=.
        self._balora_explicit = tuple(k for k in balora_field_names() if getattr(self, k) is not None)
        self.set_balora_fields(self.to_balora_config(), preset=self.balora_preset or DEFAULT_PRESET)


def resolve_balora_config(balora_config: BALoRAConfig | str | dict | None, args: Any) -> BALoRAConfig:
    """The one BA-LoRA configuration of a trainer given ``balora_config=`` and its training ``args``.

    Plain ``SFTConfig`` args: ``balora_config`` (None = the default preset). :class:`BALoRASFTConfig` args: their
    ``balora_*`` fields; with ``balora_config=`` as well, the two must agree on every field the user set in the
    args (else a ``ValueError`` names both values), and args that set none are filled in from ``balora_config``,
    so the recorded arguments always show the settings that train.
    """
    if not isinstance(args, BALoRASFTConfig):
        return BALoRAConfig.coerce(balora_config)
    from_args = args.to_balora_config()
    if balora_config is None:
        return from_args
    given = BALoRAConfig.coerce(balora_config)
    if not args._balora_explicit:
        args.set_balora_fields(given, preset=None)  # None: the fields, not a preset, describe the settings
        return given
    differ = [
        f.name
        for f in dataclasses.fields(BALoRAConfig)
        if getattr(given, f.name) != getattr(from_args, f.name)
    ]
    if differ:
        pairs = "; ".join(
            f"balora_config.{n}={getattr(given, n)!r} but args.balora_{n}={getattr(from_args, n)!r}"
            + ("" if f"balora_{n}" in args._balora_explicit else " (from the preset)")
            for n in differ
        )
        raise ValueError(
            f"BALoRASFTTrainer got BA-LoRA settings twice and they disagree: {pairs}. Set them in one place: "
            f"drop balora_config= (the args set {list(args._balora_explicit)}) or use a plain SFTConfig / leave the "
            "balora_* fields unset."
        )
    return given


def sft_train_dataset(model: nn.Module, dataset: Any, args: SFTConfig, processing_class: Any) -> Any:
    """``dataset`` prepared exactly as an ``SFTTrainer`` with these ``args`` prepares it — chat template, tokens,
    completion / assistant masks or labels, truncation at ``args.max_length`` — but not packed: the tokenised
    examples :func:`~balora_plugins.core.precompute_reference` takes (a packed batch is split back into them).

    TRL's own preparation runs (an ``SFTTrainer`` is built and dropped), so the token ids are the ones training
    sees, whatever the TRL release. ``model`` is only what that trainer is built on (without gradient
    checkpointing, so TRL leaves its modules as they are).
    """
    args = dataclasses.replace(args, packing=False, gradient_checkpointing=False)
    return SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=processing_class
    ).train_dataset


# ---------------------------------------------------------------------------------------------- the trainer
class BALoRASFTTrainer(BALoRATrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` + BA-LoRA. Takes every ``SFTTrainer`` argument, plus:

    Args:
        balora_config: the regularizer settings: a ``BALoRAConfig``, a preset name (``"iclr2026-nlg"``,
            ``"v5-nlg"``, ...), a dict of fields, or None: the ``balora_*`` fields of a :class:`BALoRASFTConfig`
            ``args``, else ``"iclr2026-nlg"``. Given with a ``BALoRASFTConfig`` that sets ``balora_*`` fields, the
            two must agree.
        ref_model: an explicit reference model for the consistency term, or its hub id / local path, loaded as
            TRL loads a string ``ref_model`` / teacher: ``args.model_init_kwargs``, with the trained model's dtype
            and attention implementation unless those say otherwise, on the trained model's device (default: the
            frozen initial adapter for PiSSA-like inits, the adapter switched off for plain LoRA init; no second
            model in memory).
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
        ref_model: str | nn.Module | None = None,
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
        config = resolve_balora_config(balora_config, kwargs.get("args", args[0] if args else None))
        if isinstance(model, nn.Module):
            _check_before_wrap(model, kwargs.get("peft_config"), config, ref_model)
        super().__init__(model, *args, **kwargs)
        if isinstance(ref_model, str):
            ref_model = self._balora_load_reference(ref_model)
        self._balora_setup(config, ref_model=ref_model, extra_plugins=extra_plugins)

    def _balora_load_reference(self, model_id: str) -> nn.Module:
        """Load a reference given by hub id or path, as TRL's DPO trainer loads its reference (TRL 1.16).

        ``args.model_init_kwargs`` (how TRL loaded a string ``model``), the trained model's dtype and attention
        implementation unless those set them, and ``device_map=None`` then the trained model's device (TRL 1.9's
        loader would otherwise spread it with ``device_map="auto"``).
        """
        from trl.trainer.utils import create_model_from_path

        base = unwrap(self.model)
        base = base.get_base_model() if is_peft_model(base) else base
        kwargs = dict(self.args.model_init_kwargs or {})
        kwargs.setdefault("dtype", base.dtype)
        kwargs.setdefault("attn_implementation", base.config._attn_implementation)
        kwargs.setdefault("trust_remote_code", self.args.trust_remote_code)
        placed = kwargs.get("device_map") is not None or kwargs.get("quantization_config") is not None
        kwargs.setdefault("device_map", None)
        reference = create_model_from_path(model_id, **kwargs)
        if not placed:
            reference.to(next(base.parameters()).device)
        return reference

    def _balora_record(self, metrics: dict[str, float], mode: str) -> None:
        """Write the micro-batch's ``balora/*`` metrics into TRL's store, which ``SFTTrainer.log`` averages and
        prefixes with ``eval_`` in evaluation. A skip count is a running total: kept as its latest value (as TRL
        keeps ``num_tokens``), so the log shows the count, not a mean of counts."""
        store = self._metrics[mode]
        for k, v in metrics.items():
            if k.startswith("balora/skipped_"):
                store[k] = [v]
            else:
                store[k].append(v)


def _check_before_wrap(
    model: nn.Module, peft_config: Any, config: BALoRAConfig, ref_model: str | nn.Module | None
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
