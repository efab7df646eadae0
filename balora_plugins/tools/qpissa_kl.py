"""How far the 4-bit models are from the pre-trained one: KL per token on real text (docs/qlora.md).

``python -m balora_plugins.tools.qpissa_kl`` loads the bundled SmolLM2-135M-Instruct (fp32, the pre-trained W),
the same checkpoint in 4 bits (plain QLoRA's model at step 0: Q(W)) and the QPiSSA step-0 model
Q(W_res) + s·B₀A₀ at each rank (BA-LoRA's default consistency reference on a 4-bit base), and prints the mean
KL(p_W ‖ p_model) per token (nats, temperature 1) over the first ``--tokens`` tokens of ``--articles`` BBC News
articles. Options: ``--ranks 8,128``, ``--quant-type nf4|fp4``, ``--init pissa_niter_16``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..core import get_qpissa_model
from . import assets

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def kl_per_token(ref_logp: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over the ``mask``ed positions of KL(p_ref ‖ p): (B, T, V) log-probs, (B, T, V) logits, (B, T) bool."""
    logp = F.log_softmax(logits.float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return float(kl[mask].mean())


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.float()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m balora_plugins.tools.qpissa_kl", description=__doc__)
    p.add_argument("--ranks", default="8,128", help="QPiSSA ranks (alpha = rank), comma-separated")
    p.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    p.add_argument("--init", default="pissa_niter_16")
    p.add_argument("--articles", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128)
    args = p.parse_args(argv)
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    start = time.time()
    path = assets.smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(path)
    texts = assets.bbc_news().texts[: args.articles]
    enc = tok(texts, truncation=True, max_length=args.tokens, padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    mask = enc["attention_mask"].bool()
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref_logp = F.log_softmax(_logits(full, batch), dim=-1)
    del full
    qcfg = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=args.quant_type, bnb_4bit_compute_dtype=torch.float32
    )

    def four_bit():
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=qcfg, device_map="cpu").eval()

    rows = [("plain QLoRA, Q(W)", kl_per_token(ref_logp, _logits(four_bit(), batch), mask))]
    for r in (int(x) for x in args.ranks.split(",")):
        cfg = LoraConfig(
            r=r, lora_alpha=r, lora_dropout=0.0, target_modules=PROJECTIONS, init_lora_weights=args.init
        )
        model = get_qpissa_model(four_bit(), cfg)
        rows.append((f"QPiSSA r={r}, Q(W_res)+s·B0A0", kl_per_token(ref_logp, _logits(model, batch), mask)))
    n = int(mask.sum())
    print(
        f"SmolLM2-135M-Instruct (bundled, fp32 = W) vs 4-bit {args.quant_type} models, {args.init}, all 7 "
        f"projections; {n} tokens of {args.articles} BBC News articles (first {args.tokens} tokens each)"
    )
    print(f"{'model at step 0':<34} {'KL(p_W || p) per token':>24}")
    print(f"{'-' * 34} {'-' * 24}")
    for name, kl in rows:
        print(f"{name:<34} {kl:>24.5f}")
    base = rows[0][1]
    for name, kl in rows[1:]:
        print(f"{name}: {kl / base:.3f}x plain QLoRA's distance")
    print(f"({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
