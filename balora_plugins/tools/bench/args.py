"""The benchmark's command line: the variants, the model shapes, the options and their checks."""

from __future__ import annotations

import argparse
import sys
from typing import Any

VARIANTS: dict[str, str] = {
    "a": "PiSSA-LoRA, no regularizer (baseline)",
    "b": "BA-LoRA, this package (fused, snapshot reference)",
    "c": "authors' approach (2nd model, full logits)",
    "p": "BA-LoRA, precomputed top-k reference",
}
Q4_VARIANTS: dict[str, str] = {
    "a": "QPiSSA on a 4-bit base, no regularizer",
    "b": "BA-LoRA on the same 4-bit base (step-0 reference)",
    "c": "authors' approach on it (2nd fp model, full logits)",
}
NLU_VARIANTS: dict[str, str] = {
    "a": "PiSSA-LoRA classifier, no regularizer (baseline)",
    "b": "BA-LoRA NLU, reference forward every step",
    "b_cache": "BA-LoRA NLU, reference cache (epoch >= 2)",
}

# Llama-architecture shapes (a random model of the shape is built; weights do not change the timings).
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152),
    "smollm2-360m": dict(hidden=960, layers=32, heads=15, kv_heads=5, intermediate=2560, vocab=49152),
    "qwen2.5-0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936),
    "llama3.2-1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256),
}
# The NLU model: a random BERT of all-MiniLM-L6-v2's shape (the demo's classifier), 5 classes (BBC News).
NLU_SHAPE: dict[str, int] = dict(hidden=384, layers=6, vocab=30522, classes=5)
DTYPES = ("fp32", "bf16", "fp16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="balora bench",
        description="Step time and peak memory of (a) PiSSA-LoRA, (b) BA-LoRA as this package runs it and (c) the "
        "authors' approach (second model copy, full-vocabulary logits), same model and micro-batch; (a) and (b) "
        "again in a second dtype; the NLU reference cache; the regularizers alone.",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--shape", default="smollm2-135m", choices=sorted(SHAPES), help="random Llama model of this shape"
    )
    g.add_argument(
        "--model", default=None, help="load real weights instead: a local folder/.gguf, or 'smollm2'"
    )
    for name in ("layers", "hidden", "intermediate", "heads", "kv-heads", "vocab"):
        g.add_argument(f"--{name}", type=int, default=None, help=f"override the shape's {name}")
    g.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="attention implementation")
    g = p.add_argument_group("step")
    g.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    g.add_argument(
        "--seq-len", type=int, default=512, help="tokens per sequence (batch × seq-len = micro-batch)"
    )
    g.add_argument(
        "--prompt-frac", type=float, default=0.25, help="leading fraction of each sequence with label -100"
    )
    g.add_argument("--rank", type=int, default=128, help="LoRA r (the paper's NLG recipe: 128)")
    g.add_argument(
        "--init", default="pissa_niter_4", help="PEFT init_lora_weights of the adapter (pissa, pissa_niter_N)"
    )
    g.add_argument("--alpha", type=float, default=None, help="LoRA α (default: = r)")
    g.add_argument(
        "--chunk-size", type=int, default=None, help="fused-path chunk size (default: the config's)"
    )
    g.add_argument("--lr", type=float, default=2e-5)
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default=None, choices=DTYPES, help="default fp32 on CPU, bf16 on CUDA")
    g.add_argument(
        "--also-dtype",
        default=None,
        choices=(*DTYPES, "none"),
        help="run (a) and (b) again in this dtype, for their peak memory and one timed step "
        "(default: bf16 when the main dtype is fp32, else none)",
    )
    g.add_argument(
        "--warmup", type=int, default=1, help="untimed steps first (the first one also measures memory)"
    )
    g.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    g.add_argument("--term-reps", type=int, default=2, help="repetitions of the per-term timings of (b)")
    g.add_argument(
        "--fidelity",
        action="store_true",
        help="instead: the precomputed top-k reference's error and gradient cosine against the exact term on real "
        "text (see `balora bench --fidelity --help`)",
    )
    g.add_argument("--variants", default="abcp", help="which of a, b, c, p to run (e.g. 'ab')")
    g.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="(p): reference logits stored per position (default: the library's)",
    )
    g.add_argument(
        "--no-regularizers", action="store_true", help="skip the regularizers-only memory comparison"
    )
    g.add_argument(
        "--softcap",
        type=float,
        default=30.0,
        help="final-logit soft-cap of the soft-capped head timed with the regularizers alone (Gemma-2: 30; 0 = skip)",
    )
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every variant")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--in-process", action="store_true", help="run the variants in this process (no RSS figure)"
    )
    g.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the results as JSON")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    g = p.add_argument_group(
        "NLU (the reference cache)",
        "a random BERT classifier of all-MiniLM-L6-v2's shape, preset iclr2026-nlu: (a) baseline, (b) BA-LoRA, "
        "(b) with reference_cache=True timed after the first step (the batch's first epoch)",
    )
    g.add_argument("--no-nlu", action="store_true", help="skip the NLU variants")
    g = p.add_argument_group(
        "4-bit base (QLoRA / QPiSSA)",
        "the causal LM's (a), (b), (c) again on a bitsandbytes 4-bit nf4 base with QPiSSA (PiSSA of the "
        "full-precision weights, residual re-quantised); (c) adds the authors' second, full-precision model",
    )
    g.add_argument("--no-qlora", action="store_true", help="skip the 4-bit variants (needs bitsandbytes)")
    g.add_argument("--only-qlora", action="store_true", help="run the 4-bit variants only")
    g.add_argument("--nlu-batch", type=int, default=32, help="examples per micro-batch")
    g.add_argument("--nlu-seq-len", type=int, default=128, help="tokens per example")
    g.add_argument("--nlu-rank", type=int, default=8, help="LoRA r of the classifier (the demo's: 8)")
    for name in ("layers", "hidden", "vocab", "classes"):
        g.add_argument(f"--nlu-{name}", type=int, default=None, help=f"override the classifier's {name}")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-cache", default=None, help=argparse.SUPPRESS)
    return p


