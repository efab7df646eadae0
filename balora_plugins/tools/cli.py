"""The ``balora`` command: ``demo``, ``export``, ``reference``, ``report`` and ``bench``.

Usage errors (bad options, a missing ``--base`` folder, a non-empty ``--out`` without ``--overwrite``) exit with
code 2 before anything heavy is imported or trained; runtime failures (a model that does not load, a missing
optional dependency, ...) print one line, ``balora <command>: error: ...``, naming the argument, the value and
the fix, and exit with code 1. Progress goes to stderr; ``--json`` puts a machine-readable result on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from balora_plugins import __version__
from balora_plugins.tools.demo.settings import cli_fields, default_text

EPILOG_DEMO = """examples:
  balora demo                                   # 3 seeds x LoRA / PiSSA / BA-LoRA, SmolLM2-135M on GSM problems
  balora demo --seeds 5 --steps 48 --train-size 96 --out runs/gsm
  balora demo --methods pissa,balora,balora-no-consistency,balora-no-svd   # which term does what
  balora demo --task nlu --label-noise 0.3      # MiniLM on BBC News, 30 % of the training labels flipped
  balora demo --tiny --out /tmp/d --overwrite   # a tiny random model: seconds (tests, CI)
defaults depend on --task and the device (CPU: sized for 15 minutes on 2 idle cores; a GPU gets bigger runs);
docs/cli.md lists them."""


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` with its ValueError turned into argparse's usage error (the message stays ``parse``'s)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def add_dataclass_options(
    parser: argparse.ArgumentParser,
    fields: Sequence[dataclasses.Field],
    defaults: Callable[[str], str | None] = lambda name: None,
) -> None:
    """One ``--field-name`` option per dataclass field, from its metadata: ``help``, ``parse`` (a converter
    raising ValueError), ``choices`` and ``metavar``. A bool field defaulting to False is a switch; one
    defaulting to None gets ``--x`` / ``--no-x``. The default is the field's (None: decided later, per task and
    device, and described by ``defaults(name)``), so the settings class stays the one definition of every
    option. Integer / float options show ``N`` / ``X``."""
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = meta["help"]
        described = defaults(f.name) if default is None else None
        if described:
            help_text += f" (default {described})"
        elif default not in (None, False, ""):
            help_text += f" (default: {default})"
        if f.type in ("bool", bool) or (f.type == "bool | None"):
            action = "store_true" if default is False else argparse.BooleanOptionalAction
            parser.add_argument(flag, action=action, default=default, help=help_text)
            continue
        kwargs: dict[str, Any] = {"default": default, "help": help_text}
        if meta.get("parse") is not None:
            kwargs["type"] = _argparse_type(meta["parse"])
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        metavar = meta.get("metavar") or {"int": "N", "float": "X"}.get(str(f.type).split(" |")[0])
        if metavar:
            kwargs["metavar"] = metavar
        parser.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="balora", description="BA-LoRA: demo, adapter export, training reports, benchmarks."
    )
    parser.add_argument("--version", action="version", version=f"balora-plugins {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,export,reference,report,bench}")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="fine-tune a bundled model with LoRA / PiSSA / BA-LoRA and write a comparison report",
        description="Fine-tune a model that ships in a package (no downloads) with each method on the same data "
        "and seed, evaluate on held-out data, print a comparison table and write a report directory.",
        epilog=EPILOG_DEMO,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_options(demo, cli_fields(), default_text)

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
    exp.add_argument("--json", action="store_true", help="print the written paths as JSON on stdout")

    pre = sub.add_parser(
        "reference",
        help="precompute the top-k reference of a causal LM over the training data (reference='precomputed')",
        description="Run the untouched pre-trained model once over the training data (inference only) and store, "
        "per trained position, its top-k logits and what the consistency term needs for the rest of the "
        "vocabulary; train with BALoRAConfig(reference='precomputed', reference_path=OUT) (axolotl: "
        "balora_reference: precomputed, balora_reference_path: OUT). Resumable: run the same command again. "
        "docs/precomputed_reference.md describes the format.",
    )
    pre.add_argument(
        "data",
        help="the training data: a folder written by datasets' save_to_disk (e.g. axolotl preprocess's prepared "
        "dataset), or a .json/.jsonl/.parquet/.csv file; tokenised already (input_ids, labels) or raw TRL SFT data "
        "(messages / prompt-completion / text), which is tokenised with TRL's own preparation",
    )
    pre.add_argument(
        "--model", required=True, help="the untouched pre-trained model: a folder, a .gguf file or a hub id"
    )
    pre.add_argument("--out", required=True, help="output folder (resumed when it holds an unfinished run)")
    pre.add_argument(
        "--top-k", type=int, default=None, help="logits kept per position (default: the library's, 128)"
    )
    pre.add_argument(
        "--temperatures", default="1,2", help="comma-separated T the store serves (default 1,2: the presets')"
    )
    pre.add_argument(
        "--max-length", type=int, default=1024, help="raw data: TRL's max_length (as in training)"
    )
    pre.add_argument(
        "--completion-only-loss",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="raw data: TRL's completion_only_loss (default: TRL's)",
    )
    pre.add_argument("--assistant-only-loss", action="store_true", help="raw data: TRL's assistant_only_loss")
    pre.add_argument(
        "--positions",
        choices=("labels", "all"),
        default="labels",
        help="labels: the positions training regularises (default); all: every position (any label setting)",
    )
    pre.add_argument(
        "--split", default="train", help="the split of a DatasetDict / data file (default train)"
    )
    pre.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    pre.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    pre.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    pre.add_argument("--overwrite", action="store_true", help="replace whatever --out holds")

    rep = sub.add_parser(
        "report",
        help="plots and a summary from the logs of any run (TRL, transformers, axolotl, demo)",
        description="Render loss and BA-LoRA term curves from trainer_state.json (in RUN_DIR, its latest "
        "checkpoint-*, or its sub-directories), plus the spectrum plot for demo directories.",
    )
    rep.add_argument("run_dir", help="output directory of a run (or of several runs, or of `balora demo`)")
    rep.add_argument("--out", help="where to write report.md and the PNGs (default RUN_DIR/balora_report)")
    rep.add_argument(
        "--json", action="store_true", help="print the written paths and each run's summary as JSON"
    )

    sub.add_parser(
        "bench", help="benchmarks of the BA-LoRA terms (see `balora bench --help`)", add_help=False
    )
    parser.set_defaults(commands=sub.choices)  # each command's parser, for usage errors raised after parsing
    return parser


# ---------------------------------------------------------------------------------------------- commands
def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from balora_plugins.tools.demo import DemoUsageError, check_out_dir, resolve_settings, run

    given = {f.name: getattr(args, f.name) for f in cli_fields()}
    try:
        check_out_dir(args.out, args.overwrite)
        settings = resolve_settings(**given)
        run(settings)
    except DemoUsageError as e:
        parser.error(str(e))
    return 0


class CommandFailed(Exception):
    """A runtime failure of a command, already worded for the user (one line); exit code 1."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line (host libraries write several)."""
    return " ".join(str(error).split()) or type(error).__name__


