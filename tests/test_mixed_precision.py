"""bf16 / fp16: the fused path on a low-precision head against the fp32 maths of the same values, without a full
fp32 copy of the head; the three doors with ``bf16=True`` / ``fp16=True`` against an fp32 run of the same model.

Tolerances (stated once, used below). On the same low-precision values the fused path is exact to fp32 rounding
(rtol 1e-5). A door run in bf16/fp16 against an fp32 run of the same tiny model: at step 1 (the same weights)
the diversity and SVD terms within 2e-3 relative and the consistency term within 2e-5 absolute (it is 0 up to
rounding: the reference is the initial model); at steps 2-3 the runs follow slightly different trajectories
(Adam turns rounding differences of small gradients into whole steps), so diversity within 2e-3, SVD within
2e-2 and consistency within 25 % relative. Every term finite, none skipped. Each parametrisation also runs on
CUDA (marked ``gpu``; skipped without a GPU, see ``scripts/gpu_check.sh``).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import VOCAB, lora, tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

import balora_plugins.core.fused as fused
from balora_plugins import BALoRAConfig
from balora_plugins import functional as Fn
from balora_plugins.core import (
    HiddenView,
    KLRows,
    NegEntropyRows,
    OutputHead,
    chunked_row_terms,
)

T, K = 2.0, 5
ON = dict(
    lambda_consistency=1.0,
    lambda_diversity=0.2,
    lambda_svd=0.2,
    svd_top_k=3,
    consistency_schedule="constant",
    regularizer_schedule="constant",
)
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)"),
]
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]


def _data(m=13, d=6, v=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, d, generator=g)
    return (
        h,
        h + 0.3 * torch.randn(m, d, generator=g),
        torch.randn(v, d, generator=g) / d**0.5 * 3,
        torch.randn(v, generator=g),
    )


HEADS = {"plain": {}, "bias+scale": {"bias": True, "scale": 1.7}, "softcap": {"softcap": 4.0}}


def _heads(kind, w, b, dtype, device):
    """The head in ``dtype`` and the same values as an fp32 head."""
    opts = dict(HEADS[kind])
    bias = opts.pop("bias", False)
    low = w.to(device, dtype)
    lb = b.to(device, dtype) if bias else None
    return (
        OutputHead(low, None if lb is None else lb, **opts),
        OutputHead(low.float(), None if lb is None else lb.float(), **opts),
    )


# ---------------------------------------------------------------------------------------------- the fused path
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(HEADS))
@pytest.mark.parametrize("dtype", list(LOW))
def test_low_precision_head_gives_the_fp32_maths_of_its_values(dtype, kind, device, monkeypatch):
    """Row terms and the SVD share on a bf16/fp16 head, upcast 7 rows at a time, against the functional maths on
    the fp32 logits of the same values (the gradient in the hidden states' dtype)."""
    monkeypatch.setattr(fused, "UPCAST_BLOCK_BYTES", 7 * 6 * 4)
    low = LOW[dtype]
    h, h_ref, w, b = _data(seed=len(kind))
    head, head32 = _heads(kind, w, b, low, device)
    hl, hrl = h.to(device, low).requires_grad_(True), h_ref.to(device, low)
    h32 = hl.detach().float().requires_grad_(True)
    weights = [0.3, -0.7]
    total, sums = chunked_row_terms(hl, hrl, head, [KLRows(T), NegEntropyRows(K)], weights, 4)
    z, zr = head32.logits(h32), head32.logits(hrl.float())
    kl = Fn.kl_rows(z, zr, T).sum()
    ent = -Fn.entropy_rows(z, K).sum()
    expected = weights[0] * kl + weights[1] * ent
    torch.testing.assert_close(sums, torch.stack([kl, ent]).detach(), rtol=1e-5, atol=1e-6)
    svd = Fn.svd_share(
        (view := HiddenView(hl, head, chunk_size=3)).singular_values(),
        k=3,
        norm="frobenius",
        eps=1e-8,
        frobenius=view.frobenius(),
    )
    plain_svd = Fn.svd_loss(z, k=3, norm="frobenius")
    torch.testing.assert_close(svd, plain_svd, rtol=1e-5, atol=1e-6)
    (total + svd).backward()
    (expected + plain_svd).backward()
    assert hl.grad.dtype == low and torch.isfinite(hl.grad).all()
    scale = float(h32.grad.abs().max())
    torch.testing.assert_close(hl.grad.float(), h32.grad.to(low).float(), rtol=2e-2, atol=1e-2 * scale)


class _Allocations(TorchDispatchMode):
    """Records (shape, dtype) of every tensor any ATen op produces."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.seen.append((tuple(t.shape), t.dtype))
        return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(HEADS))
def test_no_full_fp32_copy_of_a_low_precision_head(kind, device, monkeypatch):
    """Forward and backward of all three terms on a bf16 head (V = 300 rows, d = 7): no fp32/fp64 piece of the
    head larger than one upcast block (1 KiB here, a sixteenth of the head in fp64); the (M, |V|) logits never
    exist either."""
    m, d, v, chunk = 20, 7, 300, 3
    monkeypatch.setattr(fused, "UPCAST_BLOCK_BYTES", 16 * 8 * 8)  # 16 rows of d' = 8 in fp64
    h, h_ref, w, b = _data(m=m, d=d, v=v, seed=3)
    head, _ = _heads(kind, w, b, torch.bfloat16, device)
    hl = h.to(device, torch.bfloat16).requires_grad_(True)
    head.forget_gram_factor()  # the linear heads' Gram factor is computed inside, blockwise too
    with _Allocations() as rec:
        total, _ = chunked_row_terms(
            hl, h_ref.bfloat16(), head, [KLRows(T), NegEntropyRows(K)], [1.0, 1.0], chunk
        )
        view = HiddenView(hl, head, chunk_size=chunk)
        svd = Fn.svd_share(
            view.singular_values(), k=3, norm="frobenius", eps=1e-8, frobenius=view.frobenius()
        )
        (total + svd).backward()
    wide = [(s, dt) for s, dt in rec.seen if dt in (torch.float32, torch.float64) and len(s) == 2]
    pieces = [(s, dt) for s, dt in wide if set(s) & {d, d + 1} and max(s) > max(2 * chunk, m)]  # not (M, d)
    assert pieces or device == "cuda"  # upcast block by block (CUDA: bf16 products with fp32 output instead)
    too_big = [(s, dt) for s, dt in pieces if s[0] * s[1] * dt.itemsize > fused.UPCAST_BLOCK_BYTES]
    assert not too_big, f"fp32/fp64 copies of more than one block of the head: {sorted(set(too_big))}"
    assert max(s[0] * s[1] for s, _ in wide) < m * v  # and never the full logits
    assert torch.isfinite(hl.grad).all()


# ---------------------------------------------------------------------------------------------- the doors
def _close_terms(low: list[dict], ref: list[dict]) -> None:
    """Per-step BA-LoRA metrics of a bf16/fp16 run against an fp32 run (tolerances in the module docstring)."""
    assert len(low) == len(ref) >= 3
    for step, (a, b) in enumerate(zip(low, ref)):
        assert not any(k.startswith("balora/skipped") for k in a), a
        assert all(v == v and abs(v) != float("inf") for v in a.values())  # finite
        assert a["balora/diversity"] == pytest.approx(b["balora/diversity"], rel=2e-3)
        if step == 0:
            assert a["balora/svd"] == pytest.approx(b["balora/svd"], rel=2e-3)
            assert a["balora/consistency"] == pytest.approx(b["balora/consistency"], abs=2e-5)
        else:
            assert a["balora/svd"] == pytest.approx(b["balora/svd"], rel=2e-2)
            assert a["balora/consistency"] == pytest.approx(b["balora/consistency"], rel=0.25, abs=2e-5)


def _balora_logs(trainer) -> list[dict[str, float]]:
    return [
        {k: v for k, v in h.items() if k.startswith("balora/")}
        for h in trainer.state.log_history
        if "balora/consistency" in h
    ]


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=8, t=12, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (n, t), generator=g)
        self.labels = self.ids.clone()
        self.labels[:, :3] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


def _precision(mode: str) -> tuple[torch.dtype, dict]:
    """(model dtype, TrainingArguments flags): ``bf16-autocast`` keeps fp32 weights (autocast only)."""
    return {
        "fp32": (torch.float32, {}),
        "bf16-autocast": (torch.float32, {"bf16": True}),
        "bf16": (torch.bfloat16, {"bf16": True}),
        "fp16": (torch.float16, {"fp16": True}),
    }[mode]


def _callback_run(mode: str, device: str, tmp_path) -> list[dict[str, float]]:
    from transformers import Trainer, TrainingArguments

    from balora_plugins.callback import BALoRACallback

    dtype, flags = _precision(mode)
    model = lora(tiny_llama(0).to(dtype), init="pissa")
    args = TrainingArguments(
        output_dir=str(tmp_path / mode),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=device == "cpu",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **flags,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=_Rows(), callbacks=[BALoRACallback(BALoRAConfig(**ON))]
    )
    trainer.train()
    return _balora_logs(trainer)


@pytest.mark.parametrize("device", DEVICES)
def test_callback_in_bf16_and_fp16_agrees_with_fp32(device, tmp_path):
    """transformers ``Trainer`` + the callback: fp32 weights under bf16 autocast, bf16 weights, fp16 weights."""
    ref = _callback_run("fp32", "cpu", tmp_path)
    for mode in ("bf16-autocast", "bf16", "fp16"):
        _close_terms(_callback_run(mode, device, tmp_path), ref)


@pytest.mark.parametrize("device", DEVICES)
def test_trl_trainer_in_bf16_agrees_with_fp32(device, tmp_path):
    pytest.importorskip("trl")
    from conftest import lora_config, sft_args, tiny_tokenizer
    from datasets import Dataset

    from balora_plugins.trl import BALoRASFTTrainer

    rows = [{"prompt": "a b c", "completion": " d e f g"}, {"prompt": "h i", "completion": " j k l 1 2"}] * 4

    def run(mode, dev):
        dtype, flags = _precision(mode)
        # the fp32 run must say bf16=False (TRL's default is bf16); gradient checkpointing on, TRL's default
        args = sft_args(tmp_path / f"trl-{mode}", use_cpu=dev == "cpu", gradient_checkpointing=True, **flags)
        trainer = BALoRASFTTrainer(
            tiny_llama().to(dtype),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tiny_tokenizer(),
            peft_config=lora_config(targets=["q_proj", "v_proj", "up_proj"]),
            balora_config=BALoRAConfig(**ON),
        )
        trainer.train()
        return _balora_logs(trainer)

    ref = run("fp32", "cpu")
    for mode in ("bf16-autocast", "bf16"):
        _close_terms(run(mode, device), ref)


@pytest.mark.axolotl
@pytest.mark.parametrize("device", DEVICES)
def test_axolotl_trainer_in_bf16_agrees_with_fp32(device, tmp_path):
    """axolotl's trainer (what ``bf16: true`` configures: bf16 weights, ``bf16=True`` arguments)."""
    pytest.importorskip("axolotl")
    from axolotl.core.training_args import AxolotlTrainingArguments
    from datasets import Dataset
    from transformers import default_data_collator

    from balora_plugins.axolotl.args import BALoRATrainingArgsMixin
    from balora_plugins.axolotl.trainer import AxolotlBALoRATrainer

    # the arguments `axolotl train` builds once the plugin is registered: axolotl's own with the balora_* fields
    args_cls = AxolotlTrainingArguments
    if not issubclass(args_cls, BALoRATrainingArgsMixin):  # this process has not registered the plugin
        args_cls = dataclasses.make_dataclass(
            "Args", [], bases=(BALoRATrainingArgsMixin, AxolotlTrainingArguments)
        )
    base = tiny_llama(seed=1)
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(8):
        ids = torch.randint(3, 90, (12,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * 12, "labels": [-100] * 4 + ids[4:]})

    def run(mode, dev):
        dtype, flags = _precision(mode)
        args = args_cls(
            output_dir=str(tmp_path / f"ax-{mode}"),
            per_device_train_batch_size=4,
            max_steps=3,
            learning_rate=1e-2,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=dev == "cpu",
            seed=0,
            lr_scheduler_type="constant",
            optim="adamw_torch",
            dataloader_num_workers=0,
            **flags,
            **{f"balora_{k}": v for k, v in ON.items()},
        )
        trainer = AxolotlBALoRATrainer(
            model=lora(copy.deepcopy(base).to(dtype), init="pissa"),
            args=args,
            train_dataset=Dataset.from_list(rows),
            data_collator=default_data_collator,
            eval_data_collator=default_data_collator,
        )
        assert trainer.balora.config == BALoRAConfig(**ON)
        trainer.train()
        return _balora_logs(trainer)

    ref = run("fp32", "cpu")
    _close_terms(run("bf16", device), ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")
def test_peak_cuda_memory_of_the_fused_path_vs_plain_logits():
    """All three terms with their gradient on 4096 rows of a Qwen2.5-0.5B-sized bf16 head (|V| = 151936,
    d = 896): the fused path's extra peak CUDA memory is under 1/8 of the plain-logits path's and under the
    size of the head in fp32 plus a few chunks."""
    from balora_plugins.core import Consistency, EntropyDiversity, SVDShare

    m, d, v = 4096, 896, 151936
    cfg = BALoRAConfig()
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(v, d, generator=g, device="cuda") * 0.02).bfloat16()
    h = torch.randn(m, d, generator=g, device="cuda").bfloat16().requires_grad_(True)
    h_ref = (h.detach() + 0.05 * torch.randn(m, d, generator=g, device="cuda")).bfloat16()
    head = OutputHead(weight=w)
    head.gram_factor()  # once per head, as in training
    kl, ent, svd = Consistency(cfg).row_kernel(), EntropyDiversity(cfg).row_kernel(), SVDShare(cfg)

    def fused_all():
        total = chunked_row_terms(h, h_ref, head, [kl, ent], [1e-3, 1e-3], cfg.chunk_size)[0]
        return total + svd.matrix(HiddenView(h, head, cfg.chunk_size))

    def plain_all():
        z, zr = head.logits(h), head.logits(h_ref)
        loss = Fn.consistency_loss(z, zr, temperature=cfg.temperature) + Fn.diversity_loss(z, top_k=20)
        _, s, _ = torch.svd_lowrank(z, q=cfg.svd_top_k + 5, niter=2)
        return loss - s[: cfg.svd_top_k].sum() / z.norm()

    peaks = {}
    for name, fn in (("plain", plain_all), ("fused", fused_all)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.autograd.grad(fn(), h)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
    chunk_bytes = cfg.chunk_size * v * 4
    assert peaks["fused"] < peaks["plain"] / 8, peaks
    assert peaks["fused"] < v * d * 4 + 8 * chunk_bytes, peaks
