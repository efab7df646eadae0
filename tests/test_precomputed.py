"""The precomputed top-k reference (``reference='precomputed'``, docs/precomputed_reference.md): the top-k KL kernel
against independent computations, the store against the online reference (k = |V|: equal to float precision),
packing / shuffling / padding, resuming, and every refusal by name."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import CONSTANT, VOCAB, lora, perturb, sft_args, tiny_llama, tiny_tokenizer

from balora_plugins import BALoRAConfig
from balora_plugins.core import (
    REF_ADAPTER,
    BALoRAObjective,
    KLRows,
    OutputHead,
    TopKRows,
    chunked_row_terms,
    precompute_reference,
)
from balora_plugins.core import precomputed as pc
from balora_plugins.functional import kl_rows

CONSISTENCY_ONLY = dict(lambda_consistency=1.0, lambda_diversity=0.0, lambda_svd=0.0, **CONSTANT)


def examples(n=6, seed=0, prompt=3, offset=8):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (offset + i,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def collate(exs, packed=False):
    """Right-padded batch of ``exs``, or one packed row (position_ids restart at each document, first label -100)."""
    if packed:
        ids = sum((e["input_ids"] for e in exs), [])
        labels = sum(([-100] + e["labels"][1:] for e in exs), [])
        pos = sum((list(range(len(e["input_ids"]))) for e in exs), [])
        return {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([pos]),
        }
    width = max(len(e["input_ids"]) for e in exs)
    ids = torch.zeros(len(exs), width, dtype=torch.long)
    labels = torch.full((len(exs), width), -100)
    attn = torch.zeros_like(ids)
    for r, e in enumerate(exs):
        n = len(e["input_ids"])
        ids[r, :n], labels[r, :n], attn[r, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}


def term_and_grad(model, cfg, batch):
    """The weighted regularizer loss on ``batch`` after a perturbation of the adapter, and its gradient."""
    m = copy.deepcopy(model)
    obj = BALoRAObjective(cfg).prepare(m)
    perturb(m)
    m.train()
    # use_cache=False: transformers keeps packed documents apart (block-diagonal attention) only without a cache
    m(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    loss, metrics = obj.compute(m, batch)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
    return loss.detach(), grad, m


@pytest.fixture
def store(tmp_path):
    base = tiny_llama()
    path = str(tmp_path / "ref")
    precompute_reference(base, examples(), path, top_k=VOCAB, shard_size=4, progress=False)
    return base, path


# ---------------------------------------------------------------------------------------------- the kernel
def _topk(zr, k, t):
    top, ids = zr.topk(k, dim=-1)
    lse = (zr / t).logsumexp(-1)
    tail = (zr / t).scatter(1, ids, float("-inf")).logsumexp(-1) - lse
    p = torch.softmax(zr / t, -1)
    return TopKRows(ids, top, lse, tail, -(p * p.log()).sum(-1), t)


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_topk_kernel_with_the_full_vocabulary_is_the_exact_kl(t):
    g = torch.Generator().manual_seed(0)
    z, zr = torch.randn(7, 40, generator=g) * 3, torch.randn(7, 40, generator=g) * 3
    kernel = KLRows(t)
    v_full, g_full = kernel.rows_and_grad(z, zr, 0.7, None, True)
    v_top, g_top = kernel.rows_and_grad(z, _topk(zr, 40, t), 0.7, None, True)
    torch.testing.assert_close(v_top, kl_rows(z, zr, t) * 1.0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v_top, v_full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_top, g_full, rtol=1e-5, atol=1e-7)


def test_topk_kernel_is_the_bucketed_kl_with_its_autograd_gradient():
    """k < |V|: the value is T²·[Σ_K q log(q/p) + q̄ log(q̄/p̄)], computed here from the full logits, and the closed-form
    gradient is autograd's; it lower-bounds the full KL."""
    g = torch.Generator().manual_seed(1)
    t, k = 2.0, 5
    z = (torch.randn(6, 30, generator=g) * 3).requires_grad_(True)
    zr = torch.randn(6, 30, generator=g) * 3
    ref = _topk(zr, k, t)
    logq, logp = torch.log_softmax(zr / t, -1), torch.log_softmax(z / t, -1)
    top = torch.zeros_like(zr, dtype=torch.bool).scatter(1, ref.token_ids, True)
    q_tail = logq.exp().masked_fill(top, 0).sum(-1)
    p_tail = logp.exp().masked_fill(top, 0).sum(-1)
    want = (
        t
        * t
        * ((logq.exp() * (logq - logp)).masked_fill(~top, 0).sum(-1) + q_tail * (q_tail.log() - p_tail.log()))
    )
    (grad,) = torch.autograd.grad(want.sum() * 0.3, z)
    values, acc = KLRows(t).rows_and_grad(z.detach(), ref, 0.3, None, True)
    torch.testing.assert_close(values, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc, grad, rtol=1e-4, atol=1e-7)
    assert (values <= kl_rows(z.detach(), zr, t) + 1e-6).all()


