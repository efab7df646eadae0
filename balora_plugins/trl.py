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

from .arguments import INIT_FIELD, PAPER_INIT, PRESET_KEY, TRL, BALoRAFields, add_balora_fields, settings
from .config import BALoRAConfig, default_preset
from .core import (
    PAPER,
    get_qpissa_model,
    is_peft_model,
    lora_init,
    nearest_preset,
    resolve_mode,
    unwrap,
    validate_model,
    wants_qpissa,
)
from .trainer_mixin import BALoRATrainerMixin, refuse_overwriting_checkpoints

__all__ = ["BALoRASFTConfig", "BALoRASFTTrainer", "sft_train_dataset"]

# The command line's refusal to start over in an output_dir holding an earlier run's checkpoints.
ARGS_HINTS = dict(
    resume="pass --resume_from_checkpoint {latest} (TRL's scripts hand it to trainer.train; in Python: "
    "BALoRASFTConfig(resume_from_checkpoint=...) and trainer.train(resume_from_checkpoint=args."
    "resume_from_checkpoint))",
    overwrite="pass --balora_overwrite_output_dir true (balora_overwrite_output_dir=True)",
)
PLAIN_INIT_WARNING = (
    "BA-LoRA: the LoRA adapter has plain initialisation (init_lora_weights={init!r}), so this run is the "
    "{preset} regularizers on plain LoRA, NOT the paper's method, which starts from PiSSA. For the paper's method "
    f"pass --{INIT_FIELD} {PAPER_INIT} (BALoRASFTConfig({INIT_FIELD}={PAPER_INIT!r}), or LoraConfig("
    f"init_lora_weights={PAPER_INIT!r})); to keep plain LoRA and silence this, --{INIT_FIELD} lora."
)


# ---------------------------------------------------------------------------------------------- the config
@add_balora_fields(door=TRL, adapter_init=True)
class BALoRASFTConfig(BALoRAFields, SFTConfig):
    """``trl.SFTConfig`` plus every BA-LoRA setting of a causal LM as a ``balora_*`` field (``balora_lambda_svd``,
    ...; the NLU-only ``reference_cache`` and ``reference_head`` are not offered).

    ``balora_preset`` (default ``"iclr2026-nlg"``) picks the preset that the other ``balora_*`` fields override,
    as in the axolotl YAML; the fields are generated from ``BALoRAConfig`` (:mod:`balora_plugins.arguments`). The
    fields are the single source of the settings: they keep what the user set (None: the preset's value), are
    validated here with the field names in the errors, and :meth:`to_balora_config` computes the
    :class:`~balora_plugins.BALoRAConfig` that trains from them. :meth:`to_dict` — what the ``report_to``
    trackers log — reports that configuration's values (and the preset), so trackers record the settings that
    train. ``balora_init`` (e.g. ``pissa_niter_16``, the paper's) sets the initialisation of the adapter the
    trainer builds from ``peft_config`` — the one thing TRL's ``get_peft_config(ModelConfig)`` cannot say.

    An ``output_dir`` holding BA-LoRA checkpoints of an earlier run is refused here, before any model or data
    loads, unless ``resume_from_checkpoint`` (``--resume_from_checkpoint``, which TRL's scripts hand to
    ``trainer.train``) or ``balora_overwrite_output_dir`` is set.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        config = self.to_balora_config()  # bad settings fail here, naming the balora_* field
        self.adapter_init()  # as does a bad balora_init
        if not self.resume_from_checkpoint and not config.overwrite_output_dir:
            refuse_overwriting_checkpoints(self.output_dir, **ARGS_HINTS)

    def to_dict(self) -> dict[str, Any]:
        """``SFTConfig.to_dict`` (what ``report_to`` trackers log) with every ``balora_*`` field at the value that
        trains — an unset one at its preset's — and ``balora_preset`` the preset they override."""
        return {**super().to_dict(), **self.effective_settings()}


