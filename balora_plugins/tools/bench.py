"""`balora bench`: step time and peak memory of BA-LoRA against PiSSA-LoRA and the authors' approach.

One run, one model, one micro-batch, three variants (``python -m balora_plugins.tools.bench --help``):

* **a** — PiSSA-LoRA, no regularizer (the baseline): ``model(**batch).loss``, backward, AdamW step.
* **b** — BA-LoRA as this package runs it: :class:`~balora_plugins.core.objective.BALoRAObjective` with the
  ``iclr2026-nlg`` preset (constant schedules), the fused hidden-state path and the snapshot-adapter reference.
* **c** — the authors' approach (``llm172/BA-LoRA`` ``train.py``) re-expressed: a second full copy of the
  pre-trained model as the reference, the three terms on the full-vocabulary logits (tempered KL on every
  position then masked, top-K entropy, ``torch.svd_lowrank`` with q = k + 5 and 2 power iterations when
  |V| > 4096), and their unshifted ``labels != -100`` mask.

Each variant runs in a fresh subprocess (``--in-process`` to run them here), builds the same random model of
the chosen shape (or loads ``--model``) with the same seed — the PiSSA initialisation is computed once and
shared — and measures after ``--warmup`` steps the median of ``--steps`` training steps: wall-clock time
(synchronised on CUDA) and the process's CPU time (all its threads), which other processes sharing the cores
barely disturb. Peak memory is the peak of the memory allocated *after* the PiSSA model is built — so it
contains each variant's own set-up (snapshot adapter, second model copy), the optimizer state and the step —
measured as the peak of live tensor bytes (CUDA: the caching allocator's statistics; CPU: the allocation
trace of ``torch.profiler`` over the set-up and the first step) and, on CPU in a subprocess, also as the
growth of the process's peak RSS over set-up and steps (Linux ``clear_refs``/``VmHWM``), which adds allocator
and library overheads.

It also times each term of (b) on the same micro-batch (forward and gradient with respect to the hidden
states; consistency includes the reference forward), and the regularizers alone on an (M, d) hidden-state
matrix against the plain-logits path (target: extra peak memory < 1/8 of the plain path's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

VARIANTS: dict[str, str] = {
    "a": "PiSSA-LoRA, no regularizer (baseline)",
    "b": "BA-LoRA, this package (fused, snapshot reference)",
    "c": "authors' approach (2nd model, full logits)",
}

# Llama-architecture shapes (a random model of the shape is built; weights do not change the timings).
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152),
    "smollm2-360m": dict(hidden=960, layers=32, heads=15, kv_heads=5, intermediate=2560, vocab=49152),
    "qwen2.5-0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936),
    "llama3.2-1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256),
}

# The project's targets, defined on the default CPU configuration: label -> (section of the
# JSON document, key, comparison, bound).
TARGETS: dict[str, tuple[str, str, str, float]] = {
    "step time b/a <= 1.6": ("step_time", "b/a", "<=", 1.6),
    "step CPU time b/a <= 1.6 (contention-robust)": ("step_cpu_time", "b/a", "<=", 1.6),
    "peak memory b/a <= 1.15": ("peak_memory", "b/a", "<=", 1.15),
    "peak memory c/b >= 1.5": ("peak_memory", "c/b", ">=", 1.5),
    "SVD term <= 5% of (b) step": ("terms", "svd_share", "<=", 0.05),
    "regularizer memory fused/plain < 1/8": ("regularizers", "fused/plain", "<", 0.125),
    "SVD term < KL term (fused)": ("regularizers", "svd/kl", "<", 1.0),
}
_COMPARE = {"<=": lambda v, b: v <= b, ">=": lambda v, b: v >= b, "<": lambda v, b: v < b}


# ---------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="balora bench",
        description="Step time and peak memory of (a) PiSSA-LoRA, (b) BA-LoRA as this package runs it and (c) the "
        "authors' approach (second model copy, full-vocabulary logits), same model and micro-batch.",
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
    g.add_argument(
        "--dtype", default=None, choices=("fp32", "bf16", "fp16"), help="default fp32 on CPU, bf16 on CUDA"
    )
    g.add_argument(
        "--warmup", type=int, default=1, help="untimed steps first (the first one also measures memory)"
    )
    g.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    g.add_argument("--term-reps", type=int, default=2, help="repetitions of the per-term timings of (b)")
    g.add_argument("--variants", default="abc", help="which of a, b, c to run (e.g. 'ab')")
    g.add_argument(
        "--no-regularizers", action="store_true", help="skip the regularizers-only memory comparison"
    )
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every variant")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--in-process", action="store_true", help="run the variants in this process (no RSS figure)"
    )
    g.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the results as JSON")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-cache", default=None, help=argparse.SUPPRESS)
    return p


def _validate(args: argparse.Namespace) -> None:
    bad = sorted(set(args.variants) - set(VARIANTS))
    if bad or not args.variants:
        raise SystemExit(f"balora bench: --variants={args.variants!r}; use letters from 'abc' (e.g. 'ab').")
    for name in ("batch", "seq_len", "rank", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"balora bench: --{name.replace('_', '-')}={getattr(args, name)} must be >= 1.")
    if args.warmup < 1:
        raise SystemExit(
            f"balora bench: --warmup={args.warmup} must be >= 1 (the first step measures memory)."
        )
    if not 0.0 <= args.prompt_frac < 1.0:
        raise SystemExit(f"balora bench: --prompt-frac={args.prompt_frac} must be in [0, 1).")


def _log(args: argparse.Namespace, msg: str) -> None:
    if not args.quiet:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- set-up
def _torch_dtype(args: argparse.Namespace):
    import torch

    name = args.dtype or ("fp32" if str(args.device).startswith("cpu") else "bf16")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def model_shape(args: argparse.Namespace) -> dict[str, int]:
    shape = dict(SHAPES[args.shape])
    for key in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    return shape


def build_model(args: argparse.Namespace):
    """The pre-trained model (eval mode, on the device, in the dtype): random of ``--shape`` or ``--model``."""
    import torch

    dtype = _torch_dtype(args)
    if args.model:
        from balora_plugins.tools.assets import load_causal_lm

        model, _ = load_causal_lm(
            None if args.model == "smollm2" else args.model, dtype=dtype, log=lambda *a: None
        )
        if args.layers is not None:
            model.model.layers = model.model.layers[: args.layers]
            model.config.num_hidden_layers = args.layers
        return model.to(args.device).eval()
    from transformers import LlamaConfig, LlamaForCausalLM

    s = model_shape(args)
    cfg = LlamaConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=max(2048, args.seq_len),
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg._attn_implementation = args.attn
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def make_batch(args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """``batch × seq_len`` random tokens; the first ``prompt_frac`` of each sequence is prompt (label -100)."""
    import torch

    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(3, vocab, (args.batch, args.seq_len), generator=g)
    labels = ids.clone()
    labels[:, : int(args.prompt_frac * args.seq_len)] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(args.device) for k, v in batch.items()}


def add_pissa(model, args: argparse.Namespace):
    """Wrap ``model`` with the PiSSA LoRA adapter (all attention and MLP projections, dropout 0).

    The PiSSA SVDs are the slowest part of the set-up on a CPU, so with ``--model-cache`` the first variant
    saves the initialised model's state and the others load it (an identical model: same seed, same init).
    """
    from peft import LoraConfig, get_peft_model

    init = args.init
    cache = os.path.join(args.model_cache, "pissa_state.pt") if args.model_cache else None
    cached = cache is not None and os.path.exists(cache)
    cfg = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha if args.alpha is not None else args.rank,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=True if cached else init,
    )
    peft_model = get_peft_model(model, cfg)
    if cached:
        import torch

        missing, unexpected = peft_model.load_state_dict(
            torch.load(cache, map_location=args.device), strict=False
        )
        if missing or unexpected:
            raise RuntimeError(
                f"stale --model-cache {cache}: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        peft_model.peft_config["default"].init_lora_weights = init  # the residual base of a PiSSA model
    elif cache is not None:
        import torch

        torch.save(peft_model.state_dict(), cache + ".tmp")
        os.replace(cache + ".tmp", cache)
    peft_model.train()
    return peft_model


def balora_config(args: argparse.Namespace):
    from balora_plugins import BALoRAConfig

    extra = {} if args.chunk_size is None else {"chunk_size": args.chunk_size}
    return BALoRAConfig.from_preset(
        "iclr2026-nlg", consistency_schedule="constant", regularizer_schedule="constant", **extra
    )


# ---------------------------------------------------------------------------------------------- measuring
def _sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss_window_start() -> int | None:
    """Reset the process's peak-RSS mark (Linux ``clear_refs``) and return the current RSS, else None."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _proc_status_bytes("VmRSS")


