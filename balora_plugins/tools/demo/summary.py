"""The demo's ``summary.md`` and its one-line cost: what was run and at what size, the table with intervals,
the paired comparisons and what was significant, the per-seed numbers, the plots, how to reproduce the run."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from balora_plugins import BALoRAConfig

from .settings import LABELS
from .tables import fmt, metrics_of


def _label(name: str) -> str:
    return LABELS.get(name, name)


def write_summary(path: str, results: dict[str, Any], table: str, verdict: Sequence[str]) -> None:
    """The demo's ``summary.md``: what was run and at what size, the table with intervals, the paired
    comparisons, what was and was not significant, the per-seed numbers, the plots, how to reproduce."""
    s = results["settings"]
    task = results["task"]
    data = results["data"]
    seeds = s["seed"]
    comps = results.get("comparisons") or []
    lines = [
        f"# BA-LoRA demo ({task.upper()}): {len(seeds)} seed{'s' if len(seeds) != 1 else ''}",
        "",
        f"- model: {results['model']}",
        *_data_lines(task, data, s),
        f"- methods: {', '.join(_label(m) for m in s['methods'])}; rank {s['rank']} (α = r), {s['steps']} steps of "
        f"batch {s['batch_size']}, lr {s['lr']:g} (cosine), device {s['device']}",
        f"- seeds: {', '.join(map(str, seeds))}. Per seed every method starts from the same weights and adapter "
        "initialisation (PiSSA: `pissa_niter_16`) and sees the same training sample in the same order; the seed "
        "draws the training sample from the pool, its order and the initialisation. The held-out set"
        + (" and the forgetting articles are" if task == "nlg" else " is")
        + f" the same for every seed (`--data-seed {s['data_seed']}`).",
        f"- BA-LoRA preset: `{s['preset']}`"
        + (
            " (ablations: the same with one weight set to 0)"
            if any("-no-" in m for m in s["methods"])
            else ""
        ),
        "- cost: " + cost_line(results),
        "",
        f"## Held-out results (mean over {len(seeds)} seeds ± half-width of the 95 % interval)"
        if len(seeds) > 1
        else "## Held-out results (one seed: no interval)",
        "",
        table,
        "",
        _columns_text(task, results),
        "",
        "## Paired comparisons",
        "",
        _interval_text(s["interval"], len(seeds)),
        "",
        *[f"- {line}" for line in verdict],
        "",
        _significance_text(comps, len(seeds)),
        "",
        "## Per-seed numbers",
        "",
        _per_seed_table(results),
        "",
        "## Plots",
        "",
    ]
    captions = {
        "metrics": "Held-out metrics: every seed (points), the mean and its 95 % interval (bars)",
        "differences": "Paired differences (same seed) of the compared methods: every seed (points), the mean "
        "and its 95 % interval (bars); a bar that crosses the zero line is not significant",
        "loss": "Training loss per step, one line per seed (for BA-LoRA: the task loss plus the weighted "
        "regularizers; dotted: its task loss alone, comparable with the baselines)",
        "regularizers": "BA-LoRA terms per step (unweighted) and the weighted total, one line per seed",
        "spectrum": f"Singular values of the held-out logits, base vs tuned (seed {seeds[0]})",
    }
    for name, file in results.get("plots", {}).items():
        lines += [f"{captions.get(name, name)}:", "", f"![{name}]({file})", ""]
    samples = results.get("samples") or {}
    if any(samples.values()):
        lines += [f"## Sample answers (first held-out problem, seed {seeds[0]})", ""]
        for name, smp in samples.items():
            if smp:
                out = smp[0]["output"].strip().replace("\n", " ")
                lines.append(
                    f"- {_label(name)} (score {smp[0]['score']:g}, expected {smp[0]['answer']}): {out[:300]}"
                )
        lines.append("")
    lines += [
        "## Reproduce",
        "",
        "```",
        "balora demo" + _cli_args(s),
        "balora report "
        + os.path.basename(os.path.abspath(s["out"]))
        + "   # re-render the plots from the logs",
        "```",
        "",
    ]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def _data_lines(task: str, data: dict[str, Any], s: dict[str, Any]) -> list[str]:
    if task == "nlg":
        lines = [
            f"- task data: {data['dataset']}, {data['train']} training problems per seed (drawn from a pool of "
            f"{data['train_pool']}), {data['held_out']} held-out problems (chat-formatted prompt + solution <= "
            f"{s['max_length']} tokens)"
        ]
        if data.get("forget_articles"):
            lines.append(
                f"- forgetting data: {data['forget_articles']} {data['forget']} articles, first {s['forget_length']} "
                f"tokens each ({data['forget_tokens']} predicted tokens): text the task never shows"
            )
        return lines
    noise = (
        f"; {s['label_noise']:.0%} of each seed's training labels flipped to another class (held-out labels clean)"
        if s.get("label_noise")
        else ""
    )
    return [
        f"- data: {data['dataset']}, {data['train']} training articles per seed (stratified, from a pool of "
        f"{data['train_pool']}), {data['held_out']} held-out articles, {len(data['classes'])} classes{noise}"
    ]


def _columns_text(task: str, results: dict[str, Any]) -> str:
    ratio = _ratio_text(results.get("balora_config") or {})
    if task == "nlg":
        return (
            "Columns: *answer NLL* = mean negative log-likelihood of the held-out reference solutions' tokens under "
            "teacher forcing; *answer KL* = mean KL(p_base ‖ p_tuned) at the same positions — the drift on the task's "
            "own text, close to what BA-LoRA's consistency term minimises (on the training problems), so it is no "
            "independent evidence; *news NLL* / *news KL* = the same on BBC News articles that have nothing to do "
            "with the task — **forgetting**: how much of what the base model predicted well the tuning lost "
            "(the base row is the value before tuning), measured where no term of the objective looks; *exact "
            "match* (with `--generate`) = share of greedy answers the dataset's scorer gives 1.0; *top-k σ share* = "
            f"{ratio} of the answer positions' logits (what the SVD term raises), exact via the output head's Gram "
            "factor; *s/step* / *CPU-s/step* = mean wall / CPU seconds (this process, all threads) per optimizer step. "
            "Lower NLL and lower KL are better."
        )
    return (
        "Columns: *accuracy* and *macro-F1* of the argmax class on clean held-out labels; *eval NLL* = mean "
        "cross-entropy; *noisy-label fit* (with `--label-noise`) = share of the flipped training articles the tuned "
        "model assigns to their wrong, flipped label — memorised noise, lower is better (a model that ignores "
        "the training labels scores about 1/classes, one that memorised them 1); *top-k σ share* = "
        f"{ratio} of the (N, classes) held-out logits. The base row uses the new, untrained classification head "
        "(chance level)."
    )


def _interval_text(kind: str, n: int) -> str:
    if n < 2:
        return "One seed: no interval can be formed and no method is named better. Run `--seeds 3` or more."
    how = (
        f"Student-t interval of the mean paired difference over seeds (t quantile with {n - 1} degree{'s' if n > 2 else ''} of freedom)"
        if kind == "t"
        else "paired bootstrap percentile interval (10,000 resamples of the seeds)"
    )
    return (
        f"Each line is the mean over {n} seeds of the per-seed difference (method − baseline, same seed) with its "
        f"95 % {how}. A method is named better only when the interval excludes 0; otherwise the difference is "
        "*not significant at this size*. The interval covers the variation between seeds (training sample, order, "
        "initialisation), not the sampling error of the fixed held-out set. BA-LoRA − PiSSA isolates the "
        "regularizers (same initialisation); BA-LoRA − LoRA also contains PiSSA's initialisation, and a method that "
        "has learned less has also drifted less — read the forgetting columns beside the task's."
    )


def _significance_text(comps: Sequence[dict[str, Any]], n: int) -> str:
    if n < 2 or not comps:
        return ""
    hits = [c for c in comps if c.get("significant")]
    text = f"{len(hits)} of {len(comps)} comparisons exclude 0 at 95 %"
    text += (
        f" (no correction for multiple comparisons: about {0.05 * len(comps):.1f} of {len(comps)} would by chance "
        "if no method differed). "
        if comps
        else ". "
    )
    if not hits:
        text += (
            "At this size the demo shows no significant difference between the methods; it shows how large "
        )
        text += (
            "the differences are and how much they vary between seeds. Scale up (more `--seeds`, `--steps`, "
        )
        text += "`--train-size`, `--eval-size`, or a GPU) to resolve smaller effects."
    else:
        text += (
            "Read them for what they are: effects on this model, data and training budget, not on large models "
            "trained for hours."
        )
    return text


def _per_seed_table(results: dict[str, Any]) -> str:
    metrics = [m for m in metrics_of(results["task"], results["runs"]) if m.interval]
    header = ["seed", "method", *[m.label for m in metrics], "train CPU-s"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---:", "---"] + ["---:"] * (len(header) - 2)) + "|",
    ]
    for r in results["runs"]:
        m = r["metrics"]
        cells = [str(r["seed"]), _label(r["method"])]
        cells += [fmt(m[x.key], x.decimals) for x in metrics]
        cells.append(f"{m.get('train_cpu_seconds', float('nan')):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_line(results: dict[str, Any]) -> str:
    """Wall time, CPU time of the process, threads and load average of a demo run (one line)."""
    t = results["timings"]
    m = results.get("machine") or {}
    text = f"wall time {t['total']:.0f} s"
    if m:
        text += (
            f", {m['cpu_seconds']:.0f} CPU-seconds (this process, all threads; {m['torch_threads']} torch "
            f"thread{'s' if m['torch_threads'] != 1 else ''} on {m['cpu_count']} CPUs"
        )
        if m.get("load_average_start") is not None:
            text += f", load average {m['load_average_start']:g} at start / {m['load_average_end']:g} at end"
        text += ")"
    return text


def _ratio_text(cfg: dict[str, Any]) -> str:
    try:
        config = BALoRAConfig.from_dict(cfg)
    except (TypeError, ValueError):
        return "Σ_{i≤k} σ_i / norm(Z)"
    norm = "‖Z‖_F" if config.resolved_svd_norm == "frobenius" else "Σ_j σ_j"
    return f"Σ_{{i≤{config.svd_top_k}}} σ_i / {norm}"


def _cli_args(s: dict[str, Any]) -> str:
    parts = []
    if s["task"] != "nlg":
        parts.append(f"--task {s['task']}")
    if s.get("tiny"):
        parts.append("--tiny")
    if s.get("model"):
        parts.append(f"--model {s['model']}")
    parts.append(f"--seed {','.join(map(str, s['seed']))}")
    keys = ["data_seed", "train_size", "eval_size", "steps", "batch_size", "rank", "lr", "max_length"]
    keys += ["forget_size", "forget_length"] if s["task"] == "nlg" else ["label_noise"]
    for key in keys:
        value = s[key]
        parts.append(
            f"--{key.replace('_', '-')} {value:g}"
            if isinstance(value, float)
            else f"--{key.replace('_', '-')} {value}"
        )
    if s["task"] == "nlg":
        parts.append("--generate" if s.get("generate") else "--no-generate")
    parts += [
        f"--interval {s['interval']}",
        f"--preset {s['preset']}",
        f"--methods {','.join(s['methods'])}",
        f"--device {s['device']}",
    ]
    return " " + " ".join(parts)