def with_adapter_init(model: Any, peft_config: Any, args: Any) -> Any:
    """``peft_config`` with the initialisation ``args.balora_init`` asks for (``peft_config`` itself when unset).

    Refuses, naming both values, a ``peft_config`` that already names another non-default initialisation, a model
    that is already a ``PeftModel`` initialised otherwise (an adapter is initialised once, when it is created) and
    a ``balora_init`` without any adapter to build.
    """
    init = args.adapter_init() if isinstance(args, BALoRAFields) else None
    if init is None:
        return peft_config
    asked = f"{INIT_FIELD}={getattr(args, INIT_FIELD)!r}"
    if peft_config is None:
        if isinstance(model, nn.Module) and is_peft_model(model):
            have = lora_init(unwrap(model))
            if have == init:
                return None
            raise ValueError(
                f"{asked} but the model is already a PeftModel whose adapter was initialised with "
                f"init_lora_weights={have!r}; an adapter is initialised once, when it is created. Pass the base "
                "model with peft_config=LoraConfig(...) (TRL: --use_peft) so the trainer creates it, or leave "
                f"{INIT_FIELD} unset."
            )
        raise ValueError(
            f"{asked} initialises the LoRA adapter the trainer builds from peft_config, but no peft_config was "
            "given: pass one (a TRL script: --use_peft, which get_peft_config(model_args) turns into a LoraConfig)."
        )
    have = getattr(peft_config, "init_lora_weights", None)
    if have is None:
        raise ValueError(
            f"{asked} applies to a LoraConfig, but peft_config is a {type(peft_config).__name__}."
        )
    if have is not True and have != init:
        raise ValueError(
            f"{asked} but peft_config.init_lora_weights={have!r}: the initialisation is set twice and the two "
            f"disagree. Set it in one place (leave {INIT_FIELD} unset, or the LoraConfig's init_lora_weights)."
        )
    return dataclasses.replace(peft_config, init_lora_weights=init)


