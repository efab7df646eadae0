"""Shared fixtures: tiny random models built in the test (no downloads, seconds each)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 96
TINY_TEXT = dict(  # the decoder every tiny test model uses (Llama-style config keys)
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# a vision tower (CLIP / SigLIP keys) on 8×8 images of 4 patches
TINY_VISION = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=8,
    patch_size=4,
)
CONSTANT = {
    "consistency_schedule": "constant",
    "regularizer_schedule": "constant",
}  # every term on from step 1


def close_process_group() -> None:
    """Tear a worker's process group down before the interpreter exits: a gloo group left to the interpreter's
    shutdown can abort a rank ("terminate called without an active exception") after a run that succeeded."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def tiny_llama(seed: int = 0, vocab: int = VOCAB, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY_TEXT, "vocab_size": vocab}, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def tiny_llava(seed: int = 0):
    """A tiny Llava (CLIP vision tower, projector, the tiny Llama): one 8×8 image is 4 patches of 4×4, its
    placeholder token id 95."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**TINY_VISION),
        text_config=LlamaConfig(**TINY_TEXT),
        image_token_index=95,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(cfg).eval()


def perturb(model, adapter: str = "default", seed: int = 1, scale: float = 0.05) -> None:
    """Stand-in for optimizer steps: move every parameter of ``adapter``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{adapter}." in n:
                p.add_(scale * torch.randn(p.shape, generator=g))


def tiny_tokenizer(vocab: int = VOCAB):
    """A word-level tokenizer built in memory: <pad>=0, <s>=1, </s>=2, then 'a'..'z', digits, words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = (
        ["<pad>", "<s>", "</s>", "<unk>"]
        + [chr(ord("a") + i) for i in range(26)]
        + [str(i) for i in range(10)]
    )
    words += [f"w{i}" for i in range(vocab - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    # Renders "<role> : <content> </s> " per message; {% generation %} marks the assistant's content and its </s>
    # (what TRL's assistant_only_loss trains on).
    fast.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{{ m['role'] }} : {% generation %}{{ m['content'] }} </s>{% endgeneration %} "
        "{% else %}{{ m['role'] }} : {{ m['content'] }} </s> {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    return fast


def pretrained(path: str):
    """A saved causal LM loaded from ``path`` (for :func:`plain_peft_logits` jobs on a base saved to disk)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def tiny_bert_classifier(seed: int = 0, num_labels: int = 4):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_config(init="pissa", r=4, alpha=8, targets=ALL_PROJECTIONS, **kw):
    """The tests' LoraConfig: rank ``r``, α = ``alpha``, no dropout, ``init`` on ``targets``."""
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), init_lora_weights=init, **kw
    )


def lora(model, init="pissa", r=4, alpha=8, targets=ALL_PROJECTIONS, **kw):
    from peft import get_peft_model

    return get_peft_model(model, lora_config(init, r, alpha, targets, **kw))


def sft_args(out, config_class=None, **kw):
    """TRL ``SFTConfig`` (or ``config_class``) of the tiny runs: CPU, fp32 (TRL's own default is bf16), no
    gradient checkpointing, 3 steps of 4 rows at lr 1e-2, no saving or reporting; ``kw`` overrides."""
    if config_class is None:
        from trl import SFTConfig as config_class
    base = dict(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        max_steps=3,
        logging_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        seed=0,
        max_length=32,
        disable_tqdm=True,
    )
    base.update(kw)
    return config_class(**base)


def batch(b=2, t=12, seed=0, vocab=VOCAB, prompt=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    attn = torch.ones_like(ids)
    if b > 1:  # right padding on the last row
        ids[-1, -3:] = 0
        labels[-1, -3:] = -100
        attn[-1, -3:] = 0
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def pissa_llama():
    return lora(tiny_llama(), init="pissa")


# A fresh process in which `import balora_plugins` fails: what a user without this package (or a server) has.
_PLAIN_PEFT_SCRIPT = r"""
import json, sys, torch
sys.modules["balora_plugins"] = None  # any import of balora_plugins now fails: plain PEFT only
sys.path.insert(0, sys.argv[1])
import conftest
from peft import PeftModel
for job in json.loads(open(sys.argv[2], encoding="utf-8").read()):
    base = getattr(conftest, job["base"])(**job.get("base_kwargs", {}))  # untouched pre-trained weights
    model = PeftModel.from_pretrained(base, job["adapter"]).eval()
    with torch.no_grad():
        torch.save(model(input_ids=torch.tensor(job["input_ids"])).logits, job["out"])
"""


def plain_peft_logits(jobs: list[dict], workdir) -> list[torch.Tensor]:
    """Load each ``job["adapter"]`` with ``PeftModel.from_pretrained`` on an untouched base built by the conftest
    function ``job["base"]`` (with ``job.get("base_kwargs")``), in one fresh process where ``balora_plugins`` is
    not importable, and return each model's logits on ``job["input_ids"]`` (a nested list, (B, T))."""
    import subprocess
    import sys

    workdir = str(workdir)
    os.makedirs(workdir, exist_ok=True)
    jobs = [{**job, "out": os.path.join(workdir, f"plain_peft_{i}.pt")} for i, job in enumerate(jobs)]
    spec = os.path.join(workdir, "plain_peft_jobs.json")
    with open(spec, "w", encoding="utf-8") as f:
        json.dump(jobs, f)
    res = subprocess.run(
        [sys.executable, "-c", _PLAIN_PEFT_SCRIPT, os.path.dirname(os.path.abspath(__file__)), spec],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return [torch.load(job["out"]) for job in jobs]


class FakeHub:
    """Stands in for transformers.trainer.hf_api(): records what push_to_hub would upload, at upload time."""

    def __init__(self):
        self.uploads: list[dict] = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        files = sorted(
            os.path.relpath(os.path.join(d, f), folder_path) for d, _, fs in os.walk(folder_path) for f in fs
        )
        with open(os.path.join(folder_path, "adapter_config.json"), encoding="utf-8") as f:
            adapter_config = json.load(f)
        card_path = os.path.join(folder_path, "README.md")
        card = open(card_path, encoding="utf-8").read() if os.path.isfile(card_path) else None
        self.uploads.append(
            {
                "repo_id": repo_id,
                "folder": folder_path,
                "files": list(filter_repo_objects(files, ignore_patterns=ignore_patterns)),
                "adapter_config": adapter_config,
                "card": card,
            }
        )
        info = SimpleNamespace(commit_url="fake")
        if kwargs.get("run_as_future"):  # the Trainer's pushes during training wait on a Future
            from concurrent.futures import Future

            done: Future = Future()
            done.set_result(info)
            return done
        return info
