"""From per-seed runs to what the demo prints: per-method means with intervals, the paired comparisons, the
table (aligned text or markdown) and the verdict lines.

Which methods are compared: BA-LoRA − PiSSA (the regularizers' effect: same initialisation), BA-LoRA − LoRA
(the paper's baseline) and BA-LoRA − each ablation (what the switched-off term contributes); when BA-LoRA itself
is not run, each ablation − PiSSA.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .settings import LABELS
from .stats import Comparison, Interval, compare, interval


@dataclass(frozen=True)
class Metric:
    """A column: its key in a run's metrics, header, decimals, direction (None: no better/worse) and whether
    the verdict lines compare it."""

    key: str
    label: str
    decimals: int
    lower_is_better: bool | None
    headline: bool = False
    interval: bool = True  # timings get a mean only


# wall seconds per step, and this process's CPU seconds per step (all threads). With one torch thread the CPU
# seconds are the work itself whatever else runs on the machine; with several, idle threads spin-waiting for a
# descheduled one add to them on a busy machine.
TIMING = (
    Metric("seconds_per_step", "s/step", 2, None, interval=False),
    Metric("cpu_seconds_per_step", "CPU-s/step", 2, None, interval=False),
)
METRICS: dict[str, list[Metric]] = {
    "nlg": [
        Metric("answer_nll", "answer NLL", 4, True, headline=True),
        Metric("kl_from_base", "answer KL", 4, True),
        Metric("news_nll", "news NLL", 4, True, headline=True),
        Metric("news_kl", "news KL", 4, True, headline=True),
        Metric("exact_match", "exact match", 3, False, headline=True),
        Metric("svd_top_share", "top-k σ share", 4, None),
        *TIMING,
    ],
    "nlu": [
        Metric("accuracy", "accuracy", 3, False, headline=True),
        Metric("macro_f1", "macro-F1", 3, False, headline=True),
        Metric("eval_nll", "eval NLL", 4, True, headline=True),
        Metric("noisy_fit", "noisy-label fit", 3, True, headline=True),
        Metric("svd_top_share", "top-k σ share", 4, None),
        *TIMING,
    ],
}


def metrics_of(task: str, runs: Sequence[Mapping[str, Any]]) -> list[Metric]:
    """The task's metrics that every run reports (e.g. exact match only with ``--generate``)."""
    return [m for m in METRICS[task] if runs and all(m.key in r["metrics"] for r in runs)]


def per_seed(runs: Sequence[Mapping[str, Any]], key: str) -> dict[str, dict[int, float]]:
    """``{method: {seed: value of key}}``."""
    out: dict[str, dict[int, float]] = {}
    for r in runs:
        out.setdefault(r["method"], {})[int(r["seed"])] = float(r["metrics"][key])
    return out


def summarise(
    runs: Sequence[Mapping[str, Any]], task: str, kind: str = "t"
) -> dict[str, dict[str, Interval]]:
    """``{method: {metric: Interval of its mean over seeds}}`` in the order the methods ran."""
    out: dict[str, dict[str, Interval]] = {}
    for metric in metrics_of(task, runs):
        for method, values in per_seed(runs, metric.key).items():
            out.setdefault(method, {})[metric.key] = interval([values[s] for s in sorted(values)], kind)
    return out


def comparison_pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    """(method, baseline) pairs the verdict lines report, among ``methods``."""
    ablations = [m for m in methods if m.startswith("balora-no-")]
    variants = [
        m for m in methods if m.startswith("balora-") and m not in ablations
    ]  # e.g. balora-current-head
    extra = [(v, b) for v in variants for b in ("balora", "pissa") if b in methods]
    if "balora" in methods:
        pairs = [("balora", b) for b in ("pissa", "lora") if b in methods]
        return pairs + [("balora", a) for a in ablations] + extra
    return [(a, "pissa") for a in ablations if "pissa" in methods] + extra


def comparisons(runs: Sequence[Mapping[str, Any]], task: str, kind: str = "t") -> list[Comparison]:
    """Every paired comparison of every headline metric (grouped by metric)."""
    methods = list(dict.fromkeys(r["method"] for r in runs))
    out = []
    for metric in metrics_of(task, runs):
        if not metric.headline:
            continue
        values = per_seed(runs, metric.key)
        for method, baseline in comparison_pairs(methods):
            out.append(compare(values, metric.key, method, baseline, metric.lower_is_better, kind))
    return out


def fmt(value: float, decimals: int) -> str:
    """``value`` with ``decimals`` decimals, or in scientific notation when that would show only zeros."""
    if value != 0 and abs(value) < 0.5 * 10.0**-decimals:
        return f"{value:.{max(decimals - 2, 1)}e}"
    return f"{value:.{decimals}f}"


def _cell(iv: Interval | None, value: float | None, metric: Metric) -> str:
    d = metric.decimals
    if iv is None:
        return "–" if value is None else fmt(value, d)
    if not metric.interval or not iv.defined:
        return fmt(iv.mean, d)
    if iv.kind == "t":  # symmetric
        return f"{fmt(iv.mean, d)} ± {fmt((iv.high - iv.low) / 2, d)}"
    return f"{fmt(iv.mean, d)} [{fmt(iv.low, d)}, {fmt(iv.high, d)}]"


def results_table(results: Mapping[str, Any], markdown: bool = False) -> str:
    """Base row, then each method's mean ± half-width of the 95 % interval over seeds (t), or mean [low, high]
    (bootstrap); aligned text or markdown."""
    task = results["task"]
    metrics = metrics_of(task, results["runs"])
    summary = summarise(results["runs"], task, results.get("settings", {}).get("interval", "t"))
    header = ["model"] + [m.label for m in metrics]
    base = results.get("base", {}).get("metrics", {})
    rows = [["base"] + [_cell(None, base.get(m.key) if m.interval else None, m) for m in metrics]]
    for method, cols in summary.items():
        rows.append([LABELS.get(method, method)] + [_cell(cols.get(m.key), None, m) for m in metrics])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(metrics)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt_row(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt_row(header), "  ".join("-" * w for w in widths)] + [fmt_row(r) for r in rows])


def verdict(results: Mapping[str, Any]) -> list[str]:
    """One line per headline metric and compared pair: the paired difference, its interval and the verdict."""
    labels = {m.key: m.label for m in METRICS[results["task"]]}
    lines = []
    kind = results.get("settings", {}).get("interval", "t")
    for c in comparisons(results["runs"], results["task"], kind):
        lines.append(c.verdict(LABELS, labels[c.metric], digits=3))
    return lines
