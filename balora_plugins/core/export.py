"""Export a PiSSA-trained adapter as a plain LoRA adapter that serves on the untouched base model.

With the frozen base W_res = W − s·B₀A₀ and the trained adapter (B, A), the served weight is
W_res + s·BA = W + s·(BA − B₀A₀). The difference is a rank-2r LoRA: A' = [A; A₀], B' = [B, −B₀], with the
same scaling s (so α' = 2α for ``α/r`` scaling, α' = √2·α for rsLoRA; a DoRA magnitude carries over unchanged,
since W + s·B'A' is the same matrix as W_res + s·BA). This is PEFT's ``path_initial_model_for_weight_conversion``
computed on state dicts, so it needs no base model in memory.

The final output of a BA-LoRA run (README "What you get after training") holds that plain adapter at its root,
where every tool looks (PEFT, ``axolotl merge-lora``, vLLM, lm-eval, the Hub), and the residual-base form with its
step-0 adapter in :data:`RESUME_DIR` for continued training (:func:`write_servable_layout`); so does every
``checkpoint-N/`` since 0.3 (before, checkpoints held the residual-base form at their root). Every reader here
accepts both layouts, and 0.1.0's (residual-base form at the root, ``plain_lora/`` beside it).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable

import torch
from safetensors.torch import load_file, save_file

from ..config import CONFIG_NAME
from .distributed import load_adapter_state
from .reference import REF_ADAPTER, adapter_state, init_is_approximate, init_rewrites_base

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
INITIAL_DIR = REF_ADAPTER  # PEFT saves the snapshot adapter in this sub-folder too
# In a final output: the residual-base adapter, its INITIAL_DIR and balora_config.json, for continued training.
RESUME_DIR = "balora_resume"
# Where push_to_hub keeps balora_resume/ while it uploads without it ("_*": what the Trainer's upload skips).
HELD_RESUME_DIR = f"_{RESUME_DIR}.hold"
_ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "adapter_model.bin")
MERGE_DTYPES = ("auto", "float32", "bfloat16", "float16")
APPROXIMATE_REASON = (
    "LoftQ replaces the base weight W by its quantised Q(W), and Q(W) + s·B0A0 only approximates W, so no LoRA "
    "adapter reproduces the trained model on the untouched base; serve the adapter as saved, on the quantised base "
    "it was trained on (LoftQ's own recipe)"
)


def _read_adapter(directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{directory!r} holds no {ADAPTER_CONFIG}; pass a PEFT adapter directory.")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    weights = os.path.join(directory, ADAPTER_WEIGHTS)
    if os.path.isfile(weights):
        return cfg, load_file(weights)
    legacy = os.path.join(directory, "adapter_model.bin")
    if os.path.isfile(legacy):
        return cfg, torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory!r} holds no {ADAPTER_WEIGHTS}.")


def read_adapter_config(directory: str) -> dict | None:
    """The ``adapter_config.json`` of ``directory`` as a dict, or None when there is none."""
    return _read_config(directory)


def _read_config(directory: str) -> dict | None:
    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _own_initial_adapter(adapter_dir: str) -> str | None:
    """``adapter_dir/balora_ref`` when the step-0 adapter was saved right beside the adapter, else None."""
    cand = os.path.join(adapter_dir, INITIAL_DIR)
    return cand if os.path.isfile(os.path.join(cand, ADAPTER_CONFIG)) else None


def needs_conversion(adapter_config: dict, adapter_dir: str | None = None) -> bool:
    """True when the adapter saved in ``adapter_dir`` (its ``adapter_config.json`` as a dict) sits on a rewritten
    base and needs :func:`export_plain_lora` before it serves on the untouched base.

    Read from what training left on disk — the on-disk half of :func:`~balora_plugins.core.reference.adapter_start`:
    the config names an init that rewrites the base (``init_rewrites_base``: PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ),
    or the step-0 adapter was recorded right beside it (``balora_ref/``, written exactly when the base was
    rewritten — also for a pre-initialised PiSSA pair whose config says ``init_lora_weights=True``). The converted
    root of a final output has neither, so converting is idempotent.
    """
    init = adapter_config.get("init_lora_weights", True)
    return init_rewrites_base(init) or (
        adapter_dir is not None and _own_initial_adapter(adapter_dir) is not None
    )


def resume_adapter_dir(path: str) -> str:
    """The folder holding the trainable (residual-base) form of the adapter saved in ``path``.

    ``path/balora_resume`` for the final output of a BA-LoRA run (its root holds the converted plain LoRA);
    ``path`` itself for a checkpoint, a plain-init run, or an output written by balora-plugins 0.1.0.
    """
    sub = os.path.join(path, RESUME_DIR)
    if not os.path.isfile(os.path.join(sub, ADAPTER_CONFIG)):
        return path
    root = _read_config(path)
    return path if root is not None and needs_conversion(root, path) else sub


def find_initial_adapter(adapter_dir: str) -> str | None:
    """Where the initial (step-0) adapter of ``adapter_dir`` was saved, if anywhere.

    ``adapter_dir/balora_ref`` for a checkpoint (or a 0.1.0 output), ``adapter_dir/balora_resume/balora_ref`` for
    the final output of a BA-LoRA run (see :func:`resume_adapter_dir`).
    """
    cand = os.path.join(resume_adapter_dir(adapter_dir), INITIAL_DIR)
    return cand if os.path.isfile(os.path.join(cand, ADAPTER_CONFIG)) else None


def convert_state_dicts(
    trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rank-2r plain-LoRA weights from trained and initial PiSSA weights (PEFT's saved key layout)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in trained.items():
        if "lora_A" in key:
            out[key] = torch.cat([value, initial[key].to(value.dtype)], dim=0)
        elif "lora_B" in key:
            out[key] = torch.cat([value, -initial[key].to(value.dtype)], dim=1)
        elif "lora_embedding_A" in key:
            out[key] = torch.cat([value, initial[key].to(value.dtype)], dim=0)
        elif "lora_embedding_B" in key:
            out[key] = torch.cat([value, -initial[key].to(value.dtype)], dim=1)
        else:
            out[key] = value
    return out


def plain_lora_config(cfg: dict) -> dict:
    cfg = dict(cfg)
    cfg["init_lora_weights"] = True
    cfg["r"] = 2 * cfg["r"]
    cfg["lora_alpha"] = cfg["lora_alpha"] * (math.sqrt(2) if cfg.get("use_rslora") else 2)
    for pat in ("rank_pattern", "alpha_pattern"):
        if cfg.get(pat):
            factor = 2 if pat == "rank_pattern" or not cfg.get("use_rslora") else math.sqrt(2)
            cfg[pat] = {k: v * factor for k, v in cfg[pat].items()}
    return cfg


def export_plain_lora(
    adapter_dir: str, out_dir: str, *, initial_dir: str | None = None, overwrite: bool = False
) -> str:
    """Write a plain LoRA adapter for ``adapter_dir`` into ``out_dir`` and return ``out_dir``.

    The adapter is converted (rank 2r, docs/method.md §1) when it sits on a rewritten base
    (:func:`needs_conversion`): its config names an init that rewrites the base, or a step-0 adapter was recorded
    beside it in ``balora_ref/`` — BA-LoRA saves it exactly when the base was rewritten, also for an adapter loaded
    pre-initialised whose config says ``init_lora_weights=True`` — or ``initial_dir`` is given. Otherwise — ordinary
    LoRA init, or the root of a BA-LoRA run's final output, already converted — the adapter already serves on the
    base and is copied unchanged. A LoftQ adapter is refused (:data:`APPROXIMATE_REASON`). Refuses to write into a
    non-empty ``out_dir`` unless ``overwrite``.
    """
    cfg, trained = _read_adapter(adapter_dir)
    init = cfg.get("init_lora_weights", True)
    if init_is_approximate(init):
        raise ValueError(
            f"{adapter_dir!r} was trained with init_lora_weights={init!r}: {APPROXIMATE_REASON}."
        )
    require_empty_dir(out_dir, overwrite)
    if initial_dir is not None or needs_conversion(cfg, adapter_dir):
        initial_dir = initial_dir or _own_initial_adapter(adapter_dir)
        if initial_dir is None:
            raise FileNotFoundError(
                f"{adapter_dir!r} was trained with init_lora_weights={init!r} but its initial adapter is missing; "
                f"BA-LoRA saves it in the sub-folder {INITIAL_DIR}/. Pass initial_dir=... (the step-0 adapter)."
            )
        _, initial = _read_adapter(initial_dir)
        missing = sorted(k for k in trained if "lora_" in k and k not in initial)
        if missing:
            raise ValueError(
                f"initial adapter {initial_dir!r} lacks {len(missing)} LoRA tensors, e.g. {missing[0]!r}"
            )
        trained, cfg = convert_state_dicts(trained, initial), plain_lora_config(cfg)
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in trained.items()}, os.path.join(out_dir, ADAPTER_WEIGHTS))
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    for extra in (CONFIG_NAME, "README.md"):
        src = os.path.join(adapter_dir, extra)
        if os.path.isfile(src):
            shutil.copy(src, os.path.join(out_dir, extra))
    return out_dir


def write_servable_layout(output_dir: str) -> str | None:
    """Give the final output ``output_dir`` the layout users serve; returns the :data:`RESUME_DIR` path, or None.

    A PiSSA-trained adapter is only correct on the residual base it was trained against, so the adapter the host has
    just saved at the root in that form (with its step-0 adapter in ``balora_ref/``) moves — copied, then replaced —
    into ``balora_resume/`` together with ``balora_ref/`` and ``balora_config.json``, and the root gets the plain
    rank-2r LoRA of the same model (:func:`export_plain_lora`): it loads with plain PEFT on the untouched base. This is
    PEFT's own convention (``save_pretrained(path, path_initial_model_for_weight_conversion=...)`` writes the
    converted adapter at ``path``).

    Pure file operations (call it on the main process only); idempotent: None, with nothing changed, when the root
    needs no conversion (ordinary LoRA init, no adapter, or converted by an earlier call). A ``balora_resume/`` left
    by an earlier save (it holds ``balora_config.json``) is replaced; any other non-empty one is refused. When the
    root lacks ``balora_ref/`` (a host save that wrote only the trained adapter) the one already in
    ``balora_resume/`` is used: the step-0 adapter never changes during a run.
    """
    cfg = _read_config(output_dir)
    if cfg is None or not needs_conversion(cfg, output_dir):
        return None
    if init_is_approximate(cfg.get("init_lora_weights")):
        return None  # LoftQ: no servable plain LoRA exists (APPROXIMATE_REASON); the root stays as trained
    resume = os.path.join(output_dir, RESUME_DIR)
    if os.path.isdir(resume) and os.listdir(resume) and not os.path.isfile(os.path.join(resume, CONFIG_NAME)):
        raise FileExistsError(
            f"{resume!r} is not empty and was not written by BA-LoRA; it is where the trained adapter's "
            "residual-base form goes. Move that folder away or save to another output directory."
        )
    initial = os.path.join(output_dir, INITIAL_DIR)
    if not os.path.isfile(os.path.join(initial, ADAPTER_CONFIG)):
        initial = os.path.join(resume, INITIAL_DIR)
        if not os.path.isfile(os.path.join(initial, ADAPTER_CONFIG)):
            raise FileNotFoundError(
                f"{output_dir!r} holds an adapter trained with init_lora_weights={cfg['init_lora_weights']!r} but no "
                f"{INITIAL_DIR}/ (its step-0 adapter), so it cannot be converted to plain LoRA. Save it through a "
                "BA-LoRA trainer (trainer.save_model), which writes both."
            )
    # Build the new balora_resume/ beside the old one, then swap: a failure leaves the root as the host saved it.
    # The "_" prefix keeps a leftover out of Trainer.push_to_hub's upload (it ignores "_*").
    staging = os.path.join(output_dir, f"_{RESUME_DIR}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(initial, os.path.join(staging, INITIAL_DIR))
    for name in (*_ADAPTER_FILES, CONFIG_NAME):
        src = os.path.join(output_dir, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(staging, name))
    shutil.rmtree(resume, ignore_errors=True)
    os.replace(staging, resume)
    export_plain_lora(resume, output_dir, overwrite=True)  # rewrites the root's adapter_config + weights
    shutil.rmtree(os.path.join(output_dir, INITIAL_DIR), ignore_errors=True)
    # a residual-form adapter_model.bin left at the root must not shadow the export
    legacy = os.path.join(output_dir, "adapter_model.bin")
    if os.path.isfile(legacy):
        os.remove(legacy)
    return resume


def name_base_model(directory: str, base: str | None) -> None:
    """Write ``base`` as the ``base_model_name_or_path`` of the adapter saved in ``directory`` (None: no base named).

    The root of a BA-LoRA output serves on the untouched pre-trained model; PEFT writes the name of the model that
    training loaded, which for a pre-initialised PiSSA pair is its residual base — not a model this adapter serves on.
    """
    cfg = _read_config(directory)
    if cfg is None or cfg.get("base_model_name_or_path") == base:
        return
    cfg["base_model_name_or_path"] = base
    with open(os.path.join(directory, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def save_initial_adapter(
    peft_model,
    directory: str,
    adapter_name: str = REF_ADAPTER,
    source: str = "default",
    state: dict[str, torch.Tensor] | None = None,
) -> str:
    """Save the frozen step-0 adapter (the reference snapshot) as a loadable PEFT adapter in ``directory``.

    Its config keeps the trained adapter's settings but says ``init_lora_weights=True`` and uses the key
    layout of ``source`` so :func:`convert_state_dicts` can pair the tensors. ``state``: its weights gathered
    beforehand when an engine shards them (:func:`~balora_plugins.core.distributed.full_adapter_state`).
    """
    from peft.utils import get_peft_model_state_dict

    os.makedirs(directory, exist_ok=True)
    if state is None:
        state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(directory, ADAPTER_WEIGHTS)
    )
    cfg = peft_model.peft_config[source].to_dict()
    cfg["init_lora_weights"] = True
    cfg["inference_mode"] = True
    for k, v in list(cfg.items()):
        if isinstance(v, set):
            cfg[k] = sorted(v)
    with open(os.path.join(directory, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True, default=str)
    return directory


def load_initial_adapter(peft_model, directory: str, adapter_name: str = REF_ADAPTER, wrapped=None) -> None:
    """Restore the reference snapshot from a saved initial adapter (used on resume); ``wrapped``: the engine's
    model when it may shard the adapter (then every rank must call this)."""
    from peft.utils import set_peft_model_state_dict

    _, state = _read_adapter(directory)
    if load_adapter_state(peft_model, state, adapter_name, wrapped=wrapped):
        return
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    set_peft_model_state_dict(peft_model, state, adapter_name=adapter_name)
    for n, p in peft_model.named_parameters():
        p.requires_grad_(n in trainable)


def export_merged(
    adapter_dir: str,
    out: str,
    *,
    base: str | None = None,
    overwrite: bool = False,
    dtype: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> str:
    """Write the merged full model of ``adapter_dir`` on the untouched ``base`` into ``out``; returns ``out``.

    The adapter is first converted to plain LoRA (:func:`export_plain_lora`; the root of a BA-LoRA run's final output
    already is), so a PiSSA-trained adapter merges into the untouched base; ``base`` defaults to the adapter's
    ``base_model_name_or_path``. ``dtype`` is the merged model's: ``"auto"`` (default) keeps the base checkpoint's
    own dtype (a bf16 base gives a bf16 model), or ``"float32"`` / ``"bfloat16"`` / ``"float16"``. PEFT loads the
    adapter in float32 (``autocast_adapter_dtype``), so the update s·B'A' is formed in float32 and rounded once,
    when it is added to the base weight. ``progress`` gets one line as each long step starts.
    """
    import tempfile

    say = progress or (lambda message: None)

    if dtype not in MERGE_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed; choose one of {list(MERGE_DTYPES)}.")
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG), encoding="utf-8") as f:
        cfg = json.load(f)
    base = base or cfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"merging needs the untouched base model: {adapter_dir!r} names none (base_model_name_or_path); "
            "pass base=... (`balora export --merge --base PATH`)."
        )
    require_empty_dir(out, overwrite)
    import torch
    from peft import PeftModel
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    load_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        say(f"converting {adapter_dir} to a plain LoRA adapter")
        plain = export_plain_lora(adapter_dir, os.path.join(tmp, "plain_lora"))
        say(f"loading the base model {base} (dtype {dtype})")  # the CLI blames --base for failures from here
        refuse_quantised_merge_base(AutoConfig.from_pretrained(base), base)
        if cfg.get("task_type") == "SEQ_CLS":
            num_labels = adapter_num_labels(plain)
            model = AutoModelForSequenceClassification.from_pretrained(
                base, num_labels=num_labels, dtype=load_dtype
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=load_dtype)
        say("merging the adapter into the base model")
        merged = PeftModel.from_pretrained(model, plain).merge_and_unload()
        say(f"writing the merged model to {out}")
        merged.save_pretrained(out)
    try:
        AutoTokenizer.from_pretrained(base).save_pretrained(out)
    except (OSError, ValueError, TypeError):
        pass  # a base without a tokenizer: the merged weights are still complete
    return out


def refuse_quantised_merge_base(base_config, base: str) -> None:
    """A merged model is a full-precision model: its base must be the full-precision checkpoint. A checkpoint saved
    quantised (its config carries a ``quantization_config``, e.g. a 4-bit model saved for serving) would merge
    s·B'A' into rounded weights, or not merge at all; the QPiSSA adapter at a run's root belongs on W itself."""
    qcfg = getattr(base_config, "quantization_config", None)
    if qcfg is not None:
        method = qcfg.get("quant_method") if isinstance(qcfg, dict) else getattr(qcfg, "quant_method", "?")
        raise ValueError(
            f"merging needs the full-precision base model, but {base!r} is a quantised checkpoint "
            f"(quantization_config: {method}). Pass the checkpoint the model was quantised from: "
            "`balora export --merge --base FULL_PRECISION_PATH` (the root of a 4-bit/QPiSSA run is a plain LoRA "
            "for that untouched base; docs/qlora.md)."
        )


