"""BA-LoRA through ``axolotl train`` on a CPU, end to end, offline, in about a minute.

1. Builds, in a work folder, what ``example_configs/tiny-cpu-balora.yml`` points at: a tiny random Llama
   checkpoint (``./tiny-llama``, with a word-level tokenizer trained on the data) and 64 alpaca rows.
2. Checks the YAML (``balora_plugins.axolotl.check``), then runs ``axolotl train tiny-cpu-balora.yml
   --launcher python`` there (HF_HUB_OFFLINE=1, AXOLOTL_DO_NOT_TRACK=1).
3. Checks that the BA-LoRA metrics appear in axolotl's logs, that training saved the BA-LoRA artefacts, and
   that ``output_dir`` — loaded with PEFT on the *untouched* base checkpoint, and merged by
   ``axolotl merge-lora tiny-cpu-balora.yml`` (for QPiSSA, 4 bits: ``balora export --merge``) — gives the trained
   model's logits, computed independently as the full-precision residual base W − s·B₀A₀ plus the trained adapter
   in ``balora_resume/`` (for QPiSSA: the trained model without the residual's 4-bit rounding).

Usage: ``python integrations/axolotl/run_tiny.py [--workdir DIR] [--set KEY=VALUE ...] [--hidden N]`` (a temporary
folder by default; ``--set`` overrides a key of the YAML, e.g. ``--set sample_packing=true``). Besides the metrics
and the export, it checks that the consistency term is 0 at step 1, when the model still equals its reference.
Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[2] / "example_configs" / "tiny-cpu-balora.yml"
METRICS = ("balora/consistency", "balora/diversity", "balora/svd", "balora/loss")
ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "AXOLOTL_DO_NOT_TRACK": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "CUDA_VISIBLE_DEVICES": "",
}


def build_assets(workdir: Path, rows: int = 64, seed: int = 0, hidden: int = 32) -> None:
    """``./data/train.jsonl`` (alpaca rows: add two numbers) and ``./tiny-llama`` (random Llama + tokenizer).

    ``hidden`` is the model width (MLP width 2x); bitsandbytes' 4-bit CPU path needs rows of >= 64 values."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(seed)
    data = []
    for _ in range(rows):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        data.append({"instruction": f"add {a} and {b}", "input": "", "output": f"{a} plus {b} is {a + b}"})
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    with open(workdir / "data" / "train.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in data)

    template = (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request. ### Instruction: ### Input: ### Response:"
    )  # axolotl's alpaca prompt words
    corpus = (
        [template] + [f"{r['instruction']} {r['output']}" for r in data] + [" ".join(map(str, range(100)))]
    )
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(
        corpus, trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(workdir / "tiny-llama")
    tokenizer.save_pretrained(workdir / "tiny-llama")


def preflight(workdir: Path, overrides: dict | None = None) -> dict:
    """Write the YAML (with ``overrides``) into ``workdir`` and run ``python -m balora_plugins.axolotl.check`` on
    it in-process: the YAML lists the plugin and validates. Returns the YAML as written."""
    import yaml

    from balora_plugins.axolotl.check import check_config

    with open(CONFIG, encoding="utf-8") as f:
        cfg = {**yaml.safe_load(f), **(overrides or {})}
    with open(workdir / CONFIG.name, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    print(f"BA-LoRA settings: {check_config(cfg).to_dict()}")
    return cfg


def run_axolotl(workdir: Path, command: str = "train") -> str:
    """Run ``axolotl <command>`` (train, merge-lora) on the tiny config in ``workdir``; returns its output."""
    exe = Path(sys.executable).with_name("axolotl")
    cmd = [str(exe) if exe.exists() else "axolotl", command, CONFIG.name]
    if command == "train":
        cmd += ["--launcher", "python"]
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    (workdir / ("axolotl.log" if command == "train" else f"axolotl-{command}.log")).write_text(
        out, encoding="utf-8"
    )
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); last output:\n{out[-4000:]}")
    return out


def logged_metrics(output: str) -> list[dict]:
    """The train-step log dicts (``{'loss': ..., 'balora/...': ...}``) the trainer printed."""
    steps = []
    for line in output.splitlines():
        start = line.find("{'loss'")
        if start >= 0:
            steps.append(ast.literal_eval(line[start : line.rindex("}") + 1]))
    return steps


def check_export(workdir: Path, merged: bool = True) -> dict[str, float]:
    """Max |logit difference| to the trained model of ``output_dir`` served on the untouched base with PEFT and
    (``merged``) of ``axolotl merge-lora``'s merged model (``output_dir/merged``)."""
    import torch
    from peft import LoraConfig, PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = workdir / "outputs" / "tiny-balora"
    resume = out / "balora_resume"
    base_dir = workdir / "tiny-llama"
    ids = torch.randint(4, 40, (2, 16), generator=torch.Generator().manual_seed(1))

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits

    served = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out))
    merged = logits(AutoModelForCausalLM.from_pretrained(out / "merged")) if merged else None

    # Independent reconstruction of the trained model: W_res = W - s·B0·A0 (initial adapter), plus the trained
    # adapter loaded with init_lora_weights=True (so PEFT runs no PiSSA SVD on load).
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    cfg = json.loads((resume / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    initial = load_file(resume / "balora_ref" / "adapter_model.safetensors")
    modules = dict(base.named_modules())
    with torch.no_grad():
        for key, a0 in initial.items():
            if key.endswith("lora_A.weight"):
                name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                b0 = initial[key.replace("lora_A", "lora_B")]
                modules[name].weight -= scale * (b0 @ a0)
    peft_cfg = LoraConfig.from_pretrained(resume)
    peft_cfg.init_lora_weights = True
    trained = logits(PeftModel.from_pretrained(base, resume, config=peft_cfg))
    moved = (trained - logits(AutoModelForCausalLM.from_pretrained(base_dir))).abs().max().item()
    if moved < 1e-4:
        raise AssertionError(f"training did not change the model (max logit change {moved:.2e})")
    errors = {"served_max_abs_err": (served - trained).abs().max().item()}
    if merged is not None:
        errors["merged_max_abs_err"] = (merged - trained).abs().max().item()
    return errors


def check_card(workdir: Path) -> list[str]:
    """The model card's tags; raises unless it carries axolotl's and BA-LoRA's and the BA-LoRA section."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(workdir / "outputs" / "tiny-balora" / "README.md")
    tags = sorted(card.data.tags or [])
    if not {"axolotl", "ba-lora", "peft"} <= set(tags) or "## BA-LoRA" not in card.text:
        raise AssertionError(f"the model card lacks BA-LoRA's tags or section (tags: {tags})")
    return tags


def digest(folder: Path) -> str:
    """A SHA-256 of the files directly in ``folder`` (names and bytes, in name order)."""
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _override(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE (a YAML value), got {text!r}")
    return key, yaml.safe_load(value)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument(
        "--set",
        dest="overrides",
        type=_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of tiny-cpu-balora.yml (a YAML value), e.g. --set sample_packing=true; repeatable",
    )
    parser.add_argument(
        "--hidden", type=int, default=32, help="model width (QLoRA on CPU: 64, bitsandbytes' block size)"
    )
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="balora-axolotl-"))
    workdir.mkdir(parents=True, exist_ok=True)

    build_assets(workdir, hidden=args.hidden)
    cfg = preflight(workdir, dict(args.overrides))
    residual = str(cfg.get("peft_init_lora_weights") or "").startswith("pissa")
    base_digest = digest(workdir / "tiny-llama")
    output = run_axolotl(workdir)
    steps = logged_metrics(output)
    missing = [m for m in METRICS if not steps or any(m not in s for s in steps)]
    if missing:
        raise AssertionError(
            f"BA-LoRA metrics {missing} missing from axolotl's step logs ({workdir / 'axolotl.log'})"
        )
    # Every micro-batch of step 1 runs before the first update, so the model still equals its reference (the
    # PiSSA snapshot, or the disabled plain-init adapter): a nonzero consistency term means the reference forward
    # differs from the trained one (masks, packing, kernels, checkpointing, quantisation).
    first = float(steps[0]["balora/consistency"])
    if abs(first) > 1e-6:
        raise AssertionError(
            f"balora/consistency at step 1 is {first:g}, not 0: the reference is not the model"
        )
    if not any(float(s["balora/consistency"]) > 0 for s in steps[1:]):
        raise AssertionError("balora/consistency stayed 0: the reference followed the trained adapter")
    out = workdir / "outputs" / "tiny-balora"
    written = ["adapter_model.safetensors", "balora_config.json"]
    if residual:  # the trainable form with its step-0 adapter, for continued training
        written += [
            "balora_resume/adapter_model.safetensors",
            "balora_resume/balora_ref/adapter_model.safetensors",
        ]
    for rel in written:
        if not (out / rel).is_file():
            raise AssertionError(f"{out / rel} was not written")
    if json.loads((out / "adapter_config.json").read_text())["init_lora_weights"] is not True:
        raise AssertionError(f"{out} does not hold the plain LoRA adapter at its root")
    tags = check_card(workdir)
    if residual and cfg.get("load_in_4bit"):
        # QPiSSA: axolotl's merge-lora simulates NF4 on the base for qlora configs (Q(W) + ΔW), while the root
        # is ΔW for the full-precision W; `balora export --merge` merges it into the untouched base
        from balora_plugins.core import export_merged

        export_merged(str(out), str(out / "merged"), base=str(workdir / "tiny-llama"))
    elif residual:
        run_axolotl(
            workdir, "merge-lora"
        )  # merges output_dir (its lora_model_dir default) into output_dir/merged
    if digest(workdir / "tiny-llama") != base_digest:
        raise AssertionError("the base checkpoint was modified")
    # the servable adapter on the untouched base and axolotl merge-lora's model, against the trained model
    # rebuilt independently from balora_resume/ (a plain-init root is the trained adapter itself: nothing to rebuild)
    errors = check_export(workdir) if residual else {}
    for what, err in errors.items():
        if err > 1e-4:
            raise AssertionError(f"{what}: {err:.2e} from the trained model's logits")
    result = {
        "workdir": str(workdir),
        "overrides": dict(args.overrides),
        "steps": len(steps),
        "first_step": steps[0],
        "card_tags": tags,
        **errors,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