def progress_printer(command: str) -> Callable[[str], None]:
    """``balora <command>: [elapsed] message`` on stderr, one line per step of long work."""
    start = time.monotonic()

    def say(message: str) -> None:
        print(f"balora {command}: [{time.monotonic() - start:6.1f} s] {message}", file=sys.stderr, flush=True)

    return say


def looks_like_path(text: str) -> bool:
    """Whether ``text`` names a local folder rather than a hub id (``org/name``)."""
    return os.path.isabs(text) or text.startswith(("./", "../", "~", ".\\")) or os.path.exists(text)


def _adapter_base(adapter_dir: str) -> str | None:
    try:
        with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
            return json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


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
    if not os.path.isfile(os.path.join(args.adapter_dir, "adapter_config.json")):
        parser.error(
            f"ADAPTER_DIR {args.adapter_dir!r} holds no adapter_config.json; pass a PEFT adapter folder (a BA-LoRA "
            "output_dir, one of its checkpoint-N/ or its balora_resume/)."
        )
    base = args.base or _adapter_base(args.adapter_dir)
    if args.merge and base and looks_like_path(base) and not os.path.isdir(os.path.expanduser(base)):
        where = "argument --base" if args.base else "ADAPTER_DIR's base_model_name_or_path (pass --base)"
        parser.error(
            f"{where}: {base!r} is not a directory; pass the untouched base model's folder (or a hub id already "
            "in the local Hugging Face cache) with --base."
        )
    say = progress_printer("export")
    step = {"now": ""}

    def track(message: str) -> None:
        step["now"] = message
        say(message)

    try:
        if args.merge:
            out = export_merged(
                args.adapter_dir,
                args.out,
                base=args.base,
                overwrite=args.overwrite,
                dtype=args.dtype,
                progress=track,
            )
        else:
            track(f"converting {args.adapter_dir} to a plain LoRA adapter")
            out = export_plain_lora(args.adapter_dir, args.out, overwrite=args.overwrite)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        if step["now"].startswith("loading the base model"):
            name = "--base" if args.base else "the adapter's base_model_name_or_path"
            raise CommandFailed(
                f"{name} {base!r} did not load as the base model ({one_line(e)}); pass the untouched base model's "
                "folder, or a hub id in the local cache, with --base."
            ) from None
        raise CommandFailed(f"ADAPTER_DIR {args.adapter_dir!r}: {one_line(e)}") from None
    files = sorted(os.path.abspath(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    if args.json:
        print(
            json.dumps(
                {"command": "export", "out": os.path.abspath(out), "merged": args.merge, "files": files}
            )
        )
    else:
        what = "merged model" if args.merge else "plain LoRA adapter (load it on the untouched base model)"
        print(f"Wrote {what} to {out} ({len(files)} files)")
    return 0


def _load_data(path: str, split: str):
    import datasets

    if os.path.isdir(path):
        data = datasets.load_from_disk(path)
    else:
        ext = os.path.splitext(path)[1].lstrip(".").lower()
        kind = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv", "arrow": "arrow"}.get(
            ext
        )
        if kind is None:
            raise ValueError(
                f"DATA {path!r}: use a save_to_disk folder or a .json/.jsonl/.parquet/.csv/.arrow file."
            )
        data = datasets.load_dataset(kind, data_files={split: path})
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"DATA {path!r} has no split {split!r} (it has {sorted(data)}); pass --split.")
        data = data[split]
    return data


