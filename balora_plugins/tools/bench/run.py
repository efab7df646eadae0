"""Orchestration: every measurement is a job (``a``, ``b@bf16``, ``nlu:b_cache``, ``regularizers``, ...) run in a
fresh subprocess of ``python -m balora_plugins.tools.bench --worker JOB`` (or here with ``--in-process``)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from .args import NLU_VARIANTS, Q4_VARIANTS, VARIANTS, also_dtype, build_parser, log, validate, with_changes
from .build import model_shape
from .fidelity import main as fidelity_main
from .regularizers import run_regularizers
from .table import format_table, meta, summarise
from .variants import run_nlu_variant, run_variant


def forward_args(argv: Sequence[str]) -> list[str]:
    """argv minus the orchestration-only options, for the worker subprocesses."""
    skip_with_value = {"--json", "--variants"}
    out, it = [], iter(argv)
    for a in it:
        if a in skip_with_value:
            next(it, None)
        elif a.split("=", 1)[0] in skip_with_value or a == "--in-process":
            continue
        else:
            out.append(a)
    return out


def in_subprocess(job: str, argv: Sequence[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="balora-bench-") as tmp:
        path = os.path.join(tmp, "result.json")
        cmd = [
            sys.executable,
            "-m",
            "balora_plugins.tools.bench",
            *forward_args(argv),
            "--worker",
            job,
            "--worker-out",
            path,
        ]
        env = dict(os.environ)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0 or not os.path.exists(path):
            raise RuntimeError(
                f"benchmark worker {job!r} failed (exit code {proc.returncode}); its output is above."
            )
        with open(path) as f:
            return json.load(f)


def worker(args: argparse.Namespace, job: str) -> dict[str, Any]:
    """Run one job in this process: ``regularizers``, ``nlu:VARIANT``, ``VARIANT`` or ``VARIANT@DTYPE``."""
    if job == "regularizers":
        s = model_shape(args)
        return run_regularizers(args, args.batch * args.seq_len, s["vocab"], s["hidden"])
    if job.startswith("nlu:"):
        return run_nlu_variant(job[4:], args)
    if job.startswith("q4:"):
        return run_variant(job[3:], args, four_bit=True)
    variant, _, dtype = job.partition("@")
    return run_variant(variant, args, dtype or None)


def jobs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(job, progress label) in the order they run."""
    four_bit = [(f"q4:{v}", f"4-bit ({v}) {Q4_VARIANTS[v]}") for v in Q4_VARIANTS if v in args.variants]
    if not importlib.util.find_spec("bitsandbytes") or args.no_qlora:
        four_bit = []
    if args.only_qlora:
        return four_bit
    out = [(v, f"variant ({v}) {VARIANTS[v]}") for v in VARIANTS if v in args.variants]
    second = also_dtype(args)
    if second:
        out += [(f"{v}@{second}", f"variant ({v}) in {second}") for v in "ab" if v in args.variants]
    out += four_bit
    if not args.no_nlu:
        out += [(f"nlu:{v}", f"NLU ({v}) {NLU_VARIANTS[v]}") for v in NLU_VARIANTS]
    if not args.no_regularizers:
        out.append(("regularizers", "regularizers alone: fused vs plain logits"))
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``balora bench`` and ``python -m balora_plugins.tools.bench``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # the precomputed reference against the exact one, on real text (its own options)
    if "--fidelity" in argv:
        return fidelity_main(argv)
    args = build_parser().parse_args(argv)
    validate(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        result = worker(args, args.worker)
        with open(args.worker_out, "w") as f:
            json.dump(result, f)
        return 0
    if args.in_process and not str(args.device).startswith("cuda"):
        log(args, "in-process run: the RSS column is not measured (the process's peak RSS never goes down)")
    cache = tempfile.TemporaryDirectory(prefix="balora-bench-model-")  # the PiSSA models, built once
    args.model_cache = cache.name
    run = (
        (lambda job: worker(with_changes(args, worker=job), job))
        if args.in_process
        else (lambda job: in_subprocess(job, [*argv, "--model-cache", cache.name]))
    )
    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    dtypes: dict[str, dict[str, dict[str, Any]]] = {}
    nlu: dict[str, dict[str, Any]] = {}
    q4: dict[str, dict[str, Any]] = {}
    regs = None
    if not args.no_qlora and importlib.util.find_spec("bitsandbytes") is None:
        log(args, "bitsandbytes is not installed: the 4-bit variants are skipped (pip install bitsandbytes)")
    try:
        for job, label in jobs(args):
            log(args, f"{label} ...")
            r = run(job)
            if args.in_process:
                r["rss_growth_bytes"] = None
            if job == "regularizers":
                regs = r
            elif job.startswith("nlu:"):
                nlu[job[4:]] = r
            elif job.startswith("q4:"):
                q4[job[3:]] = r
            elif "@" in job:
                dtypes.setdefault(job.split("@")[1], {})[job.split("@")[0]] = r
            else:
                results[job] = r
    finally:
        cache.cleanup()
    doc = summarise(results, regs, {**meta(args), "wall_s": None}, dtypes, nlu, q4)
    doc["meta"]["wall_s"] = round(time.perf_counter() - t0, 1)
    doc["meta"]["also_dtype"] = also_dtype(args)
    print(format_table(doc))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(doc, f, indent=2)
        log(args, f"wrote {args.json_path}")
    return 0
