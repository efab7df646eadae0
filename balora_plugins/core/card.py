"""The model card of a BA-LoRA adapter: what it is, its settings, how to load it and what to cite.

Every host writes a card of its own into the output folder's ``README.md``: PEFT on each ``save_pretrained``
(``library_name: peft``, its tags), TRL's ``create_model_card`` (its template, filled from ``_tag_names``, ``_name``
and ``_paper``), transformers' and axolotl's ``TrainingSummary`` on ``push_to_hub``. :func:`update_model_card` adds
BA-LoRA's tags and one section, between two HTML comments, to whatever card is there (or to a new one), so it can
run after any of them, any number of times, with the same result.
"""

from __future__ import annotations

import os
from typing import Any

from ..config import PRESETS, BALoRAConfig
from .export import HELD_RESUME_DIR, RESUME_DIR, adapter_num_labels, read_adapter_config

CITATION_KEY = "chang2026balora"
CITATION = f"""@inproceedings{{{CITATION_KEY},
  title     = {{{{BA-LoRA}}: Bias-Alleviating Low-Rank Adaptation to Mitigate Catastrophic Inheritance in Large Language Models}},
  author    = {{Chang, Yupeng and Chang, Yi and Wu, Yuan}},
  booktitle = {{International Conference on Learning Representations (ICLR)}},
  year      = {{2026}},
  note      = {{arXiv:2408.04556}},
  url       = {{https://arxiv.org/abs/2408.04556}}
}}"""
# In the form of TRL's trainer attribute ``_paper`` (trl/trainer/base_trainer.py): the card links the paper page.
PAPER = {
    "title": "BA-LoRA: Bias-Alleviating Low-Rank Adaptation to Mitigate Catastrophic Inheritance in Large Language "
    "Models",
    "id": "2408.04556",
    "citation": CITATION,
}
TAGS = ("ba-lora", "peft")
BEGIN = "<!-- balora-plugins:begin -->"
END = "<!-- balora-plugins:end -->"
CARD_NAME = "README.md"
BASE_TAG_PREFIX = (
    "base_model:"  # PEFT's "base_model:adapter:<id>"; the Hub's other base_model:* relations alike
)
# Files a training engine writes into a checkpoint beside the adapter: DeepSpeed's global_step*/ (and its latest,
# zero_to_fp32.py), FSDP's pytorch_model_fsdp*; they hold the trainable (residual-base) form.
ENGINE_STATE_PREFIXES = ("global_step", "pytorch_model_fsdp", "zero_to_fp32")
# Fields that change how the terms are computed, how the output is labelled and uploaded, or how a run treats its
# output_dir, not what is optimised: left out of the card's preset comparison.
_EXECUTION_FIELDS = ("chunk_size", "on_nonfinite", "served_base", "hub_push_resume", "overwrite_output_dir")


def nearest_preset(config: BALoRAConfig) -> tuple[str, dict[str, Any]]:
    """The preset ``config`` differs least from, and the fields (name → value in ``config``) where it differs."""
    mine = _effective(config)
    best: tuple[str, dict[str, Any]] | None = None
    for name in PRESETS:
        ref = _effective(BALoRAConfig.from_preset(name))
        diff = {k: v for k, v in mine.items() if ref[k] != v and k not in _EXECUTION_FIELDS}
        if best is None or len(diff) < len(best[1]):
            best = (name, diff)
    assert best is not None
    return best


def _effective(config: BALoRAConfig) -> dict[str, Any]:
    """The config's fields with ``svd_norm='auto'`` resolved (the value the terms use)."""
    return {**config.to_dict(), "svd_norm": config.resolved_svd_norm}