def _reference(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not os.path.exists(args.data):
        parser.error(f"DATA {args.data!r} does not exist.")
    try:
        temperatures = [float(t) for t in args.temperatures.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--temperatures {args.temperatures!r}: write numbers, e.g. 1,2.")
    import torch

    from balora_plugins.core import DEFAULT_TOP_K, precompute_reference, tokenizer_fingerprint
    from balora_plugins.tools.assets import load_causal_lm

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_causal_lm(args.model, dtype=getattr(torch, args.dtype), log=print)
    model.to(device)
    data = _load_data(args.data, args.split)
    source = "tokenised"
    if "input_ids" not in data.column_names:
        import tempfile

        from trl import SFTConfig

        from balora_plugins.trl import sft_train_dataset

        extra = (
            {} if args.completion_only_loss is None else {"completion_only_loss": args.completion_only_loss}
        )
        with tempfile.TemporaryDirectory(prefix="balora-reference-") as tmp:
            sft = SFTConfig(
                output_dir=tmp,
                max_length=args.max_length,
                assistant_only_loss=args.assistant_only_loss,
                report_to=[],
                bf16=False,
                use_cpu=device == "cpu",
                **extra,
            )
            data = sft_train_dataset(model, data, sft, tok)
        source = "TRL SFT preparation"
    manifest = precompute_reference(
        model,
        data,
        args.out,
        top_k=args.top_k or DEFAULT_TOP_K,
        temperatures=temperatures,
        positions=args.positions,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        settings={
            "data": os.path.abspath(args.data),
            "source": source,
            "max_length": args.max_length if source != "tokenised" else None,
            "tokenizer": tokenizer_fingerprint(tok),
            "dtype": args.dtype,
        },
    )
    print(
        f"Wrote the precomputed reference of {manifest['distinct_examples']} examples ({manifest['rows']} positions, "
        f"k = {manifest['top_k']}, T in {manifest['temperatures']}) to {args.out}; train with reference='precomputed', "
        f"reference_path={args.out!r}."
    )
    return 0


def _report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not os.path.isdir(args.run_dir):
        parser.error(f"RUN_DIR {args.run_dir!r} is not a directory.")
    if args.out and os.path.isfile(args.out):
        parser.error(f"--out {args.out!r} is a file; pass a directory for report.md and the plots.")
    try:
        import matplotlib  # noqa: F401  (the plots; an optional dependency)
    except ImportError:
        raise CommandFailed(
            "needs matplotlib to draw the plots, and it is not installed: pip install matplotlib (or install "
            "the package with its report extra, pip install 'balora-plugins[report]')."
        ) from None
    from balora_plugins.tools.demo.plots import report  # a demo directory's plots, else the run report
    from balora_plugins.tools.report import ReportError

    try:
        path, plots, runs = report(args.run_dir, args.out, progress=progress_printer("report"))
    except ReportError as e:
        parser.error(str(e))
    if args.json:
        print(
            json.dumps({"command": "report", "report": os.path.abspath(path), "plots": plots, "runs": runs})
        )
    else:
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

    handler = {"demo": _demo, "export": _export, "reference": _reference, "report": _report}[args.command]
    try:
        return handler(args, command_parser)
    except (CommandFailed, AssetError, OSError, ValueError, ImportError) as e:
        print(f"balora {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
