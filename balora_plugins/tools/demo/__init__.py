"""`balora demo`: LoRA / PiSSA / BA-LoRA (and ablations) on a real model that ships in a package, over several
seeds, with 95 % intervals, paired comparisons, forgetting (NLG) and label-noise robustness (NLU).

* :mod:`.settings` — :class:`DemoSettings` (its field metadata generates the CLI options), methods, defaults;
* :mod:`.common` — training and evaluation pieces both tasks share;
* :mod:`.nlg` — SmolLM2-135M-Instruct on GSM-style problems: data, evaluation (incl. forgetting), driver;
* :mod:`.nlu` — MiniLM on BBC News: label noise, evaluation, driver;
* :mod:`.stats` — intervals (Student t, paired bootstrap) and verdicts;
* :mod:`.tables` — per-method intervals, paired comparisons, the table and the verdict lines;
* :mod:`.plots` — the demo's plots (per-seed metrics, paired differences) beside the run plots of
  :mod:`balora_plugins.tools.report`, and `balora report` on a demo directory;
* :mod:`.summary` — ``summary.md`` and the cost line;
* :mod:`.runner` — :func:`run`: everything above, then ``results.json``, ``summary.md`` and the plots.

Everything lands in ``--out``: ``summary.md``, ``results.json``, PNG plots, ``seed<N>/<method>/trainer_state.json``
(the logs, readable by ``balora report``) and, for the first seed, ``seed<N>/<method>/adapter``.
"""

from .nlg import extract_answer, gsm_splits
from .nlu import flip_labels, macro_f1
from .runner import run
from .settings import (
    DEFAULTS,
    LABELS,
    METHODS,
    DemoSettings,
    DemoUsageError,
    Method,
    check_out_dir,
    cli_fields,
    resolve_settings,
)
from .tables import results_table, verdict

__all__ = [
    "DEFAULTS",
    "LABELS",
    "METHODS",
    "DemoSettings",
    "DemoUsageError",
    "Method",
    "check_out_dir",
    "cli_fields",
    "extract_answer",
    "flip_labels",
    "gsm_splits",
    "macro_f1",
    "resolve_settings",
    "results_table",
    "run",
    "verdict",
]
