"""Plots and summaries from training logs: `balora report RUN_DIR`, and the report of `balora demo`.

A *run* is a ``trainer_state.json`` (``log_history``) as written by the transformers ``Trainer`` and everything
built on it (TRL, axolotl): in the run directory itself, else in its latest ``checkpoint-*``; a directory
whose sub-directories are runs (a sweep, or the demo's ``lora/ pissa/ balora/``) is read as several runs.
The demo's ``results.json`` adds the held-out metrics and the logits' singular-value spectra.

Plots (PNG, matplotlib's Agg canvas, no display needed):

* ``loss.png`` — training loss per step (and ``eval_loss`` where logged) for every run, and for BA-LoRA runs the
  task loss alone (``balora/task_loss``, dotted: the curve to lay over a LoRA/PiSSA baseline);
* ``regularizers.png`` — each BA-LoRA term (``balora/<term>``, unweighted, with its sign in the panel title) and
  the weighted total ``balora/loss`` per step, for the runs that logged them;
* ``spectrum.png`` — singular values of the output logits before (base) and after tuning (demo runs only).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

PLOTS = {
    "metrics": "metrics.png",
    "differences": "differences.png",
    "loss": "loss.png",
    "regularizers": "regularizers.png",
    "spectrum": "spectrum.png",
}
STATE = "trainer_state.json"
REPORT = "report.md"
_NOT_TERMS = ("lambda_", "skipped_")
_NOT_TERM_KEYS = ("rows", "loss", "task_loss")
TERM_TITLES = {  # what each built-in term's logged value is, and its sign (docs/metrics.md)
    "consistency": "consistency: KL (MSE) to the pre-trained model, >= 0",
    "diversity": "diversity: −entropy (NLG) / decorrelation (NLU)",
    "svd": "svd: −(top-k σ share)",
}
LABELS = {
    "base": "base",
    "lora": "LoRA",
    "pissa": "PiSSA",
    "balora": "BA-LoRA",
    **{f"balora-no-{t}": f"BA-LoRA w/o {t}" for t in ("consistency", "diversity", "svd")},
    "balora-current-head": "BA-LoRA current head",
}
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
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(
            f"{path!r} is not a readable trainer_state.json ({e}); pass a run whose logs the trainer wrote."
        ) from None
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


def _styles(names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """(colour, legend label) per run. Runs named ``method/seedN`` (a multi-seed demo) share their method's
    colour and only the first of them is labelled; any other run gets a colour of its own."""
    groups = list(dict.fromkeys(n.split("/")[0] for n in names))
    out, seen = {}, set()
    for i, name in enumerate(names):
        group = name.split("/")[0]
        if "/" not in name:
            out[name] = (f"C{i}", _label(name))
            continue
        out[name] = (f"C{groups.index(group)}", "_nolegend_" if group in seen else _label(group))
        seen.add(group)
    return out


def plot_losses(histories: dict[str, list[dict[str, Any]]], path: str, title: str = "Training loss") -> bool:
    """Training loss (and eval loss where logged) per step for each run; False when no run logged a loss."""
    fig, (ax,) = _figure(1, width=6.4, height=4.0)
    drawn = False
    styles = _styles(list(histories))
    for name, history in histories.items():
        colour, label = styles[name]
        steps, loss = series(history, "loss")
        if steps:
            ax.plot(steps, loss, color=colour, lw=1.2, marker="." if len(steps) <= 60 else None, label=label)
            drawn = True
        steps, loss = series(history, "eval_loss")
        if steps:
            eval_label = label if label == "_nolegend_" else f"{label} (eval)"
            ax.plot(steps, loss, color=colour, ls="--", marker="o", label=eval_label)
            drawn = True
        steps, loss = series(history, "balora/task_loss")
        if steps:  # BA-LoRA's loss without its terms: comparable with a baseline's loss
            task_label = label if label == "_nolegend_" else f"{label} (task loss)"
            ax.plot(steps, loss, color=colour, ls=":", lw=1.2, label=task_label)
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
    panels = [(f"balora/{t}", TERM_TITLES.get(t, f"{t} (unweighted)")) for t in terms] + [
        ("balora/loss", "weighted total Σ λ·L")
    ]
    ncols = min(len(panels), 2)
    fig, axes = _figure(ncols, nrows=math.ceil(len(panels) / ncols), height=3.0)
    styles = _styles(list(histories))
    for ax, (key, title) in zip(axes, panels):
        for name, history in histories.items():
            steps, values = series(history, key)
            colour, label = styles[name]
            if steps:
                ax.plot(
                    steps, values, color=colour, lw=1.2, marker="." if len(steps) <= 60 else None, label=label
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
def demo_logs(results: dict[str, Any], run_dir: str) -> dict[str, str]:
    """``{run name: trainer_state.json path}`` of a demo's ``results``: ``method/seedN`` per run."""
    return {
        f"{r['method']}/seed{r['seed']}": os.path.join(run_dir, r["log"])
        for r in results.get("runs", [])
        if r.get("log")
    }