def adapter_num_labels(adapter_dir: str) -> int:
    """The number of classes of the classifier head saved in ``adapter_dir`` (an NLU adapter's
    ``modules_to_save``)."""
    from safetensors import safe_open

    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
                return int(f.get_slice(key).get_shape()[0])
    raise ValueError(
        f"cannot tell the number of labels of the SEQ_CLS adapter {adapter_dir!r} (no classifier weight)."
    )


def require_empty_dir(path: str, overwrite: bool = False, *, what: str = "output directory") -> None:
    """Refuse to write into ``path`` when it is a file, or a non-empty directory and ``overwrite`` is False.

    The one check every writer of user-owned folders (exports, the demo's report, ``balora export``) runs before
    any work, so nothing the user owns is replaced silently.
    """
    if os.path.isfile(path):
        raise FileExistsError(f"{what} {path!r} is a file; pass a directory.")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(
            f"{what} {path!r} is not empty; choose another directory or pass overwrite=True (--overwrite)."
        )


__all__ = [
    "name_base_model",
    "read_adapter_config",
    "require_empty_dir",
    "write_servable_layout",
    "resume_adapter_dir",
    "needs_conversion",
    "RESUME_DIR",
    "HELD_RESUME_DIR",
    "export_merged",
    "export_plain_lora",
    "convert_state_dicts",
    "plain_lora_config",
    "save_initial_adapter",
    "load_initial_adapter",
    "find_initial_adapter",
    "adapter_state",
    "INITIAL_DIR",
    "APPROXIMATE_REASON",
]