def resolve_balora_config(
    balora_config: BALoRAConfig | str | dict | None, args: Any
) -> tuple[BALoRAConfig, Any]:
    """The one BA-LoRA configuration of a trainer given ``balora_config=`` and its training ``args``, and the
    training arguments the trainer keeps (``args`` itself, or a copy that describes ``balora_config``).

    Plain ``SFTConfig`` args: ``balora_config`` (None = the default preset). :class:`BALoRASFTConfig` args are the
    source of the settings: their ``balora_*`` fields. With ``balora_config=`` as well, the two must agree on every
    setting when the args set any ``balora_*`` field (else a ``ValueError`` names both values); args that set none
    are not changed but copied with ``balora_config``'s values in their fields (and its base preset), so the
    trainer's arguments — what trackers record — describe the settings that train.
    """
    if not isinstance(args, BALoRASFTConfig):
        return BALoRAConfig.coerce(balora_config), args
    if balora_config is None:
        return args.to_balora_config(), args
    given = BALoRAConfig.coerce(balora_config)
    chosen = args.explicit_settings()
    if not chosen:
        fields = {s.key: getattr(given, s.name) for s in settings(TRL)}
        return given, dataclasses.replace(
            args, **{PRESET_KEY: default_preset(given.task, given.formulation)}, **fields
        )
    from_args = args.to_balora_config()
    differ = [
        f.name
        for f in dataclasses.fields(BALoRAConfig)
        if getattr(given, f.name) != getattr(from_args, f.name)
    ]
    if differ:
        pairs = "; ".join(
            f"balora_config.{n}={getattr(given, n)!r} but args.balora_{n}={getattr(from_args, n)!r}"
            + ("" if f"balora_{n}" in chosen else " (from the preset)")
            for n in differ
        )
        raise ValueError(
            f"BALoRASFTTrainer got BA-LoRA settings twice and they disagree: {pairs}. Set them in one place: "
            f"drop balora_config= (the args set {list(chosen)}) or use a plain SFTConfig / leave the "
            "balora_* fields unset."
        )
    return from_args, args


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
        training_args = kwargs.get("args", args[0] if args else None)
        config, training_args = resolve_balora_config(balora_config, training_args)
        if "args" in kwargs or not args:
            kwargs["args"] = training_args
        else:
            args = (training_args, *args[1:])
        kwargs["peft_config"] = with_adapter_init(model, kwargs.get("peft_config"), training_args)
        model = _qpissa_before_wrap(model, training_args, kwargs)
        if isinstance(model, nn.Module):
            _check_before_wrap(model, kwargs["peft_config"], config, ref_model)
        super().__init__(model, *args, **kwargs)
        if isinstance(ref_model, str):
            ref_model = self._balora_load_reference(ref_model)
        self.balora_setup(config, ref_model=ref_model, extra_plugins=extra_plugins)
        explicit = getattr(training_args, INIT_FIELD, None) is not None
        if not explicit and not self.balora.rewrites_base and any(v > 0 for v in config.lambdas.values()):
            init = lora_init(self.balora_peft_model, self.balora.adapter_name)
            warnings.warn(
                PLAIN_INIT_WARNING.format(init=init, preset=nearest_preset(config)[0]),
                UserWarning,
                stacklevel=2,
            )

    def _balora_load_reference(self, model_id: str) -> nn.Module:
        """Load a reference given by hub id or path, as TRL's DPO trainer loads its reference (TRL 1.16).

        ``args.model_init_kwargs`` (how TRL loaded a string ``model``), the trained model's dtype and attention
        implementation unless those set them, and ``device_map=None`` then the trained model's device (TRL 1.9's
        loader would otherwise spread it with ``device_map="auto"``).
        """
        from trl.trainer.utils import create_model_from_path

        base = self.balora_peft_model
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

    def balora_record(self, metrics: dict[str, float], mode: str) -> None:
        """Write the micro-batch's ``balora/*`` metrics into TRL's store, which ``SFTTrainer.log`` averages and
        prefixes with ``eval_`` in evaluation. A skip count is a running total: kept as its latest value (as TRL
        keeps ``num_tokens``), so the log shows the count, not a mean of counts."""
        store = self._metrics[mode]
        for k, v in metrics.items():
            if k.startswith("balora/skipped_"):
                store[k] = [v]
            else:
                store[k].append(v)


def _qpissa_before_wrap(model: str | nn.Module, args: Any, kwargs: dict[str, Any]) -> str | nn.Module:
    """QPiSSA in one step (docs/qlora.md): a 4-bit model (or a model id with a 4-bit ``quantization_config``) and
    a PiSSA ``peft_config`` become the QPiSSA ``PeftModel`` here, and ``peft_config`` is taken out of ``kwargs``
    (PEFT itself refuses PiSSA's SVD on quantised layers). A model id is loaded as ``SFTTrainer`` loads it."""
    peft_config = kwargs.get("peft_config")
    if isinstance(model, str) and str(getattr(peft_config, "init_lora_weights", "")).startswith("pissa"):
        init_kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
        if kwargs.get("quantization_config") is not None:  # TRL 1.16's trainer argument
            init_kwargs["quantization_config"] = kwargs.pop("quantization_config")
        qcfg = init_kwargs.get("quantization_config")
        four_bit = (
            qcfg.get("load_in_4bit") if isinstance(qcfg, dict) else getattr(qcfg, "load_in_4bit", False)
        )
        if four_bit:
            from trl.trainer.utils import create_model_from_path

            init_kwargs.setdefault("trust_remote_code", getattr(args, "trust_remote_code", False))
            model = create_model_from_path(model, **init_kwargs)
    if not wants_qpissa(model, peft_config):
        return model
    kwargs["peft_config"] = None
    return get_qpissa_model(model, peft_config)


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