def test_chunked_driver_takes_a_topk_reference():
    g = torch.Generator().manual_seed(2)
    head = OutputHead(weight=torch.randn(50, 8, generator=g))
    h, hr = torch.randn(9, 8, generator=g, requires_grad=True), torch.randn(9, 8, generator=g)
    ref = _topk(head.logits(hr), 50, 2.0)
    total, sums = chunked_row_terms(h, ref, head, [KLRows(2.0)], [0.5], chunk_size=4)
    want, want_sums = chunked_row_terms(h, hr, head, [KLRows(2.0)], [0.5], chunk_size=4)
    torch.testing.assert_close(sums, want_sums, rtol=1e-5, atol=1e-6)
    (g1,) = torch.autograd.grad(total, h)
    (g2,) = torch.autograd.grad(want, h)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the store
def test_store_layout_and_its_rows(store):
    base, path = store
    manifest = json.load(open(os.path.join(path, pc.MANIFEST)))
    assert manifest["complete"] and manifest["top_k"] == VOCAB and manifest["temperatures"] == [1.0, 2.0]
    assert [s["examples"] for s in manifest["shards"]] == [4, 2]
    exs = examples()
    assert manifest["rows"] == sum(len(e["input_ids"]) - 3 for e in exs)  # positions 2 .. L-2 predict labels
    st = pc.ReferenceStore(path)
    shard, first, count, length = st.index[pc.example_key(exs[5]["input_ids"])]
    rows = st.read(shard, first, count, 1)
    assert length == 13 and rows["positions"].tolist() == list(range(2, 12))
    with torch.no_grad():
        z = base(input_ids=torch.tensor([exs[5]["input_ids"]])).logits[0, 2:12].float()
    torch.testing.assert_close(rows["logits"], z.topk(VOCAB).values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows["log_normalizer"], (z / 2).logsumexp(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", [True, "pissa"])
def test_full_vocabulary_store_equals_the_online_reference(store, init):
    """k = |V|: the term and its gradient equal the online reference's (the disabled adapter for plain LoRA, the
    snapshot for PiSSA, whose W_res + s·B0A0 rounds W), on a shuffled, right-padded batch and on a packed row."""
    base, path = store
    model = lora(copy.deepcopy(base), init=init)
    exs = examples()
    online = BALoRAConfig(**CONSISTENCY_ONLY)
    stored = BALoRAConfig(**CONSISTENCY_ONLY, reference="precomputed", reference_path=path)
    # fp32: a KL of ~4e-3 is a difference of log-probabilities of ~log|V| = 4.6, so its rounding is ~1e-7·4.6 per row
    tol = 1e-7 if init is True else 1e-6  # PiSSA: the online snapshot W_res + s·B0A0 rounds W
    for batch in (collate([exs[4], exs[1], exs[5]]), collate([exs[3], exs[0]], packed=True)):
        l1, g1, m1 = term_and_grad(model, online, batch)
        l2, g2, m2 = term_and_grad(model, stored, batch)
        assert l1 > 0
        assert abs(float(l1 - l2)) <= tol
        assert float((g1 - g2).norm() / g1.norm()) <= 100 * tol
    assert REF_ADAPTER not in m2.peft_config and (init is True or REF_ADAPTER in m1.peft_config)


def test_adaptive_weight_reads_the_stored_entropy(store):
    base, path = store
    model = lora(copy.deepcopy(base), init=True)
    batch = collate(examples()[:3])
    conf = []
    for extra in ({}, {"reference": "precomputed", "reference_path": path}):
        cfg = BALoRAConfig(**{**CONSISTENCY_ONLY, "consistency_schedule": "adaptive"}, **extra)
        m = copy.deepcopy(model)
        obj = BALoRAObjective(cfg).prepare(m)
        m(**{k: v for k, v in batch.items() if k != "labels"})
        conf.append(obj.compute(m, batch)[1]["balora/reference_confidence"])
    assert conf[0] > 0 and conf[1] == pytest.approx(conf[0], abs=1e-6)  # 1 − H/log|V|: fp32 cancellation


class Reads(list):
    """Examples that record which indices are read; reading index ``stop`` raises KeyboardInterrupt."""

    def __init__(self, items, stop: int | None = None):
        super().__init__(items)
        self.stop, self.read = stop, []

    def __getitem__(self, i):
        self.read.append(i)
        if i == self.stop:
            raise KeyboardInterrupt
        return super().__getitem__(i)


def test_precompute_resumes_after_an_interruption(tmp_path):
    base, exs = tiny_llama(), examples(n=7)
    whole = str(tmp_path / "whole")
    precompute_reference(base, exs, whole, top_k=8, shard_size=2, progress=False)
    part = str(tmp_path / "part")
    interrupted = Reads(exs, stop=4)  # an interruption inside the third shard (examples 4, 5)
    with pytest.raises(KeyboardInterrupt):
        precompute_reference(base, interrupted, part, top_k=8, shard_size=2, progress=False)
    assert json.load(open(os.path.join(part, pc.MANIFEST)))["done_examples"] == 4
    with pytest.raises(ValueError, match="unfinished"):
        pc.ReferenceStore(part)
    resumed = Reads(exs)
    manifest = precompute_reference(base, resumed, part, top_k=8, shard_size=2, progress=False)
    # the first two shards were not recomputed (example 0 is read for the run's header)
    assert manifest["complete"] and {4, 5, 6} <= set(resumed.read) <= {0, 4, 5, 6}
    want = json.load(open(os.path.join(whole, pc.MANIFEST)))
    assert manifest["dataset_fingerprint"] == want["dataset_fingerprint"] and manifest["rows"] == want["rows"]
    with pytest.raises(FileExistsError, match="top_k"):
        precompute_reference(base, exs, part, top_k=4, shard_size=2, progress=False)


# ---------------------------------------------------------------------------------------------- refusals
def test_config_refusals():
    with pytest.raises(ValueError, match="reference_path"):
        BALoRAConfig(reference="precomputed")
    with pytest.raises(ValueError, match="only applies with BALoRAConfig.reference='precomputed'"):
        BALoRAConfig(reference_path="/somewhere")
    with pytest.raises(ValueError, match="task='nlg'"):
        BALoRAConfig(task="nlu", reference="precomputed", reference_path="/somewhere")


def test_refuses_another_model_or_revision(store):
    _, path = store
    other = lora(tiny_llama(seed=1), init=True)
    with pytest.raises(ValueError, match="does not match the model being trained"):
        BALoRAObjective(BALoRAConfig(reference="precomputed", reference_path=path)).prepare(other)
    manifest = json.load(open(os.path.join(path, pc.MANIFEST)))
    manifest["model"]["revision"] = "abc123"
    json.dump(manifest, open(os.path.join(path, pc.MANIFEST), "w"))
    same = lora(tiny_llama(), init=True)
    same.get_base_model().config._commit_hash = "def456"
    with pytest.raises(ValueError, match="revision 'abc123'"):
        BALoRAObjective(BALoRAConfig(reference="precomputed", reference_path=path)).prepare(same)
    wide = lora(tiny_llama(vocab=VOCAB + 4), init=True)
    with pytest.raises(ValueError, match="vocab_size"):
        BALoRAObjective(BALoRAConfig(reference="precomputed", reference_path=path)).prepare(wide)


def test_pissa_pair_needs_the_untouched_base_not_the_residual(tmp_path):
    """A pre-initialised PiSSA pair on its residual base: its reference is W_res + s·B0A0 = W. A store computed from
    the untouched W serves it; one computed from the residual base (the model a PiSSA recipe saves) is refused."""
    from peft import PeftModel

    base, exs = tiny_llama(), examples()
    pissa = lora(copy.deepcopy(base), init="pissa")
    pissa.peft_config["default"].init_lora_weights = True  # saved the way PEFT's recipe saves the pair
    pissa.save_pretrained(str(tmp_path / "pair"))
    residual = copy.deepcopy(pissa).unload()
    precompute_reference(base, exs, str(tmp_path / "w"), top_k=16, progress=False)
    precompute_reference(residual, exs, str(tmp_path / "res"), top_k=16, progress=False)

    def pair():
        return PeftModel.from_pretrained(copy.deepcopy(residual), str(tmp_path / "pair"), is_trainable=True)

    BALoRAObjective(BALoRAConfig(reference="precomputed", reference_path=str(tmp_path / "w"))).prepare(pair())
    with pytest.raises(ValueError, match="residual base"):
        BALoRAObjective(BALoRAConfig(reference="precomputed", reference_path=str(tmp_path / "res"))).prepare(
            pair()
        )
    with pytest.raises(ValueError, match="PEFT model"):
        precompute_reference(pissa, exs, str(tmp_path / "peft"), progress=False)


def test_refuses_a_changed_dataset_before_step_1_and_at_the_step(store):
    from datasets import Dataset

    base, path = store
    model = lora(copy.deepcopy(base), init=True)
    obj = BALoRAObjective(BALoRAConfig(reference="precomputed", reference_path=path, **CONSTANT)).prepare(
        model
    )
    obj.check_dataset(Dataset.from_list(examples()[::-1]))  # shuffled: fine
    changed = examples()
    changed[2]["input_ids"] = changed[2]["input_ids"][:-1]  # a shorter max length, another template, ...
    changed[2]["labels"] = changed[2]["labels"][:-1]
    with pytest.raises(ValueError, match="1 of 6 training examples have no row"):
        obj.check_dataset(Dataset.from_list(changed))
    all_labels = [{**e, "labels": e["input_ids"]} for e in examples()]  # the prompt trained too
    with pytest.raises(ValueError, match="did not store"):
        obj.check_dataset(Dataset.from_list(all_labels))
    packed = {"input_ids": [changed[0]["input_ids"] + changed[1]["input_ids"]], "seq_lengths": [[8, 9]]}
    obj.check_dataset(Dataset.from_dict(packed))
    batch = collate([changed[2], changed[0]])
    model(**{k: v for k, v in batch.items() if k != "labels"})
    with pytest.raises(ValueError, match="has no row in the precomputed reference"):
        obj.compute(model, batch)


def test_refuses_a_temperature_it_did_not_store(tmp_path):
    base = tiny_llama()
    path = str(tmp_path / "ref")
    precompute_reference(base, examples(), path, top_k=8, temperatures=[2.0], progress=False)
    cfg = BALoRAConfig.from_preset("v5-nlg", reference="precomputed", reference_path=path)
    with pytest.raises(ValueError, match=r"stores T in \[2.0\]"):
        BALoRAObjective(cfg).prepare(lora(copy.deepcopy(base), init=True))


# ---------------------------------------------------------------------------------------------- the TRL door
def test_trl_trains_from_the_store_like_the_online_reference(tmp_path):
    """Two steps of BALoRASFTTrainer: a k = |V| store gives the online run's losses; no snapshot adapter is
    resident, and the final output still holds the step-0 adapter its plain-LoRA export needs."""
    from datasets import Dataset

    from balora_plugins.trl import BALoRASFTTrainer, sft_train_dataset

    base, exs = tiny_llama(), examples(n=8)
    data = Dataset.from_list(exs)
    store = str(tmp_path / "ref")
    args = sft_args(tmp_path / "tok", max_steps=2)
    tokenized = sft_train_dataset(lora(copy.deepcopy(base), init="pissa"), data, args, tiny_tokenizer())
    precompute_reference(base, tokenized, store, top_k=VOCAB, progress=False)
    losses = {}
    for name, extra in (("online", {}), ("stored", {"reference": "precomputed", "reference_path": store})):
        cfg = BALoRAConfig(lambda_consistency=1.0, lambda_diversity=0.0, lambda_svd=0.0, **CONSTANT, **extra)
        trainer = BALoRASFTTrainer(
            model=lora(copy.deepcopy(base), init="pissa"),
            args=sft_args(tmp_path / name, max_steps=2),
            train_dataset=data,
            processing_class=tiny_tokenizer(),
            balora_config=cfg,
        )
        trainer.train()
        losses[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        if name == "stored":
            assert REF_ADAPTER not in trainer.model.peft_config
            trainer.save_model(str(tmp_path / "out"))
    assert losses["stored"] == pytest.approx(losses["online"], rel=1e-4)
    assert os.path.isfile(tmp_path / "out" / "balora_resume" / REF_ADAPTER / "adapter_model.safetensors")


# ---------------------------------------------------------------------------------------------- the command
def test_balora_reference_command_on_tokenised_and_on_raw_data(tmp_path, capsys):
    from datasets import Dataset

    from balora_plugins.tools.cli import main

    model_dir = str(tmp_path / "base")
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    Dataset.from_list(examples()).save_to_disk(str(tmp_path / "tokenised"))
    out = str(tmp_path / "ref")
    assert (
        main(["reference", str(tmp_path / "tokenised"), "--model", model_dir, "--out", out, "--top-k", "8"])
        == 0
    )
    manifest = json.load(open(os.path.join(out, pc.MANIFEST)))
    assert manifest["complete"] and manifest["distinct_examples"] == 6 and manifest["top_k"] == 8
    assert manifest["settings"]["tokenizer"]["sha256"] and "reference_path=" in capsys.readouterr().out
    raw = tmp_path / "raw.jsonl"
    raw.write_text(
        "\n".join(json.dumps({"prompt": f"a b {w}", "completion": f"c {w} d"}) for w in ("e", "f", "g"))
        + "\n"
    )
    out2 = str(tmp_path / "ref2")
    assert main(["reference", str(raw), "--model", model_dir, "--out", out2, "--max-length", "16"]) == 0
    manifest = json.load(open(os.path.join(out2, pc.MANIFEST)))
    assert manifest["settings"]["source"] == "TRL SFT preparation" and manifest["distinct_examples"] == 3
    # the same folder with other settings: refused, with the fix
    assert main(["reference", str(raw), "--model", model_dir, "--out", out2, "--top-k", "4"]) == 1
    assert "--overwrite" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the other doors
def test_callback_door_trains_from_the_store(store, tmp_path):
    """The plain transformers Trainer with BALoRACallback on a tokenised dataset: the store is checked against the
    dataset before step 1, and training runs with no snapshot adapter."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from balora_plugins.callback import BALoRACallback

    base, path = store
    cfg = BALoRAConfig(reference="precomputed", reference_path=path, **CONSTANT)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=3, use_cpu=True,
        report_to=[], save_strategy="no", disable_tqdm=True, learning_rate=1e-2,
    )  # fmt: skip
    collate_fn = DataCollatorForSeq2Seq(tiny_tokenizer(), padding=True)
    trainer = Trainer(
        model=lora(copy.deepcopy(base), init="pissa"),
        args=args,
        train_dataset=Dataset.from_list(examples()),
        data_collator=collate_fn,
        callbacks=[BALoRACallback(cfg)],
    )
    assert REF_ADAPTER not in trainer.model.peft_config
    trainer.train()
    assert any("balora/consistency" in h for h in trainer.state.log_history)
    changed = Dataset.from_list(examples(seed=5))
    with pytest.raises(ValueError, match="have no row in the precomputed reference"):
        Trainer(model=lora(copy.deepcopy(base), init=True), args=args, train_dataset=changed,
                data_collator=collate_fn, callbacks=[BALoRACallback(cfg)])  # fmt: skip


@pytest.mark.axolotl
def test_axolotl_keys_reach_the_config():
    pytest.importorskip("axolotl")
    from balora_plugins.axolotl.args import BALoRAArgs, balora_config_from_cfg

    cfg = balora_config_from_cfg({"balora_reference": "precomputed", "balora_reference_path": "ref/"})
    assert (cfg.reference, cfg.reference_path) == ("precomputed", "ref/")
    assert BALoRAArgs.model_fields["balora_reference_path"].description.startswith(
        "With reference='precomputed'"
    )
    with pytest.raises(ValueError, match="balora_reference_path"):
        balora_config_from_cfg({"balora_reference": "precomputed"})