def _settings_rows(config: BALoRAConfig) -> list[str]:
    """The card's table rows for the preset and the three terms (weights, schedules, what each term measures)."""
    preset, changed = nearest_preset(config)
    preset_text = f"`{preset}`" + (
        ", changed: " + ", ".join(f"`{k}={v!r}`" for k, v in changed.items()) if changed else ""
    )
    cosine, warmup = "", ""
    if config.consistency_schedule == "cosine":
        cosine = f", cosine decay to {config.cosine_final_ratio}·λ1"
    if config.regularizer_schedule == "warmup":
        start, ramp = f"{config.warmup_start:.0%}", f"{config.warmup_ramp:.0%}"
        warmup = f", 0 for the first {start} of training, then ramped up over {ramp}"
    if config.consistency_kind == "kl":
        consistency = f"KL to the pre-trained model, T = {config.consistency_temperature:g}"
    else:
        consistency = "MSE to the pre-trained model's logits"
    if config.diversity_kind == "entropy":
        top = f"top-{config.entropy_top_k}" if config.entropy_top_k else "all"
        diversity = f"entropy of the {top} logits"
    else:
        diversity = "logit decorrelation"
    return [
        f"| preset | {preset_text} |",
        f"| λ1 consistency ({consistency}) | {config.lambda_consistency}{cosine} |",
        f"| λ2 diversity ({diversity}) | {config.lambda_diversity}{warmup} |",
        f"| λ3 SVD (top-{config.svd_top_k} share of the output spectrum, {config.resolved_svd_norm} norm) | "
        f"{config.lambda_svd}{warmup} |",
    ]


def served_rank(adapter_config: dict) -> int:
    """The largest LoRA rank of an adapter (its ``r`` and ``rank_pattern``): what a server must allow."""
    return max(
        [int(adapter_config.get("r") or 0), *map(int, (adapter_config.get("rank_pattern") or {}).values())]
    )


