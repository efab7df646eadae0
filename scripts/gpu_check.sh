#!/usr/bin/env bash
# The GPU check: everything this project can only verify on a CUDA GPU, in under 8 minutes on one GPU.
#
#   scripts/gpu_check.sh [OUT_DIR]        (default: $OUT, else ./gpu_check)
#
# 1. the tests marked `gpu` (bf16/fp16 fused path vs plain logits on CUDA; peak CUDA memory of the fused path vs
#    plain logits; the TRL trainer, the callback and axolotl's trainer for a few bf16 steps on CUDA), ≤ 4 min;
# 2. `balora bench --device cuda --dtype bf16` on the Qwen2.5-0.5B shape (4 × 1024 tokens, r = α = 128), ≤ 4 min.
#
# Writes OUT_DIR/gpu_check.json (one document: the environment, the pytest summary, the benchmark's document),
# beside OUT_DIR/pytest.xml, OUT_DIR/pytest.log, OUT_DIR/bench.json and OUT_DIR/bench.log.
# Needs a Python with torch (CUDA build) already installed; installs nothing heavy: the project (editable) with
# its light dependencies (transformers, peft, accelerate, trl, pytest, ...) only when they are missing, never
# torch. Exit code: 0 when the tests passed and the benchmark ran, 3 without a CUDA GPU, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-./gpu_check}}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  AXOLOTL_DO_NOT_TRACK=1 WANDB_MODE=disabled PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)

if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU visible to torch; nothing to check." >&2
  exit 3
fi
if ! "$py" -c "import balora_plugins, transformers, peft, trl, accelerate, pytest, datasets" 2>/dev/null; then
  # torch is installed (checked above), so pip keeps it; the rest is small
  "$py" -m pip install --quiet -e ".[trl,test]" || { echo "gpu_check: installing the project failed" >&2; exit 1; }
fi

timeout 240 "$py" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$out/pytest.xml" tests \
  > "$out/pytest.log" 2>&1
tests_rc=$?
tail -3 "$out/pytest.log"

timeout 240 "$py" -m balora_plugins.tools.bench --device cuda --dtype bf16 --shape qwen2.5-0.5b \
  --batch 4 --seq-len 1024 --warmup 1 --steps 3 --term-reps 1 --no-nlu --json "$out/bench.json" \
  > "$out/bench.log" 2>&1
bench_rc=$?
grep -A 40 "^ratio" "$out/bench.log" | head -40

"$py" - "$out" "$tests_rc" "$bench_rc" "$start" <<'PY'
import json, os, sys, time
import xml.etree.ElementTree as ET

import torch

out, tests_rc, bench_rc, start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
doc = {
    "environment": {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
    },
    "pytest": {"exit_code": tests_rc},
    "bench": {"exit_code": bench_rc},
}
try:
    suite = ET.parse(os.path.join(out, "pytest.xml")).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    doc["pytest"].update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
    doc["pytest"]["seconds"] = float(suite.get("time", 0))
    doc["pytest"]["failed"] = [
        f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
except (OSError, ET.ParseError, IndexError) as e:
    doc["pytest"]["error"] = repr(e)
try:
    with open(os.path.join(out, "bench.json")) as f:
        doc["bench"]["document"] = json.load(f)
except (OSError, ValueError) as e:
    doc["bench"]["error"] = repr(e)
doc["wall_s"] = round(time.time() - start, 1)
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(doc, f, indent=2)
print(f"gpu_check: wrote {os.path.join(out, 'gpu_check.json')} ({doc['wall_s']} s)")
PY

[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && exit 0
exit 1
