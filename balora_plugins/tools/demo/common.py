"""Pieces both demo tasks share: a method's adapter and BA-LoRA configurations, each seed's initialisations
(computed once), the host trainer's arguments, a progress bar, quiet hosts, the training call (which saves what
``balora report`` and ``balora export`` read), the loop over seeds and methods, the logits' spectrum and the
run records of ``results.json``."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from .settings import LABELS, PISSA_INIT, TERMS, DemoSettings, Method

NLG_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NLU_TARGETS = ["query", "key", "value", "dense"]


def tqdm():
    from tqdm.auto import tqdm as bar

    return bar


def lora_config(method: Method, s: DemoSettings):
    """The PEFT LoraConfig of ``method``: rank r, α = r, no dropout, all attention and MLP projections."""
    from peft import LoraConfig

    return LoraConfig(
        r=s.rank,
        lora_alpha=s.rank,
        lora_dropout=0.0,
        bias="none",
        target_modules=NLG_TARGETS if s.task == "nlg" else NLU_TARGETS,
        task_type="CAUSAL_LM" if s.task == "nlg" else "SEQ_CLS",
        init_lora_weights=True if method.init == "lora" else PISSA_INIT,
    )


def preset_config(s: DemoSettings, num_classes: int | None = None, log: Callable = print):
    """The preset's BALoRAConfig; for NLU with ``svd_top_k >= num_classes`` the SVD share is identically 1 (no
    gradient), so k drops to ``num_classes − 1`` with a note."""
    from balora_plugins import BALoRAConfig

    cfg = BALoRAConfig.from_preset(s.preset)
    if num_classes is not None and cfg.svd_top_k >= num_classes and cfg.lambda_svd > 0:
        log(
            f"Note: preset {s.preset} has svd_top_k={cfg.svd_top_k} >= {num_classes} classes, which makes the SVD "
            f"term identically 1 (no gradient); the demo uses svd_top_k={num_classes - 1}."
        )
        cfg = BALoRAConfig.from_preset(s.preset, svd_top_k=num_classes - 1)
    return cfg


class Initialiser:
    """The adapted models of one seed: each initialisation (LoRA, PiSSA) is computed once, under
    ``torch.manual_seed(seed)``, and handed to every method that uses it — a copy for all but the last user.
    PiSSA's randomised SVD of SmolLM2's 210 projections costs about as much as a training step (docs/cli.md),
    and sharing it makes PiSSA and BA-LoRA start from bit-identical adapters."""

    def __init__(self, base, methods: Sequence[Method], s: DemoSettings, seed: int):
        self.base, self.s, self.seed = base, s, seed
        self.left = {init: sum(m.init == init for m in methods) for init in {m.init for m in methods}}
        self.ready: dict[str, Any] = {}

    def model(self, method: Method):
        """A fresh PEFT model with ``method``'s initialisation (the base model is never modified)."""
        import copy

        import torch
        from peft import get_peft_model

        if method.init not in self.ready:
            torch.manual_seed(self.seed)
            self.ready[method.init] = get_peft_model(copy.deepcopy(self.base), lora_config(method, self.s))
        self.left[method.init] -= 1
        if self.left[method.init] == 0:
            return self.ready.pop(method.init)
        return copy.deepcopy(self.ready[method.init])