def card_section(
    config: BALoRAConfig,
    directory: str,
    *,
    repo_id: str | None = None,
    with_citation: bool = True,
    residual: str | None = None,
    engine_files: tuple[str, ...] = (),
    base_quantization: str | None = None,
) -> str:
    """The BA-LoRA section of the card of the adapter saved in ``directory`` (Markdown, between the markers).

    ``engine_files``: names of the training engine's own files the host writes into ``directory`` after the card
    (a checkpoint's ``global_step*/``), listed with those already there as not servable.

    ``residual``: the residual base training loaded (a pre-initialised PiSSA pair), which the card must name as the
    model this adapter does *not* serve on when the adapter's config names no base.

    ``base_quantization``: how the frozen base was quantised during training (e.g. ``"bitsandbytes 4-bit nf4"``),
    None for a full-precision base; the card then says what serving on the full-precision base means.
    """
    from .. import __version__

    root = read_adapter_config(directory) or {}
    resume = read_adapter_config(os.path.join(directory, RESUME_DIR))
    held = resume is None and read_adapter_config(os.path.join(directory, HELD_RESUME_DIR)) is not None
    resume = resume or read_adapter_config(os.path.join(directory, HELD_RESUME_DIR))
    trained = resume or root
    unknown = not root.get("base_model_name_or_path")
    base = root.get("base_model_name_or_path") or ("ORIGINAL_BASE_MODEL" if residual else "BASE_MODEL")
    where = repo_id or "path/to/this/folder"
    init = trained.get("init_lora_weights", True)
    rank = f"rank {trained.get('r', '?')}"
    lines = [
        BEGIN,
        "## BA-LoRA",
        "",
        "Trained with [BA-LoRA](https://arxiv.org/abs/2408.04556) (LoRA plus three regularizers: consistency, "
        f"diversity, SVD) by balora-plugins {__version__}.",
        "",
        "| setting | value |",
        "|---|---|",
        *_settings_rows(config),
        f"| task / formulation | {config.task} / {config.formulation} |",
        f"| LoRA initialisation | `{init}`, {rank} |",
        "",
        "Every setting: `balora_config.json`.",
        "",
    ]
    if resume is not None:
        lines += [
            f"This folder is a **plain LoRA adapter** (rank {root.get('r', '?')}) for the **untouched** base model "
            f"`{base}`: the update the `{init}`-initialised training made, W_res + s·BA − W = s·(BA − B₀A₀), "
            "written as one LoRA of twice the rank. It needs nothing but PEFT:",
        ]
    else:
        lines += [f"This folder is a LoRA adapter for the base model `{base}`; it needs nothing but PEFT:"]
    if residual and unknown:
        lines += [
            "",
            f"**Which base:** training loaded the residual model `{residual}` (a pre-initialised PiSSA pair, "
            "W_res = W − s·B₀A₀); this adapter serves on the *original* pre-trained model W that residual was "
            f"computed from, **not** on `{residual}` (loaded there it gives a different model). The trainer was not "
            "told which model that is: set `served_base` (`balora_served_base`) to record it here.",
        ]
    elif residual:
        lines += [
            "",
            f"**Which base:** `{base}`, the original pre-trained model — not the residual model `{residual}` "
            "training loaded (a pre-initialised PiSSA pair, W_res = W − s·B₀A₀).",
        ]
    if root.get("task_type") == "SEQ_CLS":
        try:
            labels = f", num_labels={adapter_num_labels(directory)}"
        except (OSError, ValueError):
            labels = ""
        auto, extra = "AutoModelForSequenceClassification", labels
    else:
        auto, extra = "AutoModelForCausalLM", ""
    lines += [
        "",
        "```python",
        "from peft import PeftModel",
        f"from transformers import {auto}",
        "",
        f'base = {auto}.from_pretrained("{base}"{extra})',
        f'model = PeftModel.from_pretrained(base, "{where}")  # or .merge_and_unload() for a plain model',
        "```",
        "",
        "`axolotl merge-lora`, vLLM (`--lora-modules`), lm-eval (`--model_args ...,peft=...`) and "
        "`balora export --merge` take this folder as it is.",
        f"Serving needs LoRA rank {served_rank(root)}: vLLM `--enable-lora --max-lora-rank N` with N ≥ "
        f"{served_rank(root)}.",
    ]
    globs = tuple(n.rstrip("*") for n in engine_files if n.endswith("*"))
    found = [
        n
        for n in _listdir(directory)
        if n.startswith(ENGINE_STATE_PREFIXES) and not (globs and n.startswith(globs))
    ]
    engine = sorted({*engine_files, *found})
    if engine:
        lines += [
            "",
            f"{', '.join(f'`{n}`' for n in engine)}: the training engine's own resume state (the trainable form "
            "on the residual base, for `resume_from_checkpoint`); not an adapter, never for serving.",
        ]
    if resume is not None:
        lines += [
            "",
            f"`{RESUME_DIR}/` holds the adapter as trained ({rank}, correct only on the residual base W_res it "
            "was trained against) with its step-0 copy `balora_ref/`: for continued training "
            "(`trainer.train(resume_from_checkpoint=...)` on this folder), never for serving."
            + (
                " It stays in the training output and is not uploaded (`hub_push_resume=True` or `hub_strategy` "
                "`checkpoint` / `all_checkpoints` upload it)."
                if held
                else ""
            ),
        ]
    if base_quantization is not None:
        lines += ["", *_quantised_base_note(base_quantization, converted=resume is not None)]
    if with_citation:
        lines += ["", "### Citation", "", "```bibtex", CITATION, "```"]
    lines.append(END)
    return "\n".join(lines)


def _quantised_base_note(quantization: str, *, converted: bool) -> list[str]:
    """What a 4-bit training base means for serving (docs/qlora.md)."""
    if converted:
        return [
            f"**Trained on a 4-bit residual** (QPiSSA, {quantization}): during training the frozen base was "
            "Q(W_res), the 4-bit rounding of W_res = W − s·B₀A₀, so the trained model was Q(W_res) + s·BA. On the "
            "untouched full-precision base this adapter gives W + s·(BA − B₀A₀) = W_res + s·BA: the trained model "
            "without the residual's 4-bit rounding error Q(W_res) − W_res (an error the trained model carried "
            "unchanged from step 0). Serve it on the full-precision base or merge it (`balora export --merge`); "
            "loading the base in 4 bits under it adds the rounding error of W, Q(W) − W, instead.",
        ]
    return [
        f"**Trained on a 4-bit base** (QLoRA, {quantization}): the frozen base during training was Q(W). The "
        "same 4-bit loading reproduces the trained model exactly; on the full-precision base the adapter acts on W "
        "instead of Q(W) (the difference is the base's 4-bit rounding error).",
    ]


