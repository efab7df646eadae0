"""Plots and summaries from training logs: `balora report RUN_DIR`, and the report of `balora demo`.

A *run* is a ``trainer_state.json`` (``log_history``) as written by the transformers ``Trainer`` and everything
built on it (TRL, axolotl): in the run directory itself, else in its latest ``checkpoint-*``; a directory
whose sub-directories are runs (a sweep, or the demo's ``lora/ pissa/ balora/``) is read as several runs.
The demo's ``results.json`` adds the held-out metrics and the logits' singular-value spectra.

Plots (PNG, matplotlib's Agg canvas, no display needed):

* ``loss.png`` — training loss per step (and ``eval_loss`` where logged) for every run;
* ``regularizers.png`` — each BA-LoRA term (``balora/<term>``, unweighted) and the weighted total
  ``balora/loss`` per step, for the runs that logged them;
* ``spectrum.png`` — singular values of the output logits before (base) and after tuning (demo runs only).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

PLOTS = {"loss": "loss.png", "regularizers": "regularizers.png", "spectrum": "spectrum.png"}
STATE = "trainer_state.json"
REPORT = "report.md"
_NOT_TERMS = ("lambda_", "skipped_")
_NOT_TERM_KEYS = ("rows", "loss")
LABELS = {"base": "base", "lora": "LoRA", "pissa": "PiSSA", "balora": "BA-LoRA"}
SPECTRUM_TOP = 64


class ReportError(ValueError):
    """RUN_DIR holds no logs this module can read."""


# ---------------------------------------------------------------------------------------------- finding logs
def _state_in(directory: str) -> str | None:
    """trainer_state.json of ``directory`` or of its latest ``checkpoint-N``."""
    path = os.path.join(directory, STATE)
    if os.path.isfile(path):
        return path
    ckpts = []
    for name in os.listdir(directory):
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        if m and os.path.isfile(os.path.join(directory, name, STATE)):
            ckpts.append((int(m.group(1)), name))
    return os.path.join(directory, max(ckpts)[1], STATE) if ckpts else None


def find_runs(run_dir: str) -> dict[str, str]:
    """``{run name: trainer_state.json path}`` for ``run_dir`` (one run, or one per sub-directory)."""
    if not os.path.isdir(run_dir):
        raise ReportError(f"RUN_DIR {run_dir!r} is not a directory.")
    own = _state_in(run_dir)
    if own is not None:
        return {os.path.basename(os.path.abspath(run_dir)): own}
    runs = {}
    for name in sorted(os.listdir(run_dir)):
        sub = os.path.join(run_dir, name)
        if os.path.isdir(sub) and not name.startswith("."):
            found = _state_in(sub)
            if found is not None:
                runs[name] = found
    if not runs:
        raise ReportError(
            f"found no {STATE} in {run_dir!r}, its checkpoint-*/ folders or its sub-directories. Pass the "
            "output_dir of a TRL / transformers / axolotl run (save at least one checkpoint, or call "
            "trainer.state.save_to_json) or a `balora demo` report directory."
        )
    return runs


def load_history(path: str) -> list[dict[str, Any]]:
    """The ``log_history`` list of a trainer_state.json."""
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    history = state.get("log_history")
    if not isinstance(history, list):
        raise ReportError(f"{path!r} has no log_history list; is it a transformers trainer_state.json?")
    return history


def series(history: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over the log entries that carry it (finite numbers only)."""
    steps, values = [], []
    for entry in history:
        v = entry.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and "step" in entry:
            steps.append(float(entry["step"]))
            values.append(float(v))
    return steps, values


