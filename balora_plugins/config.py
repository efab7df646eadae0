"""`BALoRAConfig`: every BA-LoRA setting, its presets, validation and (de)serialisation.

The fields follow `docs/method.md` (our statement of arXiv:2408.04556). Each field carries
its help text in ``metadata["help"]`` (the PEFT/TRL convention), which the axolotl args model and
the key table of ``balora_plugins/axolotl/README.md`` reuse.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

from .schedule import CONSISTENCY_SCHEDULES, REGULARIZER_SCHEDULES, LambdaSchedule, consistency_bounds

CONFIG_NAME = "balora_config.json"

TASKS = ("nlg", "nlu")
FORMULATIONS = ("iclr2026", "v5")
SVD_NORMS = ("auto", "frobenius", "nuclear")
REFERENCES = ("auto", "adapter_snapshot", "disabled_adapter", "model", "precomputed")
ON_NONFINITE = ("skip", "raise")
REFERENCE_HEADS = ("initial", "current")
FIELD_CHOICES: dict[str, tuple[str, ...]] = {
    "task": TASKS,
    "formulation": FORMULATIONS,
    "svd_norm": SVD_NORMS,
    "consistency_schedule": CONSISTENCY_SCHEDULES,
    "regularizer_schedule": REGULARIZER_SCHEDULES,
    "reference": REFERENCES,
    "on_nonfinite": ON_NONFINITE,
    "reference_head": REFERENCE_HEADS,
}
"""The fields that take one of a fixed set of strings, and that set (for generated argument parsers)."""


_PRESET_DEFAULT = (
    " Default: the value of the preset matching `task` and `formulation` (see docs/usage.md, Configuration)."
)


def default_preset(task: str, formulation: str) -> str:
    """The preset whose values a config of this ``task`` and ``formulation`` takes for every unset field."""
    return f"{formulation}-{task}"


def _help(text: str, tasks: tuple[str, ...] = TASKS, **kw: Any) -> Any:
    """A field with its help text and the tasks it applies to (both in ``metadata``, see :class:`BALoRAConfig`)."""
    return field(metadata={"help": text, "tasks": tasks}, **kw)


@dataclass
class BALoRAConfig:
    """Configuration of the BA-LoRA regularizers.

    Total loss ``L = L_task + λ1·L_CR + λ2·L_DR + λ3·L_SVD`` (docs/method.md §3). Build one with
    ``BALoRAConfig(...)`` or ``BALoRAConfig.from_preset("iclr2026-nlg", **overrides)``. The weights, k, K, T, the
    SVD norm and the schedules you do not set take the values of the preset matching ``task`` and
    ``formulation`` (``BALoRAConfig(task="nlu")`` is the ``iclr2026-nlu`` preset, ``BALoRAConfig()`` the
    ``iclr2026-nlg`` one, schedules included).

    Every field's ``metadata`` holds ``help`` (its help text, the PEFT/TRL convention) and ``tasks``: the tasks it
    applies to (``("nlg", "nlu")``, or one of them for a setting that only one task reads, such as the NLU-only
    ``reference_cache``). The argument generator (``balora_plugins/arguments.py``) offers a field as a
    ``balora_*`` setting only on the doors that can train one of its tasks: the TRL and axolotl doors (causal
    LMs) do not offer the NLU-only fields.
    """

    task: str = _help(
        "`nlg` (causal LM, token-level terms) or `nlu` (sequence classification).", default="nlg"
    )
    formulation: str = _help(
        "`iclr2026` (current paper / llm172 code: tempered KL, top-K entropy, Frobenius-normalised SVD) "
        "or `v5` (paper v1-v5: plain KL / MSE, full entropy, nuclear-normalised SVD).",
        default="iclr2026",
    )
    # The fields below default to None = "the value of the preset matching task and formulation" (filled in
    # __post_init__, see PRESET_FIELDS): BALoRAConfig(task="nlu") is the iclr2026-nlu preset, not NLG weights.
    lambda_consistency: float = _help(
        "λ1, weight of the consistency term L_CR." + _PRESET_DEFAULT, default=None
    )
    lambda_diversity: float = _help("λ2, weight of the diversity term L_DR." + _PRESET_DEFAULT, default=None)
    lambda_svd: float = _help("λ3, weight of the SVD term L_SVD." + _PRESET_DEFAULT, default=None)
    svd_top_k: int = _help(
        "k, the number of top singular values the SVD term concentrates on." + _PRESET_DEFAULT, default=None
    )
    diversity_top_k: int = _help(
        "K, the entropy (NLG) uses the K largest logits of each position, renormalised; 0 = full vocabulary."
        + _PRESET_DEFAULT,
        tasks=("nlg",),
        default=None,
    )
    temperature: float = _help(
        "T of the consistency KL (the loss is T²·KL of the tempered softmaxes)." + _PRESET_DEFAULT,
        default=None,
    )
    svd_norm: str = _help(
        "Denominator of the SVD share: `frobenius` (‖Z‖_F), `nuclear` (Σσ) or `auto` "
        "(iclr2026: frobenius for nlg, nuclear for nlu; v5: nuclear)." + _PRESET_DEFAULT,
        default=None,
    )
    consistency_schedule: str = _help(
        "`constant`; `cosine`: λ1 decays by a cosine from λ1 to cosine_final_ratio·λ1 over training; or "
        "`adaptive`: per micro-batch, λ1 = lambda_consistency_min + (lambda_consistency_max − "
        "lambda_consistency_min)·c with c = 1 − H/log|V| the confidence of the reference (H: its mean "
        "tempered entropy over the valid rows), so a confident reference pulls harder." + _PRESET_DEFAULT,
        default=None,
    )
    cosine_final_ratio: float = _help("Final fraction of λ1 under the cosine schedule.", default=0.1)
    lambda_consistency_min: float | None = _help(
        "λ1 for a uniform (least confident) reference under the adaptive schedule; None = "
        "0.1·lambda_consistency.",
        default=None,
    )
    lambda_consistency_max: float | None = _help(
        "λ1 for a one-hot (fully confident) reference under the adaptive schedule; None = lambda_consistency.",
        default=None,
    )
    regularizer_schedule: str = _help(
        "`constant`; `warmup`: λ2 and λ3 are 0 for the first warmup_start of training, then ramp linearly "
        "to full value over the next warmup_ramp; `linear_warmup` / `quadratic_warmup`: they rise from 0 as "
        "(progress/warmup_start) or its square over the first warmup_start of training." + _PRESET_DEFAULT,
        default=None,
    )
    warmup_start: float = _help(
        "Fraction of training during which λ2 = λ3 = 0 (warmup), or over which they rise "
        "(linear_warmup, quadratic_warmup).",
        default=0.2,
    )
    warmup_ramp: float = _help(
        "Fraction of training over which λ2, λ3 ramp up (warmup schedule).", default=0.05
    )
    schedule_whole_steps: bool = _help(
        "Round the λ2/λ3 warm-up boundaries down to whole optimizer steps as the authors' script does "
        "(w = int(warmup_start·S), r = max(int(warmup_ramp·S), 1) for S total steps), to reproduce their "
        "runs number for number; False: the boundaries are exact fractions of training.",
        default=False,
    )
    reference: str = _help(
        "Reference for the consistency term: `auto` (the snapshot when the adapter's base was rewritten: PiSSA-like "
        "inits, a pre-initialised PiSSA pair; the disabled adapter when the adapter adds nothing at the start; "
        "refused when the model cannot tell), `adapter_snapshot` (frozen copy of the initial adapter), "
        "`disabled_adapter`, `model` (a separate reference model you pass), or `precomputed` (NLG: the top-k "
        "reference `balora reference` stored at reference_path; no reference forward, no snapshot adapter in "
        "memory; docs/precomputed_reference.md).",
        default="auto",
    )
    reference_path: str | None = _help(
        "With reference='precomputed': the folder `balora reference` wrote (manifest.json + shards).",
        tasks=("nlg",),
        default=None,
    )
    chunk_size: int = _help(
        "Token positions per chunk in the fused NLG path; peak extra memory ≈ chunk_size × |V| × 4 bytes × a few.",
        tasks=("nlg",),
        default=256,
    )
    shift_labels: bool = _help(
        "Use the position whose *next* token is labelled (correct). False reproduces the authors' unshifted mask.",
        tasks=("nlg",),
        default=True,
    )
    on_nonfinite: str = _help(
        "What to do when a term is NaN/Inf: `skip` it for that step with a warning (counted in balora/skipped_*) "
        "or `raise`.",
        default="skip",
    )
    eps: float = _help("Added to the SVD denominators.", default=1e-8)
    reference_cache: bool = _help(
        "NLU only: keep each example's reference logits (D numbers, keyed by the example's tokens) and skip the "
        "reference forward for examples seen before — exact, the reference never changes; costs about 4·D + 150 "
        "bytes of CPU memory per distinct example.",
        tasks=("nlu",),
        default=False,
    )
    served_base: str | None = _help(
        "The untouched pre-trained model the saved adapter serves on (hub id or path), written as its "
        "`base_model_name_or_path` and into the model card. Unset: the model training loaded — except for a "
        "pre-initialised PiSSA pair, loaded on its residual base, which is not the model the adapter serves on: "
        'name the original model here (README, "What you get after training").',
        default=None,
    )
    hub_push_resume: bool = _help(
        "Also upload `balora_resume/` (the trainable form, for continued training) on `push_to_hub`. Unset: only "
        "with `hub_strategy` `checkpoint` / `all_checkpoints`, which upload whole checkpoints.",
        default=False,
    )
    overwrite_output_dir: bool = _help(
        "Start a new run in an output_dir that holds BA-LoRA checkpoints (checkpoint-N/) of an earlier run, which "
        "the new run then overwrites step by step. False (default): such a run is refused — before the model and "
        "data load where the door can tell — and you resume it instead (--resume_from_checkpoint, "
        "trainer.train(resume_from_checkpoint=...), axolotl's resume_from_checkpoint).",
        default=False,
    )

    reference_head: str = _help(
        "NLU only: the classifier head the reference logits are read through. `initial` (the paper's formula and "
        "the authors' script): the pre-trained backbone with the step-0 head — with a new, randomly initialised "
        "head the consistency term then pulls towards that random head (a confidence penalty plus its random "
        "class bias), not towards pre-trained knowledge. `current`: the pre-trained backbone's features read "
        "through the head being trained, no gradient through the reference path, so the term anchors the "
        "representation (docs/method.md, Classifiers with a new head).",
        tasks=("nlu",),
        default="initial",
    )

    def __post_init__(self) -> None:
        self._fill_preset_defaults()
        self._validate()

    def _fill_preset_defaults(self) -> None:
        """Unset (None) preset fields take the values of the preset matching ``task`` and ``formulation``."""
        _choice("task", self.task, TASKS)
        _choice("formulation", self.formulation, FORMULATIONS)
        preset = {**_PRESET_FALLBACK, **PRESETS[default_preset(self.task, self.formulation)]}
        for name in PRESET_FIELDS:
            if getattr(self, name) is None:
                setattr(self, name, preset[name])

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        for name, allowed in FIELD_CHOICES.items():
            _choice(name, getattr(self, name), allowed)
        for name in ("lambda_consistency", "lambda_diversity", "lambda_svd"):
            v = _number(name, getattr(self, name))
            if v < 0:
                raise ValueError(
                    f"BALoRAConfig.{name}={v!r} is negative; weights must be >= 0 (0 switches the term off)."
                )
        _integer("svd_top_k", self.svd_top_k, minimum=1, fix="k counts singular values; use 1 or more")
        _integer(
            "diversity_top_k", self.diversity_top_k, minimum=0, fix="use 0 for the full vocabulary or K >= 1"
        )
        _integer("chunk_size", self.chunk_size, minimum=1, fix="use e.g. 256")
        t = _number("temperature", self.temperature)
        if not t > 0:
            raise ValueError(
                f"BALoRAConfig.temperature={t!r} must be > 0 (the paper uses 2.0; 1.0 = no tempering)."
            )
        for name in ("cosine_final_ratio", "warmup_start", "warmup_ramp"):
            v = _number(name, getattr(self, name))
            if not 0 <= v <= 1:
                raise ValueError(f"BALoRAConfig.{name}={v!r} must lie in [0, 1] (a fraction of training).")
        if self.warmup_start + self.warmup_ramp > 1:
            raise ValueError(
                f"BALoRAConfig.warmup_start + warmup_ramp = {self.warmup_start + self.warmup_ramp!r} exceeds 1; "
                "the ramp must finish within training."
            )
        self._validate_adaptive()
        if not isinstance(self.schedule_whole_steps, bool):
            raise ValueError(
                f"BALoRAConfig.schedule_whole_steps={self.schedule_whole_steps!r} must be True or False."
            )
        e = _number("eps", self.eps)
        if not e > 0:
            raise ValueError(f"BALoRAConfig.eps={e!r} must be > 0 (it guards the SVD denominators).")
        if not isinstance(self.shift_labels, bool):
            raise ValueError(f"BALoRAConfig.shift_labels={self.shift_labels!r} must be True or False.")
        if not self.shift_labels and self.task == "nlu":
            raise ValueError("BALoRAConfig.shift_labels=False only applies to task='nlg' (token positions).")
        if not isinstance(self.overwrite_output_dir, bool):
            raise ValueError(
                f"BALoRAConfig.overwrite_output_dir={self.overwrite_output_dir!r} must be True or False."
            )
        if self.served_base is not None and not (
            isinstance(self.served_base, str) and self.served_base.strip()
        ):
            raise ValueError(
                f"BALoRAConfig.served_base={self.served_base!r} must be a hub id or a path of the pre-trained "
                "model (a non-empty string), or unset."
            )
        if not isinstance(self.hub_push_resume, bool):
            raise ValueError(f"BALoRAConfig.hub_push_resume={self.hub_push_resume!r} must be True or False.")
        self._validate_precomputed()
        if not isinstance(self.reference_cache, bool):
            raise ValueError(f"BALoRAConfig.reference_cache={self.reference_cache!r} must be True or False.")
        if self.reference_cache and self.task != "nlu":
            raise ValueError(
                "BALoRAConfig.reference_cache=True applies to task='nlu' only: a causal LM's reference output per "
                "example is a (tokens, |V|) distribution, too large to keep exactly (docs/method.md §2). Set "
                "reference_cache=False."
            )
        if self.reference_head == "current" and self.task != "nlu":
            raise ValueError(
                "BALoRAConfig.reference_head='current' applies to task='nlu' only: a causal LM's output head is "
                "frozen, so its initial and current heads are the same. Set reference_head='initial'."
            )
        if self.reference_head == "current" and self.reference_cache:
            raise ValueError(
                "BALoRAConfig.reference_cache=True with reference_head='current': the reference logits are read "
                "through the head being trained, so they change every step and cannot be cached. Set "
                "reference_cache=False (or reference_head='initial')."
            )

    def _validate_precomputed(self) -> None:
        path = self.reference_path
        if path is not None and (not isinstance(path, str | os.PathLike) or not str(path)):
            raise ValueError(
                f"BALoRAConfig.reference_path={path!r} must be the folder `balora reference` wrote (a path)."
            )
        if self.reference == "precomputed":
            if self.task != "nlg":
                raise ValueError(
                    "BALoRAConfig.reference='precomputed' applies to task='nlg' (a stored top-k reference per token); "
                    "for classifiers use reference_cache=True, which is exact."
                )
            if path is None:
                raise ValueError(
                    "BALoRAConfig.reference='precomputed' needs BALoRAConfig.reference_path: the folder written by "
                    "`balora reference DATA --model BASE --out FOLDER` (docs/precomputed_reference.md)."
                )
        elif path is not None:
            raise ValueError(
                f"BALoRAConfig.reference_path={path!r} only applies with BALoRAConfig.reference='precomputed' (it is "
                f"{self.reference!r}); set reference='precomputed' or leave reference_path unset."
            )

    def _validate_adaptive(self) -> None:
        bounds = {n: getattr(self, n) for n in ("lambda_consistency_min", "lambda_consistency_max")}
        for name, value in bounds.items():
            if value is None:
                continue
            if _number(name, value) < 0:
                raise ValueError(
                    f"BALoRAConfig.{name}={value!r} is negative; the adaptive λ1 bounds must be >= 0."
                )
            if self.consistency_schedule != "adaptive":
                raise ValueError(
                    f"BALoRAConfig.{name}={value!r} only applies with BALoRAConfig.consistency_schedule='adaptive' "
                    f"(it is {self.consistency_schedule!r}); set that schedule or leave BALoRAConfig.{name} unset."
                )
        low, high = self.adaptive_consistency_bounds
        if low > high:
            raise ValueError(
                f"BALoRAConfig.lambda_consistency_min={low!r} exceeds BALoRAConfig.lambda_consistency_max={high!r} "
                f"(an unset min is 0.1·λ1 and an unset max is λ1, BALoRAConfig.lambda_consistency="
                f"{self.lambda_consistency!r}); choose min <= max."
            )

    # ------------------------------------------------------------------ derived settings
    @property
    def consistency_kind(self) -> str:
        """`kl` (tempered for iclr2026) or `mse` (v5 NLU)."""
        return "mse" if (self.formulation == "v5" and self.task == "nlu") else "kl"

    @property
    def consistency_temperature(self) -> float:
        return 1.0 if self.formulation == "v5" else float(self.temperature)

    @property
    def diversity_kind(self) -> str:
        return "entropy" if self.task == "nlg" else "decorrelation"

    @property
    def entropy_top_k(self) -> int:
        return 0 if self.formulation == "v5" else int(self.diversity_top_k)

    @property
    def resolved_svd_norm(self) -> str:
        if self.svd_norm != "auto":
            return self.svd_norm
        if self.formulation == "iclr2026" and self.task == "nlg":
            return "frobenius"
        return "nuclear"

    @property
    def lambdas(self) -> dict[str, float]:
        """The unscheduled weights, keyed by term name."""
        return self.schedule.base

    @property
    def schedule(self) -> LambdaSchedule:
        """The λ schedule these settings describe (:mod:`balora_plugins.schedule`), read afresh from the fields."""
        return LambdaSchedule.from_settings(self)

    @property
    def adaptive_consistency_bounds(self) -> tuple[float, float]:
        """(λ1_min, λ1_max) of the adaptive schedule: the fields, or 0.1·λ1 and λ1 where unset (the authors')."""
        return consistency_bounds(
            self.lambda_consistency, self.lambda_consistency_min, self.lambda_consistency_max
        )

    def adaptive_lambda_consistency(self, confidence: float) -> float:
        """λ1 for the reference's confidence c in [0, 1]: :meth:`LambdaSchedule.adaptive_consistency`."""
        return self.schedule.adaptive_consistency(confidence)

    def lambdas_at(
        self, progress: float, step: int | None = None, total_steps: int | None = None
    ) -> dict[str, float]:
        """The three weights at ``progress`` = global_step / max_steps in [0, 1], or at ``step`` of
        ``total_steps`` with ``schedule_whole_steps``: :meth:`LambdaSchedule.at` (docs/method.md §3.1 schedules)."""
        return self.schedule.at(progress, step=step, total_steps=total_steps)

    def check_num_classes(self, num_classes: int) -> bool:
        """Warn when k >= ``num_classes`` for the NLU SVD term; return False when the term is then skipped.

        With the nuclear norm the share Σ_{i≤k}σ_i/Σσ is identically 1 (no gradient: skipped, logged with λ = 0).
        With the Frobenius norm the term runs, but over every singular value: −Σσ/‖Z‖_F, which is lowest when the
        singular values are equal, so it flattens the spectrum instead of concentrating it.
        """
        if self.task != "nlu" or not self.lambda_svd > 0 or self.svd_top_k < num_classes:
            return True
        nuclear = self.resolved_svd_norm == "nuclear"
        effect = (
            "the NLU SVD share Σ_{i≤k}σ_i/Σσ is identically 1, so lambda_svd has no effect and the term is skipped"
            if nuclear
            else "with svd_norm='frobenius' the term still runs, over every singular value: −Σσ/‖Z‖_F is lowest "
            "when all singular values are equal, so it flattens the spectrum instead of concentrating it"
        )
        warnings.warn(
            f"BALoRAConfig.svd_top_k={self.svd_top_k} >= number of classes ({num_classes}): {effect}. "
            f"Set svd_top_k < {num_classes} or lambda_svd=0.",
            UserWarning,
            stacklevel=2,
        )
        return not nuclear

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> BALoRAConfig:
        """A named paper setting (see :data:`PRESETS`), with any field overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"Unknown BA-LoRA preset {name!r}; choose one of {sorted(PRESETS)}.")
        values = dict(PRESETS[name])
        _check_keys(overrides, f"BALoRAConfig.from_preset({name!r}, ...)")
        values.update(overrides)
        return cls(**values)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BALoRAConfig:
        """A config from a dict of fields, optionally with ``preset``: the keys overlay that preset, or without
        one the preset matching the dict's ``task`` and ``formulation`` (default ``iclr2026-nlg``)."""
        data = dict(data)
        preset = data.pop("preset", None)
        _check_keys(data, "BALoRAConfig.from_dict")
        if preset is not None:
            return cls.from_preset(preset, **data)
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> BALoRAConfig:
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            with open(text, encoding="utf-8") as f:
                text = f.read()
        return cls.from_dict(json.loads(text))

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write ``balora_config.json`` into ``directory`` (created if needed); returns the path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> BALoRAConfig:
        return cls.from_json(os.path.join(directory, CONFIG_NAME))

    @classmethod
    def coerce(cls, value: BALoRAConfig | str | dict | None, **defaults: Any) -> BALoRAConfig:
        """Accept a config, a preset name, a dict, or None (the default ``iclr2026-nlg`` preset).

        A dict without ``preset`` overlays the preset matching its ``task`` and ``formulation`` (by default
        ``iclr2026-nlg``, schedules included), exactly like ``BALoRAConfig(**dict)``.
        """
        if isinstance(value, BALoRAConfig):
            return value
        if value is None:
            return cls.from_preset("iclr2026-nlg", **defaults)
        if isinstance(value, str):
            return cls.from_preset(value)
        if isinstance(value, dict):
            return cls.from_dict(value)
        raise ValueError(
            f"balora_config={value!r} (a {type(value).__name__}) is not a BALoRAConfig, preset name or dict; "
            f"pass e.g. BALoRAConfig.from_preset('iclr2026-nlg')."
        )


PRESETS: dict[str, dict[str, Any]] = {
    # Current paper (ICLR 2026) and llm172/BA-LoRA training script, with its weight schedules.
    "iclr2026-nlg": dict(
        task="nlg",
        formulation="iclr2026",
        lambda_consistency=0.025,
        lambda_diversity=0.005,
        lambda_svd=0.005,
        svd_top_k=10,
        diversity_top_k=20,
        temperature=2.0,
        svd_norm="frobenius",
        consistency_schedule="cosine",
        regularizer_schedule="warmup",
    ),
    "iclr2026-nlu": dict(
        task="nlu",
        formulation="iclr2026",
        lambda_consistency=0.15,
        lambda_diversity=0.03,
        lambda_svd=0.03,
        svd_top_k=5,
        temperature=2.0,
        svd_norm="nuclear",
    ),
    # Paper v1-v5 (cyp-jlu-ai/BA-LoRA, 2024).
    "v5-nlg": dict(
        task="nlg",
        formulation="v5",
        lambda_consistency=1e-4,
        lambda_diversity=3e-4,
        lambda_svd=1e-4,
        svd_top_k=3,
        diversity_top_k=0,
        temperature=1.0,
        svd_norm="nuclear",
    ),
    "v5-nlu": dict(
        task="nlu",
        formulation="v5",
        lambda_consistency=1e-4,
        lambda_diversity=3e-4,
        lambda_svd=1e-4,
        svd_top_k=3,
        temperature=1.0,
        svd_norm="nuclear",
    ),
}
"""Named settings; ``iclr2026-*`` are the defaults of the current paper (docs/method.md §3.1), ``v5-*`` the earlier
formulation (docs/method.md §3.2)."""
# iclr2026-nlu with the reference read through the current head (docs/method.md, Classifiers with a new head):
# not the paper's formula; an option for classifiers whose head is new.
PRESETS["iclr2026-nlu-current-head"] = {**PRESETS["iclr2026-nlu"], "reference_head": "current"}

PRESET_FIELDS = (
    "lambda_consistency",
    "lambda_diversity",
    "lambda_svd",
    "svd_top_k",
    "diversity_top_k",
    "temperature",
    "svd_norm",
    "consistency_schedule",
    "regularizer_schedule",
)
"""Fields whose default is the value of the preset matching ``task`` and ``formulation``
(:func:`default_preset`): ``BALoRAConfig(task="nlu")`` equals ``BALoRAConfig.from_preset("iclr2026-nlu")``."""
_PRESET_FALLBACK = {
    "diversity_top_k": 20,
    "consistency_schedule": "constant",
    "regularizer_schedule": "constant",
}


def _field_names() -> set[str]:
    return {f.name for f in fields(BALoRAConfig)}


def _check_keys(data: dict[str, Any], where: str) -> None:
    unknown = sorted(set(data) - _field_names())
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(_field_names())}.")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"BALoRAConfig.{name}={value!r} is not allowed; choose one of {list(allowed)}.")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"BALoRAConfig.{name}={value!r} must be a finite number.")
    return float(value)


def _integer(name: str, value: Any, *, minimum: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"BALoRAConfig.{name}={value!r} must be an integer; {fix}.")
    if value < minimum:
        raise ValueError(f"BALoRAConfig.{name}={value!r} must be >= {minimum}; {fix}.")
