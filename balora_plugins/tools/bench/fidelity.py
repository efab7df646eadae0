"""``balora bench --fidelity``: how close the consistency term from a precomputed top-k reference is to the exact one.

On real text with a real model (default: the bundled SmolLM2-135M-Instruct) — GSM-style problems with their worked
solutions in the chat template (the demo's training data, loss on the solution) and BBC News articles (every
position) — a student is made by moving a PiSSA adapter (r = 8, all projections) away from its start by a
relative amount ``scale`` (a stand-in for training, which the table reports as the student's mean KL from the
reference). For each k and each preset temperature T it compares the term computed from the stored top-k rows
(:class:`~balora_plugins.core.TopKRows`, built here exactly as ``balora reference`` stores them) with the exact
term over the full vocabulary: the relative error of the term's value and the cosine between its gradient with
respect to the hidden states and the exact gradient. Prints a table; ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="balora bench --fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--fidelity", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help="local folder/.gguf (default: the bundled SmolLM2-135M)")
    p.add_argument("--top-k", default="32,64,128", help="comma-separated k values")
    p.add_argument("--temperatures", default="1,2", help="comma-separated T values (the presets': 1 and 2)")
    p.add_argument("--scales", default="0.05,0.2", help="relative adapter moves that make the student")
    p.add_argument(
        "--problems", type=int, default=16, help="GSM-style problems (chat template, solution tokens)"
    )
    p.add_argument("--articles", type=int, default=8, help="BBC News articles (every position)")
    p.add_argument("--article-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", dest="json_path", default=None)
    return p


def _rows(model, backbone, examples, grad: bool):
    import torch

    from balora_plugins.functional import valid_position_mask

    out = []
    for ids, labels in examples:
        with torch.set_grad_enabled(False):
            hidden = backbone(input_ids=torch.tensor([ids])).last_hidden_state[0]
        mask = valid_position_mask(torch.tensor([labels]))[0]
        out.append(hidden[mask])
    rows = torch.cat(out).float()
    return rows.requires_grad_(True) if grad else rows


def _topk_reference(head, ref_rows, k: int, t: float):
    import torch

    from balora_plugins.core import TopKRows

    parts = []
    with torch.no_grad():
        for s in range(0, ref_rows.shape[0], 256):
            z = head.logits(ref_rows[s : s + 256])
            top, ids = z.topk(k, dim=-1)
            zt = z / t
            lse = zt.logsumexp(-1)
            p = (zt - lse[:, None]).exp()
            ent = lse - (p * zt).sum(-1)
            tail = zt.scatter(1, ids, float("-inf")).logsumexp(-1) - lse
            parts.append((ids, top, lse, tail, ent))
    cat = [torch.cat(x) for x in zip(*parts)]
    return TopKRows(*cat, t)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from balora_plugins.core import KLRows, chunked_row_terms, decoder_of, output_head
    from balora_plugins.tools import assets
    from balora_plugins.tools.demo.nlg import encode, messages

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    base, tok = assets.load_causal_lm(args.model, log=lambda *a: None)
    data = assets.gsm_symbolic(4 * args.problems, 0)
    examples = []
    for item in data:
        ids, labels = encode(tok, *messages(item))
        if len(ids) <= 256:
            examples.append((ids, labels))
        if len(examples) == args.problems:
            break
    news = assets.bbc_news()
    for text in news.texts[: args.articles]:
        ids = tok(text, add_special_tokens=False, truncation=True, max_length=args.article_tokens)[
            "input_ids"
        ]
        examples.append((ids, list(ids)))
    head = output_head(base)
    ref_rows = _rows(base, decoder_of(base), examples, grad=False)
    ks = [int(x) for x in args.top_k.split(",")]
    temps = [float(x) for x in args.temperatures.split(",")]
    results = []
    for scale in [float(x) for x in args.scales.split(",")]:
        torch.manual_seed(0)
        student = get_peft_model(
            copy.deepcopy(base),
            LoraConfig(
                r=8,
                lora_alpha=8,
                init_lora_weights="pissa_niter_4",
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            ),
        )
        with torch.no_grad():
            for n, p in student.named_parameters():
                if "lora_" in n:
                    p.add_(scale * p.norm() / p.numel() ** 0.5 * torch.randn_like(p))
        rows = _rows(student, decoder_of(student.get_base_model()), examples, grad=True)
        for t in temps:
            kl = KLRows(t)
            exact, _ = chunked_row_terms(rows, ref_rows, head, [kl], [1.0], 256)
            (g_exact,) = torch.autograd.grad(exact, rows)
            exact = float(exact.detach())
            m = rows.shape[0]
            for k in ks:
                approx, _ = chunked_row_terms(
                    rows, _topk_reference(head, ref_rows, k, t), head, [kl], [1.0], 256
                )
                (g_k,) = torch.autograd.grad(approx, rows)
                approx = float(approx.detach())
                cos = torch.nn.functional.cosine_similarity(g_k.flatten(), g_exact.flatten(), dim=0)
                results.append(
                    {
                        "scale": scale,
                        "temperature": t,
                        "k": k,
                        "rows": m,
                        "term": exact / m,
                        "term_topk": approx / m,
                        "relative_error": abs(approx - exact) / max(exact, 1e-30),
                        "gradient_cosine": float(cos),
                        "gradient_norm_ratio": float(g_k.norm() / g_exact.norm().clamp(min=1e-30)),
                    }
                )
        del student, rows
    return {
        "model": args.model or "SmolLM2-135M-Instruct (bundled)",
        "vocab": head.vocab_size,
        "problems": args.problems,
        "articles": args.articles,
        "results": results,
        "seconds": time.perf_counter() - t0,
    }


def format_table(doc: dict[str, Any]) -> str:
    lines = [
        f"fidelity of the precomputed top-k reference — {doc['model']}, |V| = {doc['vocab']}, "
        f"{doc['results'][0]['rows']} positions ({doc['problems']} GSM solutions + {doc['articles']} news articles)",
        "",
        f"{'scale':>6} {'T':>4} {'term (exact)':>13} {'k':>5} {'term (top-k)':>13} {'rel. error':>11} "
        f"{'grad cosine':>12} {'grad norm ratio':>16}",
    ]
    for r in doc["results"]:
        lines.append(
            f"{r['scale']:>6g} {r['temperature']:>4g} {r['term']:>13.5g} {r['k']:>5} {r['term_topk']:>13.5g} "
            f"{r['relative_error']:>11.2e} {r['gradient_cosine']:>12.6f} {r.get('gradient_norm_ratio', float('nan')):>16.4f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    doc = run(args)
    print(format_table(doc))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(doc, f, indent=2)
    return 0
