"""``axolotl train`` with the BA-LoRA plugin on 2 CPU processes, end to end through axolotl's torchrun launcher:
DeepSpeed ZeRO-2 and ZeRO-3 (``deepspeed:`` with example_configs/deepspeed/zero{2,3}.json) and FSDP2
(``fsdp_version: 2`` + ``fsdp_config:``), on the tiny recipe of integrations/axolotl/run_tiny.py.

Each run must: train 3 steps data-parallel (axolotl's epoch counter advances by 2 ranks × 2 rows per step), log
every BA-LoRA term, leave the base checkpoint untouched, and leave the final output (README "What you get after
training") written from gathered weights: the plain LoRA at the root must serve the trained model on the
untouched base (max |Δlogit| < 1e-4 against W − s·B₀A₀ plus the trained adapter of ``balora_resume/``), and
the initial adapter must be PiSSA's — s·B₀A₀ = the rank-r truncated SVD of the pre-trained weight (1e-5) —
also under ZeRO-3, which loads the model partitioned.
tests/cpu_launch/ explains how accelerate is given DeepSpeed and FSDP on CPU processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.axolotl
pytest.importorskip("axolotl")

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
STEPS, MICRO, WORLD, ROWS = 3, 2, 2, 64
RESUME, RESUME_FILES = "balora_resume", ("adapter_model.safetensors", "balora_ref/adapter_model.safetensors")
FSDP2 = {
    "fsdp_version": 2,
    "fsdp_config": {
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "reshard_after_forward": True,
    },
}
ENGINES = {  # YAML keys, and what tests/cpu_launch sets up in each worker
    "zero2": ({"deepspeed": str(ROOT / "example_configs" / "deepspeed" / "zero2.json")}, "deepspeed"),
    "zero3": ({"deepspeed": str(ROOT / "example_configs" / "deepspeed" / "zero3.json")}, "deepspeed"),
    "fsdp2": (FSDP2, "fsdp"),
}


def _run_tiny():
    spec = importlib.util.spec_from_file_location(
        "run_tiny", ROOT / "integrations" / "axolotl" / "run_tiny.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def axolotl_train(workdir: Path, overrides: dict, engine: str) -> str:
    """``axolotl train cfg.yml --launcher torchrun -- --nproc_per_node 2`` in ``workdir``; returns its output."""
    run_tiny = _run_tiny()
    cfg = yaml.safe_load(run_tiny.CONFIG.read_text(encoding="utf-8"))
    cfg.update(micro_batch_size=MICRO, gradient_accumulation_steps=1, max_steps=STEPS, **overrides)
    (workdir / "cfg.yml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    bin_dir = Path(sys.executable).parent  # axolotl's launcher calls `torchrun` from PATH
    env = {
        **os.environ,
        **run_tiny.ENV,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(
            [str(HERE / "cpu_launch"), str(ROOT), os.environ.get("PYTHONPATH", "")]
        ),
        "BALORA_CPU_ENGINE": engine,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [str(bin_dir / "axolotl"), "train", "cfg.yml", "--launcher", "torchrun", "--"]
    cmd += ["--nproc_per_node", str(WORLD), "--master_port", str(_free_port())]
    res = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    out = res.stdout + res.stderr
    (workdir / "axolotl.log").write_text(out, encoding="utf-8")
    assert res.returncode == 0, out[-6000:]
    return out


def check_pissa_init(workdir: Path) -> None:
    """s·B₀A₀ of the saved initial adapter is the rank-r truncated SVD of each pre-trained weight."""
    from safetensors.torch import load_file

    out = (
        workdir / "outputs" / "tiny-balora" / RESUME
    )  # the trained (residual-base) form and its step-0 adapter
    cfg = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    scale, r = cfg["lora_alpha"] / cfg["r"], cfg["r"]
    base = load_file(workdir / "tiny-llama" / "model.safetensors")
    initial = load_file(out / "balora_ref" / "adapter_model.safetensors")
    checked = 0
    for key, a0 in initial.items():
        if not key.endswith("lora_A.weight"):
            continue
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        u, s, vh = torch.linalg.svd(base[f"{name}.weight"].double(), full_matrices=False)
        truncated = (u[:, :r] * s[:r]) @ vh[:r]
        b0 = initial[key.replace("lora_A", "lora_B")]
        torch.testing.assert_close(
            scale * (b0.double() @ a0.double()), truncated, rtol=0, atol=1e-5, msg=name
        )
        checked += 1
    assert checked == 2 * 7, checked  # 2 layers × 7 projections


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINES))
def test_axolotl_train_on_two_cpu_processes(engine, tmp_path):
    overrides, launch = ENGINES[engine]
    if launch == "deepspeed":
        pytest.importorskip("deepspeed")
    run_tiny = _run_tiny()
    run_tiny.build_assets(tmp_path, rows=ROWS)
    base_digest = run_tiny.digest(tmp_path / "tiny-llama")
    output = axolotl_train(tmp_path, overrides, launch)

    steps = run_tiny.logged_metrics(output)
    assert len(steps) == STEPS, steps  # rank 0 logs
    for metric in run_tiny.METRICS:
        assert all(metric in s for s in steps), metric
    # 64 rows, 2 rows per rank and step: one epoch is 16 steps only if both ranks took their own rows
    assert float(steps[-1]["epoch"]) == pytest.approx(STEPS * MICRO * WORLD / ROWS)
    out = tmp_path / "outputs" / "tiny-balora"
    for rel in ("adapter_model.safetensors", "balora_config.json", *(f"{RESUME}/{f}" for f in RESUME_FILES)):
        assert (out / rel).is_file(), rel
    assert (
        json.loads((out / "adapter_config.json").read_text())["init_lora_weights"] is True
    )  # the plain LoRA
    assert run_tiny.digest(tmp_path / "tiny-llama") == base_digest, "the base checkpoint was modified"
    assert run_tiny.check_export(tmp_path, merged=False)["served_max_abs_err"] < 1e-4
    check_pissa_init(tmp_path)  # ZeRO-3 loads the model partitioned: PiSSA must have factorised whole weights


@pytest.mark.parametrize("key", ["context_parallel_size", "sequence_parallel_degree"])
def test_sequence_sharding_is_refused_at_validation(key):
    from balora_plugins.axolotl.args import BALoRAArgs, whole_sequences

    assert "_balora_whole_sequences" in dir(BALoRAArgs)  # a validator of the plugin's args model
    whole_sequences({"adapter": "lora", key: 1})
    with pytest.raises(ValueError, match=rf"{key}=2: .*Remove `{key}`"):
        whole_sequences({"adapter": "lora", key: 2})