class MemoryMeter:
    """Peak live tensor bytes allocated after :meth:`start`, above what was live then.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the allocation/free trace of ``torch.profiler``
    (``profile_memory=True``) — only between :meth:`start` and :meth:`stop`, so the profiler's overhead stays
    out of the timed steps. Also the growth of the process's peak RSS (meaningful in a fresh process).
    """

    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda")
        self.device = device
        self._prof = None
        self.peak: int | None = None
        self.rss_start: int | None = None

    def start(self) -> None:
        import torch

        self.rss_start = _rss_window_start()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()

    def stop(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = int(torch.cuda.max_memory_allocated(self.device) - self._base)
            return self.peak
        self._prof.__exit__(None, None, None)
        self.peak = peak_from_trace(self._prof)
        self._prof = None
        return self.peak

    def rss_growth(self) -> int | None:
        """Peak RSS since :meth:`start` minus the RSS then (Linux; None elsewhere)."""
        hwm = _proc_status_bytes("VmHWM")
        return None if hwm is None or self.rss_start is None else hwm - self.rss_start


def peak_from_trace(prof) -> int:
    """Peak of the running sum of CPU allocation sizes (frees are negative) in a ``torch.profiler`` trace."""
    from torch._C._profiler import _EventType

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        stack.extend(ev.children)
        if ev.tag == _EventType.Allocation and str(ev.extra_fields.device).startswith("cpu"):
            events.append((ev.start_time_ns, int(ev.extra_fields.alloc_size)))
    events.sort()
    cur = peak = 0
    for _, size in events:
        cur += size
        peak = max(peak, cur)
    return peak


def _clock_name(device: str) -> str:
    return "wall" if str(device).startswith("cuda") else "cpu"


def _timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """Seconds ``fn()`` takes on the clock of the term timings: this process's CPU time on CPU (robust to other
    processes on the cores), synchronised wall time on CUDA."""
    clock = time.perf_counter if _clock_name(device) == "wall" else time.process_time
    _sync(device)
    t0 = clock()
    out = fn()
    _sync(device)
    return clock() - t0, out


# ---------------------------------------------------------------------------------------------- the variants
def authors_regularizer(student_logits, ref_logits, labels, cfg) -> tuple[Any, dict[str, float]]:
    """The three NLG terms as ``llm172/BA-LoRA`` ``train.py`` computes them, on full (B, T, V) logits.

    Mask ``labels != -100`` without the next-token shift; tempered KL on every position, masked afterwards;
    top-K entropy of the masked rows; SVD share with ``torch.svd_lowrank(q=k+5, niter=2)`` when |V| > 4096 and
    k < min(M, V), over the Frobenius norm (exact ``svdvals`` otherwise).
    """
    import torch
    import torch.nn.functional as F

    metrics: dict[str, float] = {}
    total = student_logits.new_zeros((), dtype=torch.float32)
    t = cfg.temperature
    log_p_ft = F.log_softmax(student_logits / t, dim=-1)
    p_pt = F.softmax(ref_logits / t, dim=-1)
    kl_mask = (labels != -100).unsqueeze(-1)
    kl = (F.kl_div(log_p_ft, p_pt, reduction="none", log_target=False).sum(-1) * kl_mask.squeeze(-1)).sum()
    kl = kl / kl_mask.sum().clamp_min(1) * (t * t)
    total = total + cfg.lambda_consistency * kl
    metrics["consistency"] = float(kl.detach())

    mask = labels != -100
    valid = student_logits[mask]
    k_ent = min(cfg.diversity_top_k, valid.size(-1)) if cfg.diversity_top_k > 0 else valid.size(-1)
    top = torch.topk(valid, k_ent, dim=-1).values
    logp = F.log_softmax(top, dim=-1)
    ent = -(torch.exp(logp) * logp).sum(-1)
    total = total + cfg.lambda_diversity * (-ent.mean())
    metrics["diversity"] = float(-ent.mean().detach())

    valid = student_logits.view(-1, student_logits.size(-1))[mask.view(-1)]
    k = min(cfg.svd_top_k, min(valid.shape))
    if valid.shape[-1] > 4096 and k < min(valid.shape):
        q = min(min(valid.shape), k + 5)
        _, s, _ = torch.svd_lowrank(valid.float(), q=q, niter=2)
        top_sv = s[:k].sum()
        norm = torch.linalg.matrix_norm(valid.float(), ord="fro")
    else:
        s = torch.linalg.svdvals(valid.float())
        top_sv = s[:k].sum()
        norm = torch.sqrt((s * s).sum())
    svd = -(top_sv / norm)
    total = total + cfg.lambda_svd * svd
    metrics["svd"] = float(svd.detach())
    return total, metrics


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build, warm up and time one variant in this process; returns its measurements."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    say = lambda msg: _log(args, f"({variant}) {msg}")  # noqa: E731
    t_build = time.perf_counter()
    base = build_model(args)
    vocab = base.get_output_embeddings().weight.shape[0]
    model = add_pissa(base, args)
    batch = make_batch(args, vocab)
    say(
        f"model ready in {time.perf_counter() - t_build:.1f} s ({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M "
        f"params, {args.batch}×{args.seq_len} tokens, r={args.rank}); measuring memory"
    )
    meter = MemoryMeter(args.device)
    meter.start()
    cfg = balora_config(args)
    objective = ref_model = None
    if variant == "b":
        from balora_plugins.core import BALoRAObjective

        objective = BALoRAObjective(cfg).prepare(model)
    elif variant == "c":
        ref_model = build_model(args).requires_grad_(False)  # same seed: the pre-trained weights
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    last: dict[str, float] = {}

    def step() -> None:
        out = model(**batch)
        loss = out.loss
        if variant == "b":
            reg, metrics = objective.compute(model, batch)
            loss = loss + reg.to(loss.dtype)
            last.update(
                {k.split("/", 1)[1]: v for k, v in metrics.items() if not k.startswith("balora/lambda")}
            )
        elif variant == "c":
            with torch.no_grad():
                ref_logits = ref_model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
            reg, metrics = authors_regularizer(out.logits, ref_logits, batch["labels"], cfg)
            loss = loss + reg.to(loss.dtype)
            last.update(metrics)
            del ref_logits
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        last["loss"] = float(loss.detach())

    times: list[float] = []
    cpu_times: list[float] = []
    for i in range(args.warmup + args.steps):
        _sync(args.device)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        step()
        _sync(args.device)
        dt, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        if i == 0:
            peak = meter.stop()
            say(f"warm-up step 1 (memory traced) {dt:.2f} s, peak {peak / 2**20:.0f} MiB")
        elif i < args.warmup:
            say(f"warm-up step {i + 1} {dt:.2f} s")
        else:
            times.append(dt)
            cpu_times.append(cpu)
            say(f"step {len(times)}/{args.steps} {dt:.2f} s (CPU {cpu:.2f} s)")
    result: dict[str, Any] = {
        "variant": variant,
        "name": VARIANTS[variant],
        "step_s": statistics.median(times),
        "step_s_all": times,
        "step_cpu_s": statistics.median(cpu_times),
        "step_cpu_s_all": cpu_times,
        "clock": _clock_name(args.device),
        "peak_mem_bytes": meter.peak,
        "rss_growth_bytes": meter.rss_growth(),
        "last": last,
        "vocab": vocab,
        "hidden": base.get_output_embeddings().weight.shape[1],
        "tokens": args.batch * args.seq_len,
    }
    if variant == "b":
        result["terms"] = term_timings(model, objective, batch, args, say)
    return result


def term_timings(model, objective, batch, args, say) -> dict[str, float]:
    """Median time of each of (b)'s terms on its micro-batch: forward and gradient w.r.t. the hidden rows.

    consistency = reference forward + chunked KL; diversity = chunked top-K entropy; svd = Gram-factor SVD
    share (factor cached, as in training; ``gram_factor_s`` is its one-off cost); ``fused_rows`` = the one
    chunked pass that computes consistency and diversity together, as training runs them.
    """
    import torch

    from balora_plugins.core import clear_factor_cache

    rounds = [_term_round(model, objective, batch, args.device) for _ in range(args.term_reps)]
    out = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    out["consistency"] = out["reference_forward"] + out["kl_rows"]
    say(f"term timings done ({args.term_reps} repetitions)")
    clear_factor_cache()
    with torch.no_grad():
        out["gram_factor_s"] = _timed(objective.head.gram_factor, args.device)[0]
    return out


def _term_round(model, objective, batch, device: str) -> dict[str, float]:
    import torch

    from balora_plugins.core import HiddenView, chunked_row_terms

    terms = {t.name: t for t in objective.terms}
    kl, ent = terms["consistency"].row_kernel(), terms["diversity"].row_kernel()
    head, chunk = objective.head, objective.config.chunk_size
    with torch.no_grad():
        model(**batch)  # fills the objective's hidden-state capture
    hidden = objective.captured_hidden
    mask = objective.valid_mask(batch, hidden)
    rows = hidden[mask].detach().requires_grad_(True)
    t: dict[str, float] = {}
    t["reference_forward"], ref_rows = _timed(lambda: objective.reference_hidden(model)[mask], device)
    objective.release_capture()

    def with_grad(fn):
        return _timed(lambda: torch.autograd.grad(fn(), rows), device)[0]

    t["kl_rows"] = with_grad(lambda: chunked_row_terms(rows, ref_rows, head, [kl], [1.0], chunk)[0])
    t["diversity"] = with_grad(lambda: chunked_row_terms(rows, None, head, [ent], [1.0], chunk)[0])
    t["fused_rows"] = with_grad(
        lambda: chunked_row_terms(rows, ref_rows, head, [kl, ent], [1.0, 1.0], chunk)[0]
    )
    t["svd"] = with_grad(lambda: terms["svd"].matrix(HiddenView(rows, head)))
    return t


def run_regularizers(args: argparse.Namespace, rows: int, vocab: int, hidden: int) -> dict[str, Any]:
    """The regularizers alone on (M, d) hidden states: fused path vs the plain-logits path.

    Plain: Z = H·Wᵀ and Z_ref (M, |V|) materialised, the functional consistency and top-K entropy, and the
    SVD share by ``torch.svd_lowrank`` (q = k+5, 2 iterations; exact ``svdvals`` of an (M, |V|) matrix is out
    of reach) over ‖Z‖_F. Fused: :func:`chunked_row_terms` + the Gram-factor SVD. Both with the gradient
    w.r.t. H; the peak counts what is allocated above H, H_ref and W.
    """
    import torch

    from balora_plugins import functional as Fn
    from balora_plugins.core import (
        Consistency,
        EntropyDiversity,
        HiddenView,
        OutputHead,
        SVDShare,
        chunked_row_terms,
        clear_factor_cache,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = balora_config(args)
    dtype = _torch_dtype(args)
    g = torch.Generator().manual_seed(args.seed + 2)
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).to(args.device, dtype)
    h = torch.randn(rows, hidden, generator=g).to(args.device, dtype).requires_grad_(True)
    h_ref = (h.detach() + 0.05 * torch.randn(rows, hidden, generator=g).to(args.device, dtype)).detach()
    head = OutputHead(weight=w)
    kl, ent, svd = Consistency(cfg).row_kernel(), EntropyDiversity(cfg).row_kernel(), SVDShare(cfg)
    lam = (cfg.lambda_consistency / rows, cfg.lambda_diversity / rows)

    def plain_kl():
        z, zr = head.logits(h), head.logits(h_ref)
        return cfg.lambda_consistency * Fn.consistency_loss(z, zr, temperature=cfg.temperature)

    def plain_svd():
        z = head.logits(h)
        _, s, _ = torch.svd_lowrank(z, q=cfg.svd_top_k + 5, niter=2)
        return cfg.lambda_svd * -(s[: cfg.svd_top_k].sum() / z.norm())

    def plain_all():
        z, zr = head.logits(h), head.logits(h_ref)
        loss = cfg.lambda_consistency * Fn.consistency_loss(z, zr, temperature=cfg.temperature)
        loss = loss + cfg.lambda_diversity * Fn.diversity_loss(z, top_k=cfg.diversity_top_k)
        _, s, _ = torch.svd_lowrank(z, q=cfg.svd_top_k + 5, niter=2)
        return loss + cfg.lambda_svd * -(s[: cfg.svd_top_k].sum() / z.norm())

    def fused_kl():
        return chunked_row_terms(h, h_ref, head, [kl], [lam[0]], cfg.chunk_size)[0]

    def fused_svd():
        return cfg.lambda_svd * svd.matrix(HiddenView(h, head))

    def fused_all():
        total = chunked_row_terms(h, h_ref, head, [kl, ent], list(lam), cfg.chunk_size)[0]
        return total + fused_svd()

    def with_grad(fn):
        def run():
            torch.autograd.grad(fn(), h)

        return run

    out: dict[str, Any] = {
        "rows": rows,
        "vocab": vocab,
        "hidden": hidden,
        "chunk_size": cfg.chunk_size,
        "clock": _clock_name(args.device),
    }
    fused_svd()  # Gram factor computed once, as in training
    for name, fn in (("plain", plain_all), ("fused", fused_all)):
        meter = MemoryMeter(args.device)
        meter.start()
        with_grad(fn)()
        out[f"{name}_peak_bytes"] = meter.stop()
    for name, fn in (
        ("plain_kl", plain_kl),
        ("plain_svd", plain_svd),
        ("fused_kl", fused_kl),
        ("fused_svd", fused_svd),
    ):
        times = [_timed(with_grad(fn), args.device)[0] for _ in range(max(args.term_reps, 1))]
        out[f"{name}_s"] = statistics.median(times)
    _log(
        args,
        f"(regularizers) fused {out['fused_peak_bytes'] / 2**20:.0f} MiB vs plain "
        f"{out['plain_peak_bytes'] / 2**20:.0f} MiB",
    )
    clear_factor_cache()
    return out


# ---------------------------------------------------------------------------------------------- orchestration
def _forward_args(argv: Sequence[str]) -> list[str]:
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


def _in_subprocess(job: str, argv: Sequence[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="balora-bench-") as tmp:
        path = os.path.join(tmp, "result.json")
        cmd = [
            sys.executable,
            "-m",
            "balora_plugins.tools.bench",
            *_forward_args(argv),
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


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    if args.worker == "regularizers":
        s = model_shape(args)
        return run_regularizers(args, args.batch * args.seq_len, s["vocab"], s["hidden"])
    return run_variant(args.worker, args)


def ratio(x: float | None, y: float | None) -> float | None:
    """x / y, or None when either is missing or y is not positive."""
    if x is None or y is None or not y > 0:
        return None
    return x / y


def summarise(
    results: dict[str, dict[str, Any]], regs: dict[str, Any] | None, meta: dict[str, Any]
) -> dict[str, Any]:
    """The JSON document: per-variant medians, the ratios b/a, c/a, c/b, (b)'s terms, targets."""

    def get(v, key):
        return results.get(v, {}).get(key)

    ratios: dict[str, dict[str, float | None]] = {}
    for metric, key in (
        ("step_time", "step_s"),
        ("step_cpu_time", "step_cpu_s"),
        ("peak_memory", "peak_mem_bytes"),
        ("rss_growth", "rss_growth_bytes"),
    ):
        ratios[metric] = {
            "b/a": ratio(get("b", key), get("a", key)),
            "c/a": ratio(get("c", key), get("a", key)),
            "c/b": ratio(get("c", key), get("b", key)),
        }
    doc: dict[str, Any] = {"meta": meta, "variants": results, "ratios": ratios}
    terms = get("b", "terms")
    if terms:
        step_b = get("b", "step_cpu_s" if get("b", "clock") == "cpu" else "step_s")
        terms = {**terms, "clock": get("b", "clock")}
        doc["terms"] = {
            **terms,
            "shares": {
                k: ratio(terms[k], step_b)
                for k in ("consistency", "reference_forward", "kl_rows", "diversity", "fused_rows", "svd")
            },
            "svd_share": ratio(terms["svd"], step_b),
        }
    if regs:
        doc["regularizers"] = {
            **regs,
            "fused/plain": ratio(regs["fused_peak_bytes"], regs["plain_peak_bytes"]),
            "svd/kl": ratio(regs["fused_svd_s"], regs["fused_kl_s"]),
        }
    doc["targets"] = check_targets(doc)
    return doc


def check_targets(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{label: {"value", "met"}}`` for every target whose figure this run measured."""
    out = {}
    for label, (section, key, op, bound) in TARGETS.items():
        sec = doc["ratios"].get(section) if section in doc["ratios"] else doc.get(section)
        value = sec.get(key) if isinstance(sec, dict) else None
        if value is not None:
            out[label] = {"value": value, "met": bool(_COMPARE[op](value, bound))}
    return out


def _mib(b: int | None) -> str:
    return "—" if b is None else f"{b / 2**20:,.0f}"


def _x(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}×"


def format_table(doc: dict[str, Any]) -> str:
    """The terminal table of a :func:`summarise` document."""
    meta, res, rat = doc["meta"], doc["variants"], doc["ratios"]
    lines = [
        f"balora bench — {meta['model']} · {meta['tokens']} tokens/micro-batch ({meta['batch']}×{meta['seq_len']}) · "
        f"r=α={meta['rank']} · {meta['device']} {meta['dtype']} · {meta['threads']} thread(s) · "
        f"median of {meta['steps']} steps after {meta['warmup']} warm-up",
        "",
        f"{'variant':<52} {'step s':>8} {'CPU s':>8} {'peak MiB':>9} {'RSS MiB':>8}",
    ]
    for v in VARIANTS:
        if v in res:
            r = res[v]
            lines.append(
                f"({v}) {r['name']:<48} {r['step_s']:>8.2f} {r['step_cpu_s']:>8.2f} {_mib(r['peak_mem_bytes']):>9} "
                f"{_mib(r['rss_growth_bytes']):>8}"
            )
    lines.append("")
    lines.append(f"{'ratio':<10} {'step time':>10} {'CPU time':>10} {'peak mem':>10} {'RSS':>8}")
    for k in ("b/a", "c/a", "c/b"):
        lines.append(
            f"{k:<10} {_x(rat['step_time'][k]):>10} {_x(rat['step_cpu_time'][k]):>10} "
            f"{_x(rat['peak_memory'][k]):>10} {_x(rat['rss_growth'][k]):>8}"
        )
    if "terms" in doc:
        t = doc["terms"]
        lines += [
            "",
            f"terms inside (b), forward + gradient w.r.t. the hidden rows ({t['clock']} s)   seconds   share of (b) step",
        ]
        for key, label in (
            ("consistency", "consistency (reference forward + chunked KL)"),
            ("reference_forward", "  of which reference forward"),
            ("kl_rows", "  of which chunked KL"),
            ("diversity", "diversity (chunked top-K entropy)"),
            ("svd", "SVD share (Gram factor, cached)"),
            ("fused_rows", "consistency + diversity in one chunked pass (as run)"),
        ):
            lines.append(f"{label:<66} {t[key]:>7.3f}   {_pct(t['shares'][key])}")
        lines.append(f"{'Gram factor (once per head, cached)':<66} {t['gram_factor_s']:>7.3f}")
    if "regularizers" in doc:
        g = doc["regularizers"]
        lines += [
            "",
            f"regularizers alone, M={g['rows']} rows, |V|={g['vocab']}, d={g['hidden']}, chunk {g['chunk_size']}:",
            f"  extra peak memory: fused {_mib(g['fused_peak_bytes'])} MiB vs plain logits {_mib(g['plain_peak_bytes'])}"
            f" MiB ({_x(g['fused/plain'])})",
            f"  KL term ({g['clock']} s): fused {g['fused_kl_s']:.3f}, plain {g['plain_kl_s']:.3f}; "
            f"SVD term: fused {g['fused_svd_s']:.3f}, plain (randomised) {g['plain_svd_s']:.3f}",
        ]
    b, c = res.get("b", {}).get("last"), res.get("c", {}).get("last")
    if b and c:
        lines += [
            "",
            "term values, same maths (b: shifted mask, exact SVD; c: unshifted mask, randomised SVD):",
        ]
        lines.append(
            "  " + ", ".join(f"{k} {b[k]:.5g} vs {c[k]:.5g}" for k in ("consistency", "diversity", "svd"))
        )
    if doc["targets"]:
        lines += ["", "targets (defined on the default CPU configuration):"]
        for label, t in doc["targets"].items():
            v = t["value"]
            shown = f"{v:.1%}" if "%" in label else f"{v:.3f}"
            lines.append(f"  [{'met' if t['met'] else 'MISSED'}] {label}: {shown}")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:6.1%}"


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    s = model_shape(args)
    model = args.model or (
        f"random {args.shape} (d={s['hidden']}, {s['layers']} layers, {s['heads']}/{s['kv_heads']} heads, "
        f"ffn {s['intermediate']}, |V|={s['vocab']}, tied)"
    )
    dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[_torch_dtype(args)]
    return {
        "model": model,
        "shape": s,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "tokens": args.batch * args.seq_len,
        "prompt_frac": args.prompt_frac,
        "rank": args.rank,
        "alpha": args.alpha if args.alpha is not None else args.rank,
        "chunk_size": balora_config(args).chunk_size,
        "device": args.device,
        "dtype": dtype,
        "threads": args.threads or torch.get_num_threads(),
        "warmup": args.warmup,
        "steps": args.steps,
        "in_process": bool(args.in_process),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "memory": "peak live tensor bytes above the built PiSSA model (CUDA allocator / torch.profiler trace on CPU); "
        "RSS = growth of the process's peak RSS (subprocess runs only)",
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``balora bench`` and ``python -m balora_plugins.tools.bench``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    _validate(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        result = _worker(args)
        with open(args.worker_out, "w") as f:
            json.dump(result, f)
        return 0
    if args.in_process and not str(args.device).startswith("cuda"):
        _log(args, "in-process run: the RSS column is not measured (the process's peak RSS never goes down)")
    cache = tempfile.TemporaryDirectory(prefix="balora-bench-model-")  # the PiSSA model, built once
    args.model_cache = cache.name
    run = (
        (lambda job: _worker(_with(args, worker=job)))
        if args.in_process
        else (lambda job: _in_subprocess(job, [*argv, "--model-cache", cache.name]))
    )
    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    regs = None
    try:
        for v in VARIANTS:
            if v in args.variants:
                _log(args, f"variant ({v}) {VARIANTS[v]} ...")
                results[v] = run(v)
                if args.in_process:
                    results[v]["rss_growth_bytes"] = None
        if not args.no_regularizers:
            _log(args, "regularizers alone: fused vs plain logits ...")
            regs = run("regularizers")
    finally:
        cache.cleanup()
    doc = summarise(results, regs, {**_meta(args), "wall_s": None})
    doc["meta"]["wall_s"] = round(time.perf_counter() - t0, 1)
    print(format_table(doc))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(doc, f, indent=2)
        _log(args, f"wrote {args.json_path}")
    return 0


def _with(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    new = argparse.Namespace(**vars(args))
    for k, v in changes.items():
        setattr(new, k, v)
    return new


if __name__ == "__main__":
    sys.exit(main())