def plot_metrics(results: dict[str, Any], path: str) -> bool:
    """One panel per held-out metric of a demo: every seed's value (points) and the mean with its 95 % interval
    (bar) per method; the base model's value is in the panel title. False when there is nothing to plot."""
    from balora_plugins.tools.demo.tables import fmt, metrics_of, per_seed, summarise

    runs = results.get("runs") or []
    metrics = [m for m in metrics_of(results["task"], runs) if m.interval]
    if not metrics:
        return False
    summary = summarise(runs, results["task"], results.get("settings", {}).get("interval", "t"))
    methods = list(summary)
    base = (results.get("base") or {}).get("metrics", {})
    ncols = min(len(metrics), 3)
    fig, axes = _figure(ncols, nrows=math.ceil(len(metrics) / ncols), width=3.6, height=3.2)
    for ax, metric in zip(axes, metrics):
        values = per_seed(runs, metric.key)
        for x, method in enumerate(methods):
            seeds = sorted(values.get(method, {}))
            offsets = (
                [0.0] if len(seeds) == 1 else [-0.15 + 0.3 * i / (len(seeds) - 1) for i in range(len(seeds))]
            )
            ax.scatter(
                [x + o for o in offsets], [values[method][sd] for sd in seeds], s=14, color=f"C{x}", alpha=0.6
            )
            iv = summary[method][metric.key]
            if iv.defined:
                ax.errorbar(
                    [x + 0.3],
                    [iv.mean],
                    yerr=[[iv.mean - iv.low], [iv.high - iv.mean]],
                    fmt="o",
                    color=f"C{x}",
                    capsize=4,
                    ms=5,
                )
            else:
                ax.plot([x + 0.3], [iv.mean], "o", color=f"C{x}", ms=5)
        ax.set_xticks(
            range(len(methods)), [_label(m) for m in methods], rotation=20 if len(methods) > 3 else 0
        )
        title = metric.label + (
            f" (base {fmt(base[metric.key], metric.decimals)})" if metric.key in base else ""
        )
        ax.set_title(title, fontsize="medium")
        ax.grid(alpha=0.3, axis="y")
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    n = len(results.get("settings", {}).get("seed") or []) or len({r["seed"] for r in runs})
    fig.suptitle(f"Held-out metrics per seed (points) and mean with 95 % interval (bars), {n} seeds")
    fig.savefig(path, bbox_inches="tight", pad_inches=0.05)  # long tick labels of the first column
    return True


def plot_differences(results: dict[str, Any], path: str) -> bool:
    """One panel per compared pair (rows) and metric (columns) of a demo: each seed's paired difference
    (method − baseline) as a point, the mean with its 95 % interval as a bar, and the zero line (each panel on
    its own scale: the BA-LoRA − PiSSA differences are far smaller than BA-LoRA − LoRA's). False when there
    is nothing to compare (one method or one seed)."""
    from balora_plugins.tools.demo.stats import interval, paired_differences
    from balora_plugins.tools.demo.tables import comparison_pairs, metrics_of, per_seed

    runs = results.get("runs") or []
    pairs = comparison_pairs(list(dict.fromkeys(r["method"] for r in runs)))
    metrics = [m for m in metrics_of(results["task"], runs) if m.headline]
    if not pairs or not metrics or len({r["seed"] for r in runs}) < 2:
        return False
    kind = results.get("settings", {}).get("interval", "t")
    fig, axes = _figure(len(metrics), nrows=len(pairs), width=3.3, height=2.4)
    for row, (a, b) in enumerate(pairs):
        for col, metric in enumerate(metrics):
            ax = axes[row * len(metrics) + col]
            values = per_seed(runs, metric.key)
            diffs = paired_differences(values[a], values[b])
            ax.scatter(range(len(diffs)), diffs, s=16, color=f"C{row}", alpha=0.7)
            iv = interval(diffs, kind)
            if iv.defined:
                yerr = [[iv.mean - iv.low], [iv.high - iv.mean]]
                ax.errorbar([len(diffs)], [iv.mean], yerr=yerr, fmt="o", color=f"C{row}", capsize=4, ms=5)
            ax.axhline(0.0, color="k", lw=0.8)
            ax.set_xticks(range(len(diffs) + 1), [*(str(sd) for sd in sorted(values[a])), "mean"])
            better = {True: ", < 0 better", False: ", > 0 better", None: ""}[metric.lower_is_better]
            ax.set_title(f"{metric.label}: {_label(a)} − {_label(b)}{better}", fontsize="small")
            ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Paired differences per seed (x: seed) and their mean with 95 % interval")
    fig.savefig(path, bbox_inches="tight", pad_inches=0.05)
    return True


