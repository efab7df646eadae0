"""The ``balora`` command: ``demo``, ``export``, ``report`` and ``bench``.

Usage errors (bad options, a non-empty ``--out`` without ``--overwrite``) exit with code 2 before anything heavy
is imported or trained; runtime failures (a model that does not load, ...) print ``balora: error: ...`` and
exit with code 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from balora_plugins import __version__

EPILOG_DEMO = """examples:
  balora demo                                   # PiSSA vs BA-LoRA, SmolLM2-135M on GSM word problems (CPU ~10 min)
  balora demo --methods lora,pissa,balora --steps 200 --train-size 800 --out runs/gsm
  balora demo --task nlu                        # LoRA / PiSSA / BA-LoRA, MiniLM on BBC News
  balora demo --tiny --out /tmp/d --overwrite   # a tiny random model: seconds (tests, CI)
defaults depend on --task and the device (CPU: sized for 15 minutes on 2 cores; a GPU gets bigger runs)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="balora", description="BA-LoRA: demo, adapter export, training reports, benchmarks."
    )
    parser.add_argument("--version", action="version", version=f"balora-plugins {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,export,report,bench}")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="fine-tune a bundled model with LoRA / PiSSA / BA-LoRA and write a comparison report",
        description="Fine-tune a model that ships in a package (no downloads) with each method on the same data "
        "and seed, evaluate on held-out data, print a comparison table and write a report directory.",
        epilog=EPILOG_DEMO,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--task",
        choices=("nlg", "nlu"),
        default="nlg",
        help="nlg: SmolLM2-135M-Instruct on reasoning-gym gsm_symbolic (default); "
        "nlu: all-MiniLM-L6-v2 classifying BBC News",
    )
    demo.add_argument(
        "--model", help="local folder, .gguf file or cached hub id instead of the bundled model"
    )
    demo.add_argument(
        "--tiny", action="store_true", help="a tiny random model and few steps (seconds; for tests/CI)"
    )
    demo.add_argument("--train-size", type=_positive_int, help="training examples")
    demo.add_argument("--eval-size", type=_positive_int, help="held-out examples")
    demo.add_argument("--steps", type=_positive_int, help="optimizer steps per method")
    demo.add_argument("--batch-size", type=_positive_int, help="examples per step")
    demo.add_argument("--rank", type=_positive_int, help="LoRA rank r (alpha = r)")
    demo.add_argument("--lr", type=_positive_float, help="learning rate")
    demo.add_argument("--max-length", type=_positive_int, help="max tokens per example")
    demo.add_argument(
        "--max-new-tokens", type=_positive_int, help="NLG: greedy answer length for exact match"
    )
    demo.add_argument("--preset", help="BA-LoRA preset (default iclr2026-nlg / iclr2026-nlu)")
    demo.add_argument(
        "--methods", help="comma-separated subset of lora,pissa,balora (lora mirrors the paper's table)"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed for data, init and order (default 0)")
    demo.add_argument("--out", default="balora_demo", help="report directory (default ./balora_demo)")
    demo.add_argument("--overwrite", action="store_true", help="replace the report in a non-empty --out")
    demo.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")

    exp = sub.add_parser(
        "export",
        help="PiSSA/BA-LoRA adapter -> plain LoRA for the untouched base (or a merged model)",
        description="Convert a PiSSA-initialised adapter (trained with BA-LoRA or not) into a plain rank-2r LoRA "
        "adapter that serves on the untouched base model. With --merge, write the merged full model instead. "
        "The output directory of a BA-LoRA run (plain LoRA at its root, or 0.1.0's PiSSA adapter + balora_ref/) "
        "and its checkpoints are accepted as they are.",
    )
    exp.add_argument(
        "adapter_dir",
        help="adapter directory: a BA-LoRA output_dir or checkpoint, or any PEFT adapter (PiSSA ones with balora_ref/)",
    )
    exp.add_argument("--out", required=True, help="output directory")
    exp.add_argument("--merge", action="store_true", help="write a merged model (needs the untouched base)")
    exp.add_argument(
        "--base",
        help="untouched base model (folder or cached hub id); default: the adapter's base_model_name_or_path",
    )
    exp.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="with --merge: the merged model's dtype (default auto: the base checkpoint's own)",
    )
    exp.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")

    rep = sub.add_parser(
        "report",
        help="plots and a summary from the logs of any run (TRL, transformers, axolotl, demo)",
        description="Render loss and BA-LoRA term curves from trainer_state.json (in RUN_DIR, its latest "
        "checkpoint-*, or its sub-directories), plus the spectrum plot for demo directories.",
    )
    rep.add_argument("run_dir", help="output directory of a run (or of several runs, or of `balora demo`)")
    rep.add_argument("--out", help="where to write report.md and the PNGs (default RUN_DIR/balora_report)")

    sub.add_parser(
        "bench", help="benchmarks of the BA-LoRA terms (see `balora bench --help`)", add_help=False
    )
    parser.set_defaults(commands=sub.choices)  # each command's parser, for usage errors raised after parsing
    return parser


# ---------------------------------------------------------------------------------------------- commands
def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from balora_plugins.tools.demo import DemoUsageError, check_out_dir, resolve_settings, run

    given = {
        k: getattr(args, k)
        for k in (
            "model",
            "train_size",
            "eval_size",
            "steps",
            "batch_size",
            "rank",
            "lr",
            "max_length",
            "max_new_tokens",
            "preset",
            "methods",
            "seed",
        )
    }
    try:
        check_out_dir(args.out, args.overwrite)
        settings = resolve_settings(
            task=args.task,
            device=args.device,
            tiny=args.tiny,
            out=args.out,
            overwrite=args.overwrite,
            **given,
        )
        run(settings)
    except DemoUsageError as e:
        parser.error(str(e))
    return 0


def _export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if (args.base or args.dtype != "auto") and not args.merge:
        parser.error(
            "--base and --dtype only apply with --merge (the plain-LoRA export needs no base model)."
        )
    if not os.path.isdir(args.adapter_dir):
        parser.error(f"ADAPTER_DIR {args.adapter_dir!r} is not a directory.")
    from balora_plugins.core import export_merged, export_plain_lora, require_empty_dir

    try:
        require_empty_dir(args.out, args.overwrite, what="--out")
    except FileExistsError as e:
        parser.error(str(e))
    if args.merge:
        out = export_merged(
            args.adapter_dir, args.out, base=args.base, overwrite=args.overwrite, dtype=args.dtype
        )
    else:
        out = export_plain_lora(args.adapter_dir, args.out, overwrite=args.overwrite)
    what = "merged model" if args.merge else "plain LoRA adapter (load it on the untouched base model)"
    print(f"Wrote {what} to {out}")
    return 0


def _report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from balora_plugins.tools.report import ReportError, report

    try:
        path, plots = report(args.run_dir, args.out)
    except ReportError as e:
        parser.error(str(e))
    print(f"Wrote {path}" + "".join(f"\n  {p}" for p in plots.values()))
    return 0


def _bench(argv: list[str]) -> int:
    try:
        from balora_plugins.tools.bench import main as bench_main
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.bench":
            raise
        print(
            "balora: error: `balora bench` is not available in this installation (balora_plugins.tools.bench is missing).",
            file=sys.stderr,
        )
        return 1
    return int(bench_main(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``balora`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # its own parser: everything after `bench` is its business
        return _bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    command_parser = args.commands[args.command]
    from balora_plugins.tools.assets import AssetError

    handler = {"demo": _demo, "export": _export, "report": _report}[args.command]
    try:
        return handler(args, command_parser)
    except (AssetError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"balora {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