def term_names(histories: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The BA-LoRA terms logged as ``balora/<term>`` (built-in first, then plugin terms), without eval keys."""
    found = set()
    for history in histories.values():
        for entry in history:
            for k in entry:
                if not k.startswith("balora/"):
                    continue
                name = k[len("balora/") :]
                if name.endswith("_weighted") or name.startswith(_NOT_TERMS) or name in _NOT_TERM_KEYS:
                    continue
                found.add(name)
    builtin = [t for t in ("consistency", "diversity", "svd") if t in found]
    return builtin + sorted(found - set(builtin))


# ---------------------------------------------------------------------------------------------- plots
def _figure(ncols: int, nrows: int = 1, width: float = 4.6, height: float = 3.4):
    from matplotlib.figure import Figure  # an Agg canvas: no display, no pyplot global state

    fig = Figure(figsize=(width * ncols, height * nrows), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _label(name: str) -> str:
    return LABELS.get(name, name)


def plot_losses(histories: dict[str, list[dict[str, Any]]], path: str, title: str = "Training loss") -> bool:
    """Training loss (and eval loss where logged) per step for each run; False when no run logged a loss."""
    fig, (ax,) = _figure(1, width=6.4, height=4.0)
    drawn = False
    for i, (name, history) in enumerate(histories.items()):
        colour = f"C{i}"
        steps, loss = series(history, "loss")
        if steps:
            ax.plot(
                steps,
                loss,
                color=colour,
                lw=1.4,
                marker="." if len(steps) <= 60 else None,
                label=_label(name),
            )
            drawn = True
        steps, loss = series(history, "eval_loss")
        if steps:
            ax.plot(steps, loss, color=colour, ls="--", marker="o", label=f"{_label(name)} (eval)")
            drawn = True
    if not drawn:
        return False
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)
    return True


def plot_regularizers(histories: dict[str, list[dict[str, Any]]], path: str) -> bool:
    """One panel per BA-LoRA term (unweighted value) plus the weighted total; False when none was logged."""
    terms = term_names(histories)
    if not terms:
        return False
    panels = [(f"balora/{t}", f"L_{t} (unweighted)") for t in terms] + [
        ("balora/loss", "weighted total Σ λ·L")
    ]
    ncols = min(len(panels), 2)
    fig, axes = _figure(ncols, nrows=math.ceil(len(panels) / ncols), height=3.0)
    for ax, (key, title) in zip(axes, panels):
        for i, (name, history) in enumerate(histories.items()):
            steps, values = series(history, key)
            if steps:
                ax.plot(
                    steps,
                    values,
                    color=f"C{i}",
                    lw=1.4,
                    marker="." if len(steps) <= 60 else None,
                    label=_label(name),
                )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle("BA-LoRA regularizers per step (a term is logged once its weight is > 0)")
    fig.savefig(path)
    return True


def plot_spectra(
    spectra: dict[str, Sequence[float]], path: str, top: int = SPECTRUM_TOP, relative: bool = True
) -> bool:
    """Top singular values of the output logits per model: σ_i, σ_i / ‖Z‖_F and, when ``relative`` and a ``base``
    spectrum is given, the change of each σ_i against it (left out for a base with an untrained head)."""
    from matplotlib.ticker import MaxNLocator

    spectra = {k: [float(x) for x in v] for k, v in spectra.items() if v}
    if not spectra:
        return False
    base = spectra.get("base") if relative else None
    fig, axes = _figure(3 if base else 2, width=4.4)
    for i, (name, sv) in enumerate(spectra.items()):
        head = sv[:top]
        idx = list(range(1, len(head) + 1))
        fro = math.sqrt(sum(x * x for x in sv)) or 1.0
        style = dict(
            color="k" if name == "base" else f"C{i}",
            ls="--" if name == "base" else "-",
            lw=1.4,
            marker="." if len(head) <= 16 else None,
            label=_label(name),
        )
        axes[0].plot(idx, head, **style)
        axes[1].plot(idx, [x / fro for x in head], **style)
        if base:
            n = min(len(head), len(base))
            axes[2].plot(idx[:n], [100 * (x / b - 1) if b > 0 else 0.0 for x, b in zip(head, base)], **style)
    titles = ["σ_i of the logits", "σ_i / ‖Z‖_F", "change of σ_i against base (%)"]
    for ax, title in zip(axes, titles):
        ax.set_yscale("log" if title.startswith("σ") else "linear")
        ax.set_xlabel("i")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    fig.suptitle("Singular-value spectrum of the held-out output logits, before (base) and after tuning")
    fig.savefig(path)
    return True


# ---------------------------------------------------------------------------------------------- rendering
def render_run_dir(run_dir: str, out_dir: str, results: dict[str, Any] | None = None) -> dict[str, str]:
    """Write the plots for ``run_dir`` into ``out_dir``; returns ``{plot name: path}`` of those written.

    ``results`` (or ``run_dir/results.json`` when present) is a demo's results: its ``runs`` name the logs and its
    ``spectra`` give the spectrum plot.
    """
    if results is None and os.path.isfile(os.path.join(run_dir, "results.json")):
        with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as f:
            results = json.load(f)
    if results is not None and results.get("runs"):
        runs = {k: os.path.join(run_dir, v) for k, v in results["runs"].items()}
    else:
        runs = find_runs(run_dir)
    histories = {name: load_history(path) for name, path in runs.items()}
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    title = "Training loss" if results is None else f"Training loss ({results.get('task', '').upper()} demo)"
    targets = {k: os.path.join(out_dir, v) for k, v in PLOTS.items()}
    if plot_losses(histories, targets["loss"], title=title):
        written["loss"] = targets["loss"]
    if plot_regularizers(histories, targets["regularizers"]):
        written["regularizers"] = targets["regularizers"]
    relative = results is not None and results.get("task") != "nlu"  # an NLU base has an untrained head
    if results is not None and plot_spectra(
        results.get("spectra") or {}, targets["spectrum"], relative=relative
    ):
        written["spectrum"] = targets["spectrum"]
    return written


def run_summary(histories: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown table: per run, steps, first / last / lowest training loss, last eval loss, last BA-LoRA terms."""
    terms = term_names(histories)
    header = ["run", "steps", "first loss", "last loss", "min loss", "last eval_loss"] + [
        f"last {t}" for t in terms
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]

    def fmt(values: list[float]) -> str:
        return f"{values[-1]:.4g}" if values else "–"

    for name, history in histories.items():
        steps, loss = series(history, "loss")
        _, ev = series(history, "eval_loss")
        row = [
            name,
            str(int(max(steps))) if steps else "0",
            f"{loss[0]:.4g}" if loss else "–",
            fmt(loss),
            f"{min(loss):.4g}" if loss else "–",
            fmt(ev),
        ]
        row += [fmt(series(history, f"balora/{t}")[1]) for t in terms]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def report(run_dir: str, out_dir: str | None = None) -> tuple[str, dict[str, str]]:
    """`balora report`: plots and a ``report.md`` for any run directory; returns (report path, plots)."""
    out_dir = out_dir or os.path.join(run_dir, "balora_report")
    plots = render_run_dir(run_dir, out_dir)
    results_path = os.path.join(run_dir, "results.json")
    if os.path.isfile(results_path):
        with open(results_path, encoding="utf-8") as f:
            runs = {k: os.path.join(run_dir, v) for k, v in json.load(f).get("runs", {}).items()}
    else:
        runs = find_runs(run_dir)
    histories = {name: load_history(path) for name, path in runs.items()}
    lines = [f"# Training report: {os.path.abspath(run_dir)}", "", run_summary(histories), ""]
    for name, plot_path in plots.items():
        lines += [f"![{name}]({os.path.relpath(plot_path, out_dir)})", ""]
    for name, path in runs.items():
        lines.append(f"- {name}: `{os.path.abspath(path)}`")
    path = os.path.join(out_dir, REPORT)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path, plots


def write_summary(path: str, results: dict[str, Any], table: str, verdict: Sequence[str]) -> None:
    """The demo's ``summary.md``: settings, the comparison table, what each column means, the plots."""
    s = results["settings"]
    task = results["task"]
    data = results["data"]
    t = results["timings"]
    lines = [
        f"# BA-LoRA demo ({task.upper()})",
        "",
        f"- model: {results['model']}",
        f"- data: {data['dataset']}, {data['train']} training / {data['held_out']} held-out examples"
        + (f" (chat-formatted prompt + solution <= {s['max_length']} tokens)" if task == "nlg" else ""),
        f"- methods: {', '.join(_label(m) for m in s['methods'])}; rank {s['rank']} (α = r), {s['steps']} steps of "
        f"batch {s['batch_size']}, lr {s['lr']:g} (cosine), seed {s['seed']}, device {s['device']}",
        f"- BA-LoRA preset: `{s['preset']}` (PiSSA init `pissa_niter_16`; the same init, data order and seed for "
        "every method)",
        f"- wall time: {t['total']:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in t.items() if k != "total")
        + ")"
        + _machine(results.get("machine")),
        "",
        "## Held-out results",
        "",
        table,
        "",
        *[f"- {line}" for line in verdict],
        "",
    ]
    ratio = _ratio_text(results.get("balora_config") or {})
    if task == "nlg":
        lines += [
            "Columns: *exact match* = share of greedy answers the dataset's own scorer (`score_answer`) gives 1.0 "
            "(the final answer is the number after the last `####`, else the last number); *answer NLL* = mean "
            "negative log-likelihood of the reference solution's tokens under teacher forcing (*perplexity* = its "
            f"exp); *KL from base* = mean over the same positions of KL(p_base ‖ p_tuned); *top-k σ ratio* = {ratio} "
            "of those positions' logits Z (the quantity the SVD term raises), exact via the output head's Gram factor.",
            "",
            "A few CPU minutes do not move exact match of a 135M model far from zero; answer NLL and the KL drift "
            "are the signals that move. Scale up with `--train-size`, `--steps`, `--eval-size` (or a GPU).",
        ]
    else:
        lines += [
            f"Columns: *accuracy* and *macro-F1* of the argmax class; *eval NLL* = mean cross-entropy; *top-k σ ratio* "
            f"= {ratio} of the (N, classes) held-out logits Z. The base row uses the new, untrained classification "
            "head (chance level), so no KL drift from it is reported.",
        ]
    lines += ["", "## Plots", ""]
    captions = {
        "loss": "Training loss per step (for BA-LoRA: the task loss plus the weighted regularizers)",
        "regularizers": "BA-LoRA terms per step (unweighted) and the weighted total",
        "spectrum": "Singular values of the held-out logits, base vs tuned",
    }
    for name, file in results.get("plots", {}).items():
        lines += [f"{captions.get(name, name)}:", "", f"![{name}]({file})", ""]
    if results["models"].get("base", {}).get("samples"):
        lines += ["## Sample answers (first held-out problems)", ""]
        for name, ev in results["models"].items():
            for smp in ev.get("samples", [])[:1]:
                out = smp["output"].strip().replace("\n", " ")
                lines.append(
                    f"- {_label(name)} (score {smp['score']:g}, expected {smp['answer']}): {out[:300]}"
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


def _ratio_text(cfg: dict[str, Any]) -> str:
    from balora_plugins import BALoRAConfig

    try:
        config = BALoRAConfig.from_dict(cfg)
    except (TypeError, ValueError):
        return "Σ_{i≤k} σ_i / norm(Z)"
    norm = "‖Z‖_F" if config.resolved_svd_norm == "frobenius" else "Σ_j σ_j"
    return f"Σ_{{i≤{config.svd_top_k}}} σ_i / {norm}"


def _machine(m: dict[str, Any] | None) -> str:
    if not m:
        return ""
    text = (
        f"; {m['cpu_seconds']:.0f} CPU-seconds, {m['torch_threads']} torch threads on {m['cpu_count']} CPUs"
    )
    if m.get("load_average_start") is not None:
        text += f", load average {m['load_average_start']:g} at start / {m['load_average_end']:g} at end"
    return text


def _cli_args(s: dict[str, Any]) -> str:
    parts = []
    if s["task"] != "nlg":
        parts.append(f"--task {s['task']}")
    if s.get("tiny"):
        parts.append("--tiny")
    if s.get("model"):
        parts.append(f"--model {s['model']}")
    for key in ("train_size", "eval_size", "steps", "batch_size", "rank", "lr", "max_length", "seed"):
        parts.append(
            f"--{key.replace('_', '-')} {s[key]:g}"
            if isinstance(s[key], float)
            else f"--{key.replace('_', '-')} {s[key]}"
        )
    parts += [f"--preset {s['preset']}", f"--methods {','.join(s['methods'])}", f"--device {s['device']}"]
    return " " + " ".join(parts)