def _demo_results(run_dir: str) -> dict[str, Any] | None:
    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path!r} is not a readable `balora demo` results.json ({e}).") from None


def render_run_dir(
    run_dir: str,
    out_dir: str,
    results: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Write the plots for ``run_dir`` into ``out_dir``; returns ``{plot name: path}`` of those written.

    ``results`` (or ``run_dir/results.json`` when present) is a demo's results: its ``runs`` name the logs and
    give the per-seed metrics plot, its ``spectra`` the spectrum plot. ``progress`` gets one line per step.
    """
    say = progress or (lambda message: None)
    results = results if results is not None else _demo_results(run_dir)
    runs = demo_logs(results, run_dir) if results is not None else {}
    runs = runs or find_runs(run_dir)
    say(f"reading the logs of {len(runs)} run{'s' if len(runs) != 1 else ''}")
    histories = {name: load_history(path) for name, path in runs.items()}
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    title = "Training loss" if results is None else f"Training loss ({results.get('task', '').upper()} demo)"
    targets = {k: os.path.join(out_dir, v) for k, v in PLOTS.items()}
    relative = results is not None and results.get("task") != "nlu"  # an NLU base has an untrained head
    plots = {
        "metrics": lambda path: results is not None and plot_metrics(results, path),
        "differences": lambda path: results is not None and plot_differences(results, path),
        "loss": lambda path: plot_losses(histories, path, title=title),
        "regularizers": lambda path: plot_regularizers(histories, path),
        "spectrum": lambda path: (
            results is not None and plot_spectra(results.get("spectra") or {}, path, relative=relative)
        ),
    }
    for name, draw in plots.items():
        if draw(targets[name]):
            written[name] = targets[name]
            say(f"wrote {targets[name]}")
    return written


def run_stats(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One run's summary: steps, first / last / lowest training loss, the last task loss (BA-LoRA runs), the last
    eval loss and the last value of each BA-LoRA term (None where not logged)."""

    def last(key: str) -> float | None:
        values = series(history, key)[1]
        return values[-1] if values else None

    steps, loss = series(history, "loss")
    return {
        "steps": int(max(steps)) if steps else 0,
        "first_loss": loss[0] if loss else None,
        "last_loss": loss[-1] if loss else None,
        "min_loss": min(loss) if loss else None,
        "last_task_loss": last("balora/task_loss"),
        "last_eval_loss": last("eval_loss"),
        "terms": {t: last(f"balora/{t}") for t in term_names({"run": list(history)})},
    }


def run_summary(histories: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown table: per run, steps, first / last / lowest training loss, last task loss, last eval loss, last
    BA-LoRA terms."""
    terms = term_names(histories)
    stats = {name: run_stats(history) for name, history in histories.items()}
    columns = ["first_loss", "last_loss", "min_loss", "last_task_loss", "last_eval_loss"]
    if all(s["last_task_loss"] is None for s in stats.values()):  # no BA-LoRA run logged its task loss
        columns.remove("last_task_loss")
    header = ["run", "steps", *(c.replace("_", " ").replace("eval loss", "eval_loss") for c in columns)]
    header += [f"last {t}" for t in terms]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]

    def fmt(value: float | None) -> str:
        return "–" if value is None else f"{value:.4g}"

    for name, run in stats.items():
        row = [name, str(run["steps"]), *(fmt(run[c]) for c in columns)]
        row += [fmt(run["terms"].get(t)) for t in terms]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def report(
    run_dir: str, out_dir: str | None = None, progress: Callable[[str], None] | None = None
) -> tuple[str, dict[str, str], dict[str, dict[str, Any]]]:
    """`balora report`: plots and a ``report.md`` for any run directory; returns (report path, plots, per-run
    summary: :func:`run_stats` with the log's path under ``log``)."""
    out_dir = out_dir or os.path.join(run_dir, "balora_report")
    plots = render_run_dir(run_dir, out_dir, progress=progress)
    results = _demo_results(run_dir)
    runs = demo_logs(results, run_dir) if results is not None else {}
    runs = runs or find_runs(run_dir)
    histories = {name: load_history(path) for name, path in runs.items()}
    lines = [f"# Training report: {os.path.abspath(run_dir)}", "", run_summary(histories), ""]
    for name, plot_path in plots.items():
        lines += [f"![{name}]({os.path.relpath(plot_path, out_dir)})", ""]
    for name, path in runs.items():
        lines.append(f"- {name}: `{os.path.abspath(path)}`")
    path = os.path.join(out_dir, REPORT)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    summary = {name: {"log": os.path.abspath(runs[name]), **run_stats(h)} for name, h in histories.items()}
    return path, plots, summary


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
    from balora_plugins.tools.demo.tables import fmt, metrics_of

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
    from balora_plugins import BALoRAConfig

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