def validate(args: argparse.Namespace) -> None:
    """Refuse option values the benchmark cannot run with (the message names the option and the fix)."""
    bad = sorted(set(args.variants) - set(VARIANTS))
    if bad or not args.variants:
        raise SystemExit(f"balora bench: --variants={args.variants!r}; use letters from 'abcp' (e.g. 'ab').")
    for name in ("batch", "seq_len", "rank", "steps", "nlu_batch", "nlu_seq_len", "nlu_rank"):
        if getattr(args, name) < 1:
            raise SystemExit(f"balora bench: --{name.replace('_', '-')}={getattr(args, name)} must be >= 1.")
    if args.warmup < 1:
        raise SystemExit(
            f"balora bench: --warmup={args.warmup} must be >= 1 (the first step measures memory)."
        )
    if not 0.0 <= args.prompt_frac < 1.0:
        raise SystemExit(f"balora bench: --prompt-frac={args.prompt_frac} must be in [0, 1).")
    if args.only_qlora and args.no_qlora:
        raise SystemExit("balora bench: --only-qlora and --no-qlora exclude each other; pass one.")
    if args.softcap < 0:
        raise SystemExit(
            f"balora bench: --softcap={args.softcap} must be >= 0 (0 skips the soft-capped head)."
        )


def dtype_name(args: argparse.Namespace) -> str:
    """The main dtype: ``--dtype``, else fp32 on CPU and bf16 on CUDA."""
    return args.dtype or ("fp32" if str(args.device).startswith("cpu") else "bf16")


def also_dtype(args: argparse.Namespace) -> str | None:
    """The second dtype (a) and (b) run in, or None."""
    if args.also_dtype == "none":
        return None
    if args.also_dtype is not None:
        return None if args.also_dtype == dtype_name(args) else args.also_dtype
    return "bf16" if dtype_name(args) == "fp32" else None


def log(args: argparse.Namespace, msg: str) -> None:
    if not args.quiet:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


def with_changes(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    """A copy of ``args`` with ``changes`` applied."""
    new = argparse.Namespace(**vars(args))
    for k, v in changes.items():
        setattr(new, k, v)
    return new
