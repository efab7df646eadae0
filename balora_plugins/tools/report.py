"""The run report: plots and a summary from training logs, for `balora report RUN_DIR` and the programs built
on it (``balora demo`` adds its own plots and summary: :mod:`balora_plugins.tools.demo.plots`, ``.summary``).

A *run* is a ``trainer_state.json`` (``log_history``) as written by the transformers ``Trainer`` and everything
built on it (TRL, axolotl): in the run directory itself, else in its latest ``checkpoint-*``; a directory
whose sub-directories are runs (a sweep) is read as several runs.

Plots (PNG, matplotlib's Agg canvas, no display needed):

* ``loss.png`` — training loss per step (and ``eval_loss`` where logged) for every run, and for BA-LoRA runs the
  task loss alone (``balora/task_loss``, dotted: the curve to lay over a LoRA/PiSSA baseline);
* ``regularizers.png`` — each BA-LoRA term (``balora/<term>``, unweighted, with its sign in the panel title) and
  the weighted total ``balora/loss`` per step, for the runs that logged them;
* ``spectrum.png`` — singular values of the output logits before (base) and after tuning, when the caller has
  them (the demo does).

Runs are named in the legends as they are, or through the ``labels`` a caller passes (``{name: label}``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

PLOTS = {"loss": "loss.png", "regularizers": "regularizers.png", "spectrum": "spectrum.png"}  # name: file
STATE = "trainer_state.json"
REPORT = "report.md"
_NOT_TERMS = ("lambda_", "skipped_")
_NOT_TERM_KEYS = ("rows", "loss", "task_loss")
TERM_TITLES = {  # what each built-in term's logged value is, and its sign (docs/metrics.md)
    "consistency": "consistency: KL (MSE) to the pre-trained model, >= 0",
    "diversity": "diversity: −entropy (NLG) / decorrelation (NLU)",
    "svd": "svd: −(top-k σ share)",
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
def figure(ncols: int, nrows: int = 1, width: float = 4.6, height: float = 3.4):
    """A figure of ``nrows`` × ``ncols`` panels (``width`` × ``height`` inches each) and its axes, row by row."""
    from matplotlib.figure import Figure  # an Agg canvas: no display, no pyplot global state

    fig = Figure(figsize=(width * ncols, height * nrows), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def run_label(name: str, labels: Mapping[str, str] | None = None) -> str:
    """The legend label of run ``name``: ``labels[name]`` when given, else the name itself."""
    return (labels or {}).get(name, name)


def _styles(names: Sequence[str], labels: Mapping[str, str] | None) -> dict[str, tuple[str, str]]:
    """(colour, legend label) per run. Runs named ``method/seedN`` (a multi-seed demo) share their method's
    colour and only the first of them is labelled; any other run gets a colour of its own."""
    groups = list(dict.fromkeys(n.split("/")[0] for n in names))
    out, seen = {}, set()
    for i, name in enumerate(names):
        group = name.split("/")[0]
        if "/" not in name:
            out[name] = (f"C{i}", run_label(name, labels))
            continue
        out[name] = (f"C{groups.index(group)}", "_nolegend_" if group in seen else run_label(group, labels))
        seen.add(group)
    return out


def plot_losses(
    histories: dict[str, list[dict[str, Any]]],
    path: str,
    title: str = "Training loss",
    labels: Mapping[str, str] | None = None,
) -> bool:
    """Training loss (and eval loss where logged) per step for each run; False when no run logged a loss."""
    fig, (ax,) = figure(1, width=6.4, height=4.0)
    drawn = False
    styles = _styles(list(histories), labels)
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


def plot_regularizers(
    histories: dict[str, list[dict[str, Any]]], path: str, labels: Mapping[str, str] | None = None
) -> bool:
    """One panel per BA-LoRA term (unweighted value) plus the weighted total; False when none was logged."""
    terms = term_names(histories)
    if not terms:
        return False
    panels = [(f"balora/{t}", TERM_TITLES.get(t, f"{t} (unweighted)")) for t in terms] + [
        ("balora/loss", "weighted total Σ λ·L")
    ]
    ncols = min(len(panels), 2)
    fig, axes = figure(ncols, nrows=math.ceil(len(panels) / ncols), height=3.0)
    styles = _styles(list(histories), labels)
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
    spectra: dict[str, Sequence[float]],
    path: str,
    top: int = SPECTRUM_TOP,
    relative: bool = True,
    labels: Mapping[str, str] | None = None,
) -> bool:
    """Top singular values of the output logits per model: σ_i, σ_i / ‖Z‖_F and, when ``relative`` and a ``base``
    spectrum is given, the change of each σ_i against it (left out for a base with an untrained head)."""
    from matplotlib.ticker import MaxNLocator

    spectra = {k: [float(x) for x in v] for k, v in spectra.items() if v}
    if not spectra:
        return False
    base = spectra.get("base") if relative else None
    fig, axes = figure(3 if base else 2, width=4.4)
    for i, (name, sv) in enumerate(spectra.items()):
        head = sv[:top]
        idx = list(range(1, len(head) + 1))
        fro = math.sqrt(sum(x * x for x in sv)) or 1.0
        style = dict(
            color="k" if name == "base" else f"C{i}",
            ls="--" if name == "base" else "-",
            lw=1.4,
            marker="." if len(head) <= 16 else None,
            label=run_label(name, labels),
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
def read_histories(
    runs: Mapping[str, str], progress: Callable[[str], None] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """``{run name: log_history}`` of ``runs`` (``{run name: trainer_state.json path}``)."""
    if progress is not None:
        progress(f"reading the logs of {len(runs)} run{'s' if len(runs) != 1 else ''}")
    return {name: load_history(path) for name, path in runs.items()}


def render_plots(
    histories: dict[str, list[dict[str, Any]]],
    out_dir: str,
    *,
    title: str = "Training loss",
    spectra: Mapping[str, Sequence[float]] | None = None,
    relative: bool = True,
    labels: Mapping[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Write the run plots (:data:`PLOTS`) into ``out_dir``; returns ``{plot name: path}`` of those written.

    ``spectra`` (``{model: singular values}``, a ``base`` entry for the change against it) adds the spectrum
    plot; ``relative=False`` leaves that change out (a base whose head is untrained). ``progress`` gets one line
    per plot written.
    """
    say = progress or (lambda message: None)
    os.makedirs(out_dir, exist_ok=True)
    targets = {k: os.path.join(out_dir, v) for k, v in PLOTS.items()}
    plots = {
        "loss": lambda path: plot_losses(histories, path, title=title, labels=labels),
        "regularizers": lambda path: plot_regularizers(histories, path, labels=labels),
        "spectrum": lambda path: (
            spectra is not None and plot_spectra(dict(spectra), path, relative=relative, labels=labels)
        ),
    }
    written = {}
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


def write_report(
    run_dir: str, out_dir: str, runs: Mapping[str, str], plots: Mapping[str, str]
) -> tuple[str, dict[str, dict[str, Any]]]:
    """``out_dir/report.md``: the :func:`run_summary` table of ``runs`` (``{run name: trainer_state.json path}``),
    the ``plots`` and the logs' paths; returns (its path, per-run summary: :func:`run_stats` with the log's path
    under ``log``)."""
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
    return path, summary


def report(
    run_dir: str,
    out_dir: str | None = None,
    progress: Callable[[str], None] | None = None,
    labels: Mapping[str, str] | None = None,
) -> tuple[str, dict[str, str], dict[str, dict[str, Any]]]:
    """The report of any run directory (:func:`find_runs`): the plots and ``report.md`` in ``out_dir`` (default
    ``RUN_DIR/balora_report``); returns (report path, ``{plot name: path}``, per-run summary)."""
    out_dir = out_dir or os.path.join(run_dir, "balora_report")
    runs = find_runs(run_dir)
    plots = render_plots(read_histories(runs, progress), out_dir, labels=labels, progress=progress)
    path, summary = write_report(run_dir, out_dir, runs, plots)
    return path, plots, summary