def run_seeds(
    s: DemoSettings,
    base,
    base_eval: dict[str, Any],
    timings: dict[str, float],
    seed_data: Callable[[int], Any],
    make_trainer: Callable[[Method, Any, str, int, Any], tuple[Any, Callable[[str], None] | None]],
    evaluate: Callable[[Any, str, Any], dict[str, Any]],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Train and evaluate every method on every seed — the loop both tasks share.

    ``seed_data(seed)`` builds what the seed's runs share (training set, flipped labels, ...);
    ``make_trainer(method, model, run_dir, seed, data)`` returns the host trainer and its save function (None:
    ``trainer.save_model``); ``evaluate(model, name, data)`` returns ``{"metrics", "spectrum"[, "samples"]}``.
    Every method of a seed gets the same initialisation (:class:`Initialiser`) and the same data order (the
    seed is the trainer's ``seed`` and ``data_seed``). ``base_eval`` is the base model's evaluation (its
    spectrum and samples move beside the tuned models'); ``timings`` gains one entry per run.

    Returns the results' ``base``, ``runs`` (one :func:`run_record` per seed and method, in order), the base's
    and the first seed's ``spectra`` and ``samples``, and ``timings``.
    """
    runs: list[dict[str, Any]] = []
    spectra = {"base": base_eval.pop("spectrum")}
    samples = {"base": base_eval.pop("samples", [])}
    for seed in s.seed:
        data = seed_data(seed)
        initialiser = Initialiser(base, s.method_objects, s, seed)
        for method in s.method_objects:
            run_dir = os.path.join(s.out, f"seed{seed}", method.name)
            name = run_label(method, seed)
            t0 = time.perf_counter()
            with quiet():
                trainer, save = make_trainer(method, initialiser.model(method), run_dir, seed, data)
                info = train(trainer, method, run_dir, f"train {name}", seed == s.seed[0], save)
                e0, c0 = time.perf_counter(), time.process_time()
                result = evaluate(trainer.model, name, data)
                info.update(eval_seconds=time.perf_counter() - e0, eval_cpu_seconds=time.process_time() - c0)
            result["metrics"].update(info)
            runs.append(run_record(seed, method, result["metrics"], run_dir, s.out))
            if seed == s.seed[0]:
                spectra[method.name] = result["spectrum"]
                samples[method.name] = result.get("samples", [])
            timings[f"seed{seed}/{method.name}"] = time.perf_counter() - t0
            log(progress_line(seed, method, result["metrics"]))
            del trainer, result
    return {"base": base_eval, "runs": runs, "spectra": spectra, "samples": samples, "timings": timings}


def method_config(cfg, method: Method):
    """``cfg`` with the weight of every term ``method`` switches off set to 0 (an ablation) and the method's own
    settings; None: no BA-LoRA."""
    if not method.regularized:
        return None
    changes = {f"lambda_{t}": 0.0 for t in TERMS if t not in method.terms} | dict(method.settings)
    return dataclasses.replace(cfg, **changes) if changes else cfg  # replace() validates again


def precomputed_config(cfg, reference_path: str):
    """``cfg`` reading its reference from the store ``balora reference`` wrote at ``reference_path``."""
    return dataclasses.replace(cfg, reference="precomputed", reference_path=reference_path)


def common_args(s: DemoSettings, run_dir: str, seed: int) -> dict[str, Any]:
    """Host TrainingArguments shared by both tasks; ``seed`` fixes the data order (and dropout, none here)."""
    return dict(
        output_dir=run_dir,
        max_steps=s.steps,
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=s.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, s.steps // 10),
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=s.device == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def progress_bar(desc: str):
    """A tqdm bar callback for a transformers Trainer (replaces its ProgressCallback, which prints every log)."""
    from transformers import TrainerCallback

    class ProgressBar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.bar = tqdm()(total=state.max_steps, desc=desc, unit="step", dynamic_ncols=True, leave=False)

        def on_step_end(self, args, state, control, **kw):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            post = {
                k: f"{logs[k]:.4g}" for k in ("loss", "balora/loss") if isinstance(logs.get(k), float | int)
            }
            if post:
                self.bar.set_postfix(post, refresh=False)

        def on_train_end(self, args, state, control, **kw):
            self.bar.close()

    return ProgressBar()


def train(
    trainer,
    method: Method,
    run_dir: str,
    desc: str,
    save_adapter: bool,
    save_model: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Train with a progress bar; save the logs (``trainer_state.json``) and, when ``save_adapter``, the adapter
    (with its step-0 copy for PiSSA, which ``balora export`` needs; BA-LoRA saves its own).

    Returns the training wall time, CPU time (this process, all threads) and their per-step values.
    """
    from transformers.trainer_callback import ProgressCallback

    from balora_plugins.core import INITIAL_DIR, has_residual_base, save_initial_adapter, unwrap

    adapter_dir = os.path.join(run_dir, "adapter")
    peft_model = unwrap(trainer.model)
    if save_adapter and not method.regularized and has_residual_base(peft_model):
        save_initial_adapter(peft_model, os.path.join(adapter_dir, INITIAL_DIR), adapter_name="default")
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(progress_bar(desc))
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if save_adapter:
        (save_model or trainer.save_model)(adapter_dir)
    trainer.state.save_to_json(os.path.join(run_dir, "trainer_state.json"))
    steps = max(trainer.state.global_step, 1)
    return {
        "train_seconds": seconds,
        "train_cpu_seconds": cpu,
        "seconds_per_step": seconds / steps,
        "cpu_seconds_per_step": cpu / steps,
    }


@contextlib.contextmanager
def quiet():
    """Silence the hosts' info/warning chatter (the demo prints its own progress)."""
    import warnings

    import datasets
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    ds_bars = datasets.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if ds_bars:
        datasets.disable_progress_bars()  # TRL's per-map bars; the demo shows one bar per phase
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)
            if ds_bars:
                datasets.enable_progress_bars()


def pad(seqs: Sequence[list[int]], value: int, left: bool = False):
    """(B, T) long tensor of ``seqs`` padded with ``value`` (right, or left for generation) and its mask."""
    import torch

    width = max(len(x) for x in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, x in enumerate(seqs):
        sl = slice(width - len(x), width) if left else slice(0, len(x))
        out[i, sl] = torch.tensor(x, dtype=torch.long)
        mask[i, sl] = 1
    return out, mask


def run_label(method: Method, seed: int) -> str:
    return f"{LABELS[method.name]:8s} seed {seed}"


def spectrum(view, cfg) -> tuple[list[float], float]:
    """All singular values of the logits a view stands for (descending), and the SVD term's top-k share
    Σ_{i≤k} σ_i / norm (``functional.svd_share`` with the config's k, norm and eps)."""
    import torch

    from balora_plugins.functional import svd_share

    sv = view.singular_values().double()
    fro = view.frobenius().double() if cfg.resolved_svd_norm == "frobenius" else None
    share = -svd_share(sv, k=cfg.svd_top_k, norm=cfg.resolved_svd_norm, eps=cfg.eps, frobenius=fro)
    return [float(x) for x in sv.to(torch.float64)], float(share)


def run_record(seed: int, method: Method, metrics: dict[str, Any], run_dir: str, out: str) -> dict[str, Any]:
    """One entry of ``results.json``'s ``runs``: seed, method, metrics and the log's path relative to ``out``."""
    return {
        "seed": seed,
        "method": method.name,
        "metrics": metrics,
        "log": os.path.relpath(os.path.join(run_dir, "trainer_state.json"), out),
    }


def progress_line(seed: int, method: Method, m: dict[str, Any]) -> str:
    """The line printed after each run: its headline metrics and what it cost."""
    keys = [
        ("answer_nll", "answer NLL"),
        ("news_nll", "news NLL"),
        ("news_kl", "news KL"),
        ("exact_match", "exact match"),
        ("accuracy", "accuracy"),
        ("macro_f1", "macro-F1"),
        ("noisy_fit", "noisy-label fit"),
    ]
    parts = [f"{text} {m[k]:.4g}" for k, text in keys if k in m]
    cost = f"train {m['train_seconds']:.0f} s ({m['train_cpu_seconds']:.0f} CPU-s)"
    if "eval_seconds" in m:
        cost += f", eval {m['eval_seconds']:.0f} s"
    return f"  seed {seed} {LABELS[method.name]}: " + ", ".join(parts) + f"  [{cost}]"
