"""The NLU reference cache (`BALoRAConfig.reference_cache`): its keys, its bookkeeping, and training with it
against training without it (the same reference logits, so the same terms, step for step)."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, lora, tiny_bert_classifier

from balora_plugins import BALoRAConfig
from balora_plugins.core import BALoRAObjective
from balora_plugins.core.refcache import ReferenceCache, example_keys, reference_state, select_rows

NUM_LABELS = 4
BERT_TARGETS = ("query", "key", "value", "dense")
NLU = dict(task="nlu", lambda_consistency=1.0, lambda_diversity=0.2, lambda_svd=0.2, svd_top_k=2)


def _batch(n=6, t=10, seed=0, pad=None):
    """``n`` random examples; ``pad`` = (row, count) pads that row on the right with ``count`` masked tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, t), generator=g)
    mask = torch.ones_like(ids)
    if pad is not None:
        row, count = pad
        ids[row, -count:] = 0
        mask[row, -count:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


class Counting:
    """A stand-in reference forward: logits from the tokens at the attended positions, counting the rows it sees."""

    def __init__(self):
        self.rows = 0
        self.calls = 0

    def __call__(self, inputs):
        self.calls += 1
        self.rows += inputs["input_ids"].shape[0]
        x = (inputs["input_ids"] * inputs["attention_mask"]).float()
        return torch.stack([x.sum(1), x.pow(2).sum(1), x[:, 0], torch.ones(x.shape[0])], dim=1)


# ---------------------------------------------------------------------------------------------- keys
def test_keys_tell_examples_apart_and_ignore_right_padding_length():
    a = _batch()
    keys = example_keys(a)
    assert len(set(keys)) == 6 and all(len(k) == 16 for k in keys)
    assert example_keys(a) == keys  # deterministic
    # the same examples padded on the right to a longer batch: the same keys
    longer = {k: torch.cat([v, torch.zeros(6, 3, dtype=v.dtype)], dim=1) for k, v in a.items()}
    assert example_keys(longer) == keys
    # one token changed, a token type changed, or the tokens moved (left padding): other keys
    changed = {k: v.clone() for k, v in a.items()}
    changed["input_ids"][2, 4] += 1
    changed["token_type_ids"][3, 1] = 1
    left = {k: torch.cat([torch.zeros(6, 2, dtype=v.dtype), v], dim=1) for k, v in a.items()}
    left["input_ids"][:, :2] = 0
    new = example_keys(changed)
    assert [n == k for n, k in zip(new, keys)] == [True, True, False, False, True, True]
    assert not set(example_keys(left)) & set(keys)
    # a non-tensor forward argument enters every key
    assert not set(example_keys({**a, "output_hidden_states": True})) & set(keys)


# ---------------------------------------------------------------------------------------------- the cache
def test_cache_computes_each_example_once_and_returns_its_exact_logits():
    cache, ref = ReferenceCache(), Counting()
    a, b = _batch(seed=0), _batch(seed=1)
    first = cache.logits(a, ref)
    torch.testing.assert_close(first, Counting()(a), rtol=0, atol=0)
    assert (ref.rows, cache.hits, cache.misses, len(cache)) == (6, 0, 6, 6)
    again = cache.logits(a, ref)  # the second epoch: no reference forward
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert (ref.calls, cache.hits) == (1, 6)
    # a mixed batch: 3 seen examples, 3 new ones -> only the new rows run, in their order
    mixed = {k: torch.cat([a[k][[4, 0, 2]], b[k][[5, 1, 3]]]) for k in a}
    out = cache.logits(mixed, ref)
    torch.testing.assert_close(out, Counting()(mixed), rtol=0, atol=0)
    assert (ref.calls, ref.rows, len(cache)) == (2, 9, 9)
    assert cache.nbytes == 9 * 4 * 4  # 9 examples × D = 4 fp32 logits
    # growing past the first buffer keeps every row
    for s in range(2, 40):
        cache.logits(_batch(n=8, seed=s), ref)
    torch.testing.assert_close(cache.logits(a, ref), first, rtol=0, atol=0)
    assert len(cache) == 9 + 38 * 8


def test_cache_is_emptied_when_the_reference_changes():
    cache, ref = ReferenceCache(), Counting()
    a = _batch()
    cache.logits(a, ref, state=(3, 0))
    cache.logits(a, ref, state=(3, 0))
    assert ref.calls == 1
    cache.logits(a, ref, state=(3, 1))  # e.g. the initial adapter loaded from a checkpoint
    assert ref.calls == 2 and len(cache) == 6


def test_reference_state_follows_frozen_parameters_only():
    model = lora(
        tiny_bert_classifier(num_labels=NUM_LABELS), init="pissa", targets=BERT_TARGETS, task_type="SEQ_CLS"
    )
    before = reference_state(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)  # an optimizer step: not the reference
    assert reference_state(model) == before
    with torch.no_grad():
        next(p for p in model.parameters() if not p.requires_grad).mul_(1.0)
    assert reference_state(model) != before


def test_select_rows_indexes_every_per_row_tensor():
    a = {**_batch(), "return_dict": True}
    sub = select_rows(a, [3, 1])
    assert sub["return_dict"] is True
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        torch.testing.assert_close(sub[k], a[k][[3, 1]])


def test_the_cache_is_nlu_only():
    with pytest.raises(
        ValueError, match=r"reference_cache=True applies to task='nlu' only.*reference_cache=False"
    ):
        BALoRAConfig(reference_cache=True)
    with pytest.raises(ValueError, match=r"reference_cache='yes' must be True or False"):
        BALoRAConfig(task="nlu", reference_cache="yes")
    assert BALoRAObjective(BALoRAConfig(task="nlu", reference_cache=True)).reference_cache is not None
    assert BALoRAObjective(BALoRAConfig(task="nlu")).reference_cache is None


# ---------------------------------------------------------------------------------------------- in training
def _train_nlu(cache: bool, epochs: int = 3) -> tuple[list[dict[str, float]], BALoRAObjective, list[float]]:
    """A few epochs over 3 micro-batches (the second right-padded shorter) with dropout on; returns per-step
    metrics, the objective and the final loss of every step."""
    model = lora(
        tiny_bert_classifier(seed=0, num_labels=NUM_LABELS),
        init="pissa",
        targets=BERT_TARGETS,
        task_type="SEQ_CLS",
    )
    obj = BALoRAObjective(BALoRAConfig(**NLU, reference_cache=cache)).prepare(model)
    data = [_batch(n=4, t=10, seed=s, pad=(1, 3)) for s in range(3)]
    data[1] = {k: v[:, :8] for k, v in data[1].items()}
    labels = [
        torch.randint(0, NUM_LABELS, (4,), generator=torch.Generator().manual_seed(s)) for s in range(3)
    ]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    torch.manual_seed(0)  # the same dropout masks in both runs
    history, losses = [], []
    model.train()
    for _ in range(epochs):
        for batch, y in zip(data, labels):
            out = model(**batch, labels=y)
            reg, metrics = obj.compute(model, {**batch, "labels": y}, logits=out.logits)
            loss = out.loss + reg
            loss.backward()
            opt.step()
            opt.zero_grad()
            history.append(metrics)
            losses.append(float(loss.detach()))
    return history, obj, losses


def test_training_with_the_cache_equals_training_without_it():
    plain, _, plain_losses = _train_nlu(cache=False)
    cached, obj, cached_losses = _train_nlu(cache=True)
    assert plain[-1]["balora/consistency"] > 1e-4  # the model moved away from the reference
    for p, c in zip(plain, cached):
        for key in ("balora/consistency", "balora/diversity", "balora/svd"):
            assert c[key] == pytest.approx(p[key], rel=1e-5, abs=1e-7), key
    assert cached_losses == pytest.approx(plain_losses, rel=1e-5)
    cache = obj.reference_cache
    assert (len(cache), cache.misses, cache.hits) == (12, 12, 24)  # each example's reference ran once
