"""Export a PiSSA-trained adapter as a plain LoRA adapter that serves on the untouched base model.

With the frozen base W_res = W − s·B₀A₀ and the trained adapter (B, A), the served weight is
W_res + s·BA = W + s·(BA − B₀A₀). The difference is a rank-2r LoRA: A' = [A; A₀], B' = [B, −B₀], with the
same scaling s (so α' = 2α for ``α/r`` scaling, α' = √2·α for rsLoRA). This is PEFT's
``path_initial_model_for_weight_conversion`` computed on state dicts, so it needs no base model in memory.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from ..config import CONFIG_NAME
from .distributed import load_adapter_state
from .reference import REF_ADAPTER, adapter_state

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
INITIAL_DIR = REF_ADAPTER  # PEFT saves the snapshot adapter in this sub-folder too


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


def find_initial_adapter(adapter_dir: str) -> str | None:
    """Where the initial (step-0) adapter of ``adapter_dir`` was saved, if anywhere."""
    cand = os.path.join(adapter_dir, INITIAL_DIR)
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

    ``initial_dir`` defaults to the initial adapter saved in its ``balora_ref/`` sub-folder.
    An adapter trained with ordinary LoRA init is copied unchanged (it already serves on the base model).
    Refuses to write into a non-empty ``out_dir`` unless ``overwrite``.
    """
    cfg, trained = _read_adapter(adapter_dir)
    require_empty_dir(out_dir, overwrite)
    init = cfg.get("init_lora_weights", True)
    residual = isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda"))
    if residual:
        initial_dir = initial_dir or find_initial_adapter(adapter_dir)
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


def export_merged(adapter_dir: str, out: str, *, base: str | None = None, overwrite: bool = False) -> str:
    """Write the merged full model of ``adapter_dir`` on the untouched ``base`` into ``out``; returns ``out``.

    The adapter is first converted to plain LoRA (:func:`export_plain_lora`), so a PiSSA-trained adapter merges
    into the untouched base; ``base`` defaults to the adapter's ``base_model_name_or_path``.
    """
    import tempfile

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
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        plain = export_plain_lora(adapter_dir, os.path.join(tmp, "plain_lora"))
        if cfg.get("task_type") == "SEQ_CLS":
            num_labels = _num_labels(plain)
            model = AutoModelForSequenceClassification.from_pretrained(
                base, num_labels=num_labels, dtype=torch.float32
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, plain).merge_and_unload()
        merged.save_pretrained(out)
    try:
        AutoTokenizer.from_pretrained(base).save_pretrained(out)
    except (OSError, ValueError, TypeError):
        pass  # a base without a tokenizer: the merged weights are still complete
    return out


def _num_labels(adapter_dir: str) -> int:
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
    "require_empty_dir",
    "export_merged",
    "export_plain_lora",
    "convert_state_dicts",
    "plain_lora_config",
    "save_initial_adapter",
    "load_initial_adapter",
    "find_initial_adapter",
    "adapter_state",
    "INITIAL_DIR",
]