def update_model_card(
    directory: str,
    config: BALoRAConfig,
    *,
    tags: tuple[str, ...] | list[str] = (),
    repo_id: str | None = None,
    residual: str | None = None,
    engine_files: tuple[str, ...] = (),
    base_quantization: str | None = None,
) -> str:
    """Add BA-LoRA's tags (:data:`TAGS` and ``tags``) and section to ``directory/README.md``; returns its path.

    Replaces the section an earlier call wrote; places it before the card's first ``## `` heading (or at the end);
    cites the paper unless the host's card already does (TRL's, through ``_paper``). The front matter gets PEFT's
    metadata back whatever card the host wrote last (TRL's ``create_model_card`` on ``push_to_hub`` rewrites it as
    ``library_name: transformers`` without ``base_model``): ``library_name: peft``, ``base_model`` and the tags
    ``lora`` and ``base_model:adapter:<base>`` naming the model the adapter serves on (:func:`card_metadata`).
    ``base_quantization``: see :func:`card_section`.
    """
    from huggingface_hub import ModelCard

    path = os.path.join(directory, CARD_NAME)
    card = ModelCard.load(path) if os.path.isfile(path) else ModelCard("---\nlibrary_name: peft\n---\n")
    text = _without_section(card.text)
    section = card_section(
        config,
        directory,
        repo_id=repo_id,
        with_citation=CITATION_KEY not in text,
        residual=residual,
        engine_files=engine_files,
        base_quantization=base_quantization,
    )
    lines = text.split("\n")
    at = next((i for i, line in enumerate(lines) if line.startswith("## ")), None)
    if at is None:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    else:
        text = "\n".join(lines[:at]).rstrip("\n") + "\n\n" + section + "\n\n" + "\n".join(lines[at:])
    card.text = text.lstrip("\n")
    base, peft_tags = card_metadata(directory)
    kept = {t for t in (card.data.tags or []) if not t.startswith(BASE_TAG_PREFIX)}
    card.data.tags = sorted({*kept, *TAGS, *tags, *peft_tags})
    card.data.library_name = "peft"
    card.data.base_model = base
    card.save(path)
    return path


def card_metadata(directory: str) -> tuple[str | None, list[str]]:
    """The card's ``base_model`` and PEFT's tags for the adapter saved in ``directory``.

    ``base_model`` is the adapter's ``base_model_name_or_path`` when it is a hub id; a local directory is left out
    (the Hub accepts model ids only, TRL's rule) and so is an empty one (a pre-initialised pair whose original model
    was not given: never the residual). Tags: ``lora`` and ``base_model:adapter:<base>``, as PEFT writes them.
    """
    root = read_adapter_config(directory) or {}
    base = root.get("base_model_name_or_path") or None
    if base is not None and os.path.isdir(base):
        base = None
    tags = ["lora"] if str(root.get("peft_type", "LORA")).upper() == "LORA" else []
    if base is not None:
        tags.append(f"{BASE_TAG_PREFIX}adapter:{base}")
    return base, tags


def _listdir(directory: str) -> list[str]:
    return os.listdir(directory) if os.path.isdir(directory) else []


def _without_section(text: str) -> str:
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return text
    return text[:start].rstrip("\n") + "\n\n" + text[end + len(END) :].lstrip("\n")


__all__ = [
    "CITATION",
    "PAPER",
    "TAGS",
    "card_metadata",
    "card_section",
    "nearest_preset",
    "served_rank",
    "update_model_card",
]
