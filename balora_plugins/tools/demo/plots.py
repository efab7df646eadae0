"""The demo's own plots, and `balora report` on a demo directory.

* ``metrics.png`` — every seed's held-out metric (points) and each method's mean with its 95 % interval (bars);
* ``differences.png`` — the paired differences of the compared methods per seed, their mean and interval;
* then the run plots of :mod:`balora_plugins.tools.report` (loss, regularizers, and the logits' spectra from
  ``results.json``), with the methods' names (:data:`.settings.LABELS`) in the legends.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

from balora_plugins.tools.report import (
    ReportError,
    figure,
    find_runs,
    read_histories,
    render_plots,
    write_report,
)
from balora_plugins.tools.report import report as run_report

from .settings import LABELS, PLOTS, RESULTS
from .stats import interval, paired_differences
from .tables import comparison_pairs, fmt, metrics_of, per_seed, summarise


def _label(name: str) -> str:
    return LABELS.get(name, name)


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
    runs = results.get("runs") or []
    metrics = [m for m in metrics_of(results["task"], runs) if m.interval]
    if not metrics:
        return False
    summary = summarise(runs, results["task"], results.get("settings", {}).get("interval", "t"))
    methods = list(summary)
    base = (results.get("base") or {}).get("metrics", {})
    ncols = min(len(metrics), 3)
    fig, axes = figure(ncols, nrows=math.ceil(len(metrics) / ncols), width=3.6, height=3.2)
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
    runs = results.get("runs") or []
    pairs = comparison_pairs(list(dict.fromkeys(r["method"] for r in runs)))
    metrics = [m for m in metrics_of(results["task"], runs) if m.headline]
    if not pairs or not metrics or len({r["seed"] for r in runs}) < 2:
        return False
    kind = results.get("settings", {}).get("interval", "t")
    fig, axes = figure(len(metrics), nrows=len(pairs), width=3.3, height=2.4)
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


def load_results(run_dir: str) -> dict[str, Any] | None:
    """The demo's ``results.json`` in ``run_dir``, or None when there is none (not a demo directory)."""
    path = os.path.join(run_dir, RESULTS)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path!r} is not a readable `balora demo` results.json ({e}).") from None


def render(
    run_dir: str,
    out_dir: str,
    results: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Write the demo's plots (:data:`.settings.PLOTS`) for the demo directory ``run_dir`` into ``out_dir``; returns
    ``{plot name: path}`` of those written.

    ``results`` (default: ``run_dir/results.json``) names the logs (its ``runs``), gives the per-seed metrics and
    the paired differences, and the spectra. ``progress`` gets one line per step.
    """
    say = progress or (lambda message: None)
    results = results if results is not None else load_results(run_dir)
    if results is None:
        raise ReportError(f"{run_dir!r} holds no {RESULTS}; it is not a `balora demo` report directory.")
    runs = demo_logs(results, run_dir) or find_runs(run_dir)
    histories = read_histories(runs, say)
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for name, draw in (("metrics", plot_metrics), ("differences", plot_differences)):
        target = os.path.join(out_dir, PLOTS[name])
        if draw(results, target):
            written[name] = target
            say(f"wrote {target}")
    written |= render_plots(
        histories,
        out_dir,
        title=f"Training loss ({results.get('task', '').upper()} demo)",
        spectra=results.get("spectra") or {},
        relative=results.get("task") != "nlu",  # an NLU base has an untrained head
        labels=LABELS,
        progress=say,
    )
    return written


def report(
    run_dir: str, out_dir: str | None = None, progress: Callable[[str], None] | None = None
) -> tuple[str, dict[str, str], dict[str, dict[str, Any]]]:
    """`balora report`: a demo directory gets the demo's plots, any other run directory the run report
    (:func:`balora_plugins.tools.report.report`); returns (report path, plots, per-run summary)."""
    results = load_results(run_dir)
    if results is None:
        return run_report(run_dir, out_dir, progress=progress, labels=LABELS)
    out_dir = out_dir or os.path.join(run_dir, "balora_report")
    plots = render(run_dir, out_dir, results=results, progress=progress)
    path, summary = write_report(run_dir, out_dir, demo_logs(results, run_dir) or find_runs(run_dir), plots)
    return path, plots, summary
