"""`balora demo`'s entry point: run the task on every seed, aggregate, write ``results.json``, the plots and
``summary.md``, and print the table, the verdicts and what the run cost (wall time, CPU time, load)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from .nlg import run_nlg
from .nlu import run_nlu
from .plots import render
from .settings import RESULTS, SUMMARY, DemoSettings, check_out_dir
from .summary import cost_line, write_summary
from .tables import comparisons, results_table, summarise, verdict


def load_average() -> float | None:
    """The 1-minute load average (other processes competing for the CPU), where the OS reports one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def run(s: DemoSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo described by ``s``; write the report into ``s.out`` and return the results dict."""
    import torch

    check_out_dir(s.out, s.overwrite)
    machine = {
        "device": s.device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start": load_average(),
    }
    if s.device == "cpu":
        n = machine["torch_threads"]
        log(f"Running on CPU with {n} torch thread{'s' if n != 1 else ''}.")
    t_start, cpu_start = time.perf_counter(), time.process_time()
    body = (run_nlg if s.task == "nlg" else run_nlu)(s, log)
    results: dict[str, Any] = {"task": s.task, "settings": asdict(s), **body}
    results["summary"] = {
        method: {k: iv.to_dict() for k, iv in cols.items()}
        for method, cols in summarise(results["runs"], s.task, s.interval).items()
    }
    results["comparisons"] = [c.to_dict() for c in comparisons(results["runs"], s.task, s.interval)]
    t0 = time.perf_counter()
    plots = render(s.out, s.out, results=results)
    results["timings"]["report"] = time.perf_counter() - t0
    results["timings"]["total"] = time.perf_counter() - t_start
    machine["cpu_seconds"] = time.process_time() - cpu_start  # CPU time of this process, all threads
    machine["load_average_end"] = load_average()
    results["machine"] = machine
    results["plots"] = {k: os.path.basename(v) for k, v in plots.items()}
    with open(os.path.join(s.out, RESULTS), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    lines = verdict(results)
    write_summary(os.path.join(s.out, SUMMARY), results, results_table(results, markdown=True), lines)
    n = len(s.seed)
    log("")
    log(
        f"Held-out results: mean over {n} seed{'s' if n > 1 else ''}"
        + (f" ± half-width of the 95 % {s.interval} interval" if n > 1 else " (one seed: no interval)")
    )
    log(results_table(results))
    if lines:
        log("")
        log(
            "Paired differences over seeds (a method is named better only when the 95 % interval excludes 0):"
        )
        for line in lines:
            log("  " + line)
    log("")
    log(cost_line(results))
    log(f"Report: {os.path.join(s.out, SUMMARY)} ({len(plots)} plots).")
    return results
