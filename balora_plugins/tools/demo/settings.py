"""The demo's settings, defined once: :class:`DemoSettings` (its field metadata generates the ``balora demo``
options), the methods it can compare, the defaults per task and device, and their validation.

Fields left at ``None`` take the default of the task on the device (:data:`DEFAULTS`); :func:`resolve_settings`
fills them and refuses bad values with a message naming the option, the value and what is allowed.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field, fields
from typing import Any

from balora_plugins.tools.report import PLOTS as RUN_PLOTS

PISSA_INIT = "pissa_niter_16"  # the paper's NLG recipe (docs/method.md §1)
RESULTS = "results.json"
SUMMARY = "summary.md"
BASE_DIR = "base_model"
# the report directory's plots (name: file): the demo's own (tools/demo/plots.py), then the run plots
PLOTS = {"metrics": "metrics.png", "differences": "differences.png", **RUN_PLOTS}
TERMS = ("consistency", "diversity", "svd")


class DemoUsageError(ValueError):
    """A demo option is invalid (the CLI turns it into a usage error, exit code 2)."""


# ---------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """One arm of the comparison: the adapter initialisation and which BA-LoRA terms are on."""

    name: str
    label: str
    init: str  # "lora" (Kaiming A, zero B) or "pissa"
    terms: tuple[str, ...] = ()  # the BA-LoRA terms switched on; () = the host trainer alone
    settings: tuple[tuple[str, Any], ...] = ()  # BALoRAConfig fields this method sets over the preset
    tasks: tuple[str, ...] = ("nlg", "nlu")  # the demo tasks it applies to
    reference: str = "auto"  # BALoRAConfig.reference; "precomputed": `balora reference` runs first, per seed

    @property
    def regularized(self) -> bool:
        return bool(self.terms)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lora", "LoRA", "lora"),
        Method("pissa", "PiSSA", "pissa"),
        Method("balora", "BA-LoRA", "pissa", TERMS),
        *(
            Method(f"balora-no-{t}", f"BA-LoRA w/o {t}", "pissa", tuple(x for x in TERMS if x != t))
            for t in TERMS
        ),
        # the reference read through the current classifier head (BALoRAConfig.reference_head, docs/method.md)
        Method(
            "balora-current-head",
            "BA-LoRA current head",
            "pissa",
            TERMS,
            settings=(("reference_head", "current"),),
            tasks=("nlu",),
        ),
        Method(
            "balora-precomputed",
            "BA-LoRA (precomp. ref.)",
            "pissa",
            TERMS,
            tasks=("nlg",),
            reference="precomputed",
        ),
    )
}
LABELS = {"base": "base", **{m.name: m.label for m in METHODS.values()}}


# ---------------------------------------------------------------------------------------------- option parsers
def positive_int(text: str | int) -> int:
    """An integer >= 1 (argparse ``type``)."""
    value = _int(text)
    if value < 1:
        raise ValueError(f"{value} must be >= 1")
    return value


def non_negative_int(text: str | int) -> int:
    """An integer >= 0 (argparse ``type``)."""
    value = _int(text)
    if value < 0:
        raise ValueError(f"{value} must be >= 0")
    return value


def positive_float(text: str | float) -> float:
    """A number > 0 (argparse ``type``)."""
    value = _float(text)
    if not value > 0:
        raise ValueError(f"{value} must be > 0")
    return value


def fraction(text: str | float) -> float:
    """A number in [0, 1) (argparse ``type``)."""
    value = _float(text)
    if not 0 <= value < 1:
        raise ValueError(f"{value} must lie in [0, 1)")
    return value


def seed_list(text: str | list[int]) -> list[int]:
    """Comma-separated non-negative integers, e.g. ``0,1,2`` (argparse ``type``)."""
    items = text if isinstance(text, list) else [t for t in str(text).split(",") if t.strip()]
    seeds = [non_negative_int(t) for t in items]
    if not seeds:
        raise ValueError("no seed given; write e.g. 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{','.join(map(str, seeds))} names a seed twice")
    return seeds


def _int(text: str | int) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ValueError(f"{text!r} is not an integer") from None


def _float(text: str | float) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{text!r} is not a number") from None


def option(help: str, default: Any = None, **meta: Any) -> Any:
    """A settings field whose ``metadata`` becomes a CLI option: ``help``, and optionally ``parse`` (a converter
    raising ValueError), ``choices`` and ``metavar``."""
    return field(default=default, metadata={"help": help, **meta})


# ---------------------------------------------------------------------------------------------- the settings
@dataclass
class DemoSettings:
    """Every setting of one demo run; ``None`` = the default of the task on the device (see DEFAULTS)."""

    task: str = option(
        "nlg: SmolLM2-135M-Instruct on reasoning-gym gsm_symbolic (default); nlu: all-MiniLM-L6-v2 "
        "classifying BBC News",
        "nlg",
        choices=("nlg", "nlu"),
    )
    model: str | None = option(
        "local folder, .gguf file or cached hub id instead of the bundled model", metavar="PATH_OR_ID"
    )
    tiny: bool = option("a tiny random model and few steps (seconds; for tests/CI)", False)
    methods: list[str] | None = option(
        "comma-separated methods: lora, pissa, balora, the ablations balora-no-consistency, "
        "balora-no-diversity, balora-no-svd (BA-LoRA with one term switched off), for nlu "
        "balora-current-head (the reference read through the current classifier head), and for nlg "
        "balora-precomputed (BA-LoRA from a stored top-k reference, docs/precomputed_reference.md)",
        parse=lambda text: [m.strip().lower() for m in str(text).split(",") if m.strip()],
        metavar="LIST",
    )
    seeds: int | None = option(
        "number of seeds: each method trains once per seed 0..N-1",
        parse=positive_int,
        metavar="N",
    )
    seed: list[int] | None = option(
        "explicit seeds instead of --seeds, e.g. 0,1,2 (each seed: training sample, its order, adapter init)",
        parse=seed_list,
        metavar="LIST",
    )
    data_seed: int = option(
        "seed of the generated problem pool / article split and the held-out set (the same for every seed)",
        0,
        parse=non_negative_int,
    )
    train_size: int | None = option("training examples per seed", parse=positive_int)
    eval_size: int | None = option("held-out examples", parse=positive_int)
    steps: int | None = option("optimizer steps per method and seed", parse=positive_int)
    batch_size: int | None = option("examples per step", parse=positive_int)
    rank: int | None = option("LoRA rank r (alpha = r)", parse=positive_int)
    lr: float | None = option("learning rate (cosine, 10 %% warm-up)", parse=positive_float)
    max_length: int | None = option("max tokens per example", parse=positive_int)
    generate: bool | None = option(
        "NLG: greedy answers scored for exact match (on CPU it about doubles each evaluation, and exact match "
        "stays ~0 at CPU sizes)"
    )
    max_new_tokens: int | None = option("NLG: cap on the greedy answer length", parse=positive_int)
    forget_size: int | None = option(
        "NLG: BBC News articles on which forgetting (NLL, KL from the base) is measured; 0 = off",
        parse=non_negative_int,
    )
    forget_length: int | None = option("NLG: tokens per forgetting article", parse=positive_int)
    label_noise: float = option(
        "NLU: fraction of training labels flipped to another class (held-out labels stay clean)",
        0.0,
        parse=fraction,
    )
    interval: str = option(
        "t: Student-t interval over seeds (default); bootstrap: paired bootstrap (use with 10+ seeds)",
        "t",
        choices=("t", "bootstrap"),
    )
    preset: str | None = option("BA-LoRA preset (default iclr2026-nlg / iclr2026-nlu)", metavar="NAME")
    out: str = option("report directory", "balora_demo", metavar="DIR")
    overwrite: bool = option("replace the report in a non-empty --out", False)
    device: str = option("auto (CUDA when available), cpu or cuda", "auto")

    @property
    def method_objects(self) -> list[Method]:
        return [METHODS[m] for m in self.methods or ()]


def cli_fields() -> list:
    """The :class:`DemoSettings` fields, each a ``balora demo`` option (in CLI order)."""
    return list(fields(DemoSettings))


def default_text(name: str) -> str | None:
    """The per-task, per-device defaults of option ``name`` for its help text, e.g. ``CPU: nlg 32, nlu 240``."""
    parts = []
    for regime, title in (("cpu", "CPU"), ("cuda", "GPU")):
        values = {
            task: _show(DEFAULTS[(task, regime)][name])
            for task in ("nlg", "nlu")
            if name in DEFAULTS[(task, regime)]
        }
        if len(set(values.values())) == 1 and len(values) == 2:
            parts.append(f"{title}: {values['nlg']}")
        elif values:
            parts.append(f"{title}: " + ", ".join(f"{task} {v}" for task, v in values.items()))
    return "; ".join(parts) or None


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------- defaults
# CPU: sized so that the default NLG run (3 seeds × LoRA / PiSSA / BA-LoRA) finishes within 15 minutes on
# 2 idle cores; the evidence is in docs/cli.md. A GPU gets the larger runs; --tiny is what the tests run.
DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("nlg", "cpu"): dict(
        train_size=32,
        eval_size=16,
        steps=8,
        batch_size=4,
        rank=8,
        lr=4e-4,
        max_length=160,
        generate=False,
        max_new_tokens=160,
        forget_size=16,
        forget_length=128,
        methods="lora,pissa,balora",
        seeds=3,
    ),
    ("nlg", "cuda"): dict(
        train_size=2000,
        eval_size=200,
        steps=500,
        batch_size=16,
        rank=16,
        lr=1e-4,
        max_length=384,
        generate=True,
        max_new_tokens=256,
        forget_size=128,
        forget_length=256,
        methods="lora,pissa,balora",
        seeds=3,
    ),
    ("nlg", "tiny"): dict(
        train_size=16,
        eval_size=4,
        steps=3,
        batch_size=4,
        rank=4,
        lr=1e-3,
        max_length=384,
        generate=True,
        max_new_tokens=8,
        forget_size=4,
        forget_length=32,
        methods="lora,pissa,balora",
        seeds=2,
    ),
    ("nlu", "cpu"): dict(
        train_size=240,
        eval_size=250,
        steps=60,
        batch_size=8,
        rank=8,
        lr=2e-3,
        max_length=128,
        methods="lora,pissa,balora",
        seeds=3,
    ),
    ("nlu", "cuda"): dict(
        train_size=1600,
        eval_size=625,
        steps=600,
        batch_size=32,
        rank=8,
        lr=5e-4,
        max_length=256,
        methods="lora,pissa,balora",
        seeds=5,
    ),
    ("nlu", "tiny"): dict(
        train_size=20,
        eval_size=10,
        steps=3,
        batch_size=4,
        rank=4,
        lr=1e-3,
        max_length=64,
        methods="lora,balora",
        seeds=2,
    ),
}
NLG_ONLY = ("generate", "max_new_tokens", "forget_size", "forget_length")
PRESET_DEFAULT = {"nlg": "iclr2026-nlg", "nlu": "iclr2026-nlu"}


def resolve_settings(
    task: str = "nlg", device: str = "auto", tiny: bool = False, **given: Any
) -> DemoSettings:
    """Fill unset options (None) with the defaults of ``task`` on ``device``; raise DemoUsageError on bad values.

    Values may be given parsed or as the command line's strings (each field's ``parse`` converts them).
    """
    if task not in ("nlg", "nlu"):
        raise DemoUsageError(f"--task {task!r} is not allowed; choose 'nlg' or 'nlu'.")
    unknown = sorted(set(given) - {f.name for f in fields(DemoSettings)})
    if unknown:
        raise DemoUsageError(f"unknown demo setting(s) {', '.join(unknown)}.")
    if tiny and given.get("model"):
        raise DemoUsageError("--tiny builds a tiny random model; it cannot be combined with --model.")
    device = _resolve_device(device)
    regime = "tiny" if tiny else ("cuda" if device.startswith("cuda") else "cpu")
    given = {k: v for k, v in given.items() if v is not None}
    if task == "nlu":
        misplaced = [k for k in NLG_ONLY if k in given]
        if misplaced:
            raise DemoUsageError(f"--{misplaced[0].replace('_', '-')} applies to --task nlg only.")
    elif given.get("label_noise"):
        raise DemoUsageError("--label-noise applies to --task nlu only (NLG trains on reference solutions).")
    values: dict[str, Any] = {**DEFAULTS[(task, regime)], "preset": PRESET_DEFAULT[task], **given}
    by_name = {f.name: f for f in fields(DemoSettings)}
    for key, value in list(values.items()):
        parse = by_name[key].metadata.get("parse") if key in by_name else None
        if parse is not None and isinstance(value, str | int | float) and not isinstance(value, bool):
            try:
                values[key] = parse(value)
            except ValueError as e:
                raise DemoUsageError(f"--{key.replace('_', '-')}: {e}.") from None
        choices = by_name[key].metadata.get("choices") if key in by_name else None
        if choices and values[key] not in choices:
            raise DemoUsageError(
                f"--{key.replace('_', '-')} {values[key]!r} is not allowed; choose one of {', '.join(choices)}."
            )
    values["methods"] = _methods(values["methods"], task)
    given_count = values["seeds"] if "seeds" in given else None
    values["seed"], values["seeds"] = _seeds(values.get("seed"), given_count, values["seeds"])
    if not values["lr"] > 0:
        raise DemoUsageError(f"--lr {values['lr']} must be > 0.")
    _check_preset(values["preset"], task)
    return DemoSettings(
        task=task, tiny=tiny, device=device, **{k: v for k, v in values.items() if k in by_name}
    )


def _methods(methods: list[str] | str, task: str) -> list[str]:
    if isinstance(methods, str):
        methods = [m.strip().lower() for m in methods.split(",") if m.strip()]
    allowed = [name for name, m in METHODS.items() if task in m.tasks]
    bad = [m for m in methods if m not in allowed]
    if bad or not methods:
        raise DemoUsageError(
            f"--methods {','.join(methods) or '(empty)'}: allowed are {', '.join(allowed)} (for --task {task}; "
            "comma-separated, e.g. lora,pissa,balora)."
        )
    if len(set(methods)) != len(methods):
        raise DemoUsageError(f"--methods {','.join(methods)} names a method twice.")
    return list(methods)


def _seeds(seed: list[int] | None, count: int | None, default_count: int) -> tuple[list[int], int]:
    """(seed list, number of seeds) from ``--seed LIST`` or ``--seeds N`` (they must agree when both are given)."""
    if seed is not None:
        if count is not None and count != len(seed):
            raise DemoUsageError(
                f"--seeds {count} and --seed {','.join(map(str, seed))} disagree; give one of them "
                f"(--seed lists the seeds, --seeds N runs 0..N-1)."
            )
        return list(seed), len(seed)
    return list(range(default_count)), default_count


def _check_preset(preset: str, task: str) -> None:
    from balora_plugins import PRESETS

    if preset not in PRESETS:
        raise DemoUsageError(f"--preset {preset!r} is unknown; choose one of {', '.join(sorted(PRESETS))}.")
    if PRESETS[preset]["task"] != task:
        raise DemoUsageError(
            f"--preset {preset!r} is for task {PRESETS[preset]['task']!r} but --task is {task!r}; use "
            f"--preset {PRESET_DEFAULT[task]} (or another {task} preset)."
        )


def _resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise DemoUsageError(f"--device {device!r} is not allowed; choose auto, cpu or cuda.")
    if device == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise DemoUsageError("--device cuda but torch sees no CUDA device; use --device cpu (or auto).")
    return "cpu"


# ---------------------------------------------------------------------------------------------- the report folder
def check_out_dir(out: str, overwrite: bool) -> None:
    """Refuse a non-empty report directory unless ``overwrite`` (checked before any training)."""
    from balora_plugins.core import require_empty_dir

    try:
        require_empty_dir(out, overwrite, what="--out")
    except FileExistsError as e:
        raise DemoUsageError(str(e)) from None


def own_entries(out: str) -> list[str]:
    """What an earlier demo wrote into ``out`` (its files, plots, seed folders), to be replaced by a new run."""
    names = [RESULTS, SUMMARY, BASE_DIR, "balora_report", *METHODS, *PLOTS.values()]
    if os.path.isdir(out):
        names += [n for n in os.listdir(out) if n.startswith("seed") and n[4:].isdigit()]
    return names


def prepare_out(out: str) -> None:
    """Create ``out`` and remove what an earlier demo wrote there (called once the inputs are known to be valid)."""
    os.makedirs(out, exist_ok=True)
    for name in own_entries(out):
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
