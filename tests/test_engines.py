"""BA-LoRA under the engines users launch — DeepSpeed ZeRO-2/3 and FSDP1/2, set up by the Trainer from
``TrainingArguments(deepspeed=...)`` / ``TrainingArguments(fsdp=..., fsdp_config=...)`` — on 2 CPU processes (gloo).

Parity: every 2-process run (2 rows per rank) ends with the adapter, the initial adapter (``balora_ref/``) and the
plain LoRA of the final output that one process ends with on the same global batch (2 rows × 2 accumulation
steps; all three terms on, SGD at lr 0.5, 4 steps, fp32). Tolerance: 1e-6 absolute + 1e-5 relative — measured differences are
≤ 3e-8 (reduction order); a run that ignored the snapshot or the sharded head differs by > 1e-3. A run killed
after its step-2 checkpoint and resumed (with its in-memory reference corrupted) must end there too.
The worker is tests/engine_worker.py; tests/cpu_launch/ explains how accelerate is set up on CPUs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from balora_plugins.engines import package_version

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "engine_worker.py")
TOL = dict(rtol=1e-5, atol=1e-6)
# the final output (README "What you get after training"): the trained adapter and its step-0 adapter in
# balora_resume/, the plain LoRA that serves on the untouched base at the root
FILES = (
    "balora_resume/adapter_model.safetensors",
    "balora_resume/balora_ref/adapter_model.safetensors",
    "adapter_model.safetensors",
)


def run(out, *args: str, nproc: int = 2) -> dict:
    """Run the worker (``nproc`` processes) into ``out``; returns its logs and engine facts."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, WORKER, str(out), *args]
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        cmd = [*launch, "--master_port", str(free_port()), WORKER, str(out), *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    logs = os.path.join(out, "logs.json")
    return json.load(open(logs, encoding="utf-8")) if os.path.isfile(logs) else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def saved(out) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return {name: load_file(os.path.join(out, "final", name)) for name in FILES}


def assert_same_run(got, want) -> None:
    for name in FILES:
        a, b = got[name], want[name]
        assert a.keys() == b.keys() and len(a) > 0, name
        for k in b:
            torch.testing.assert_close(a[k], b[k], **TOL, msg=f"{name}: {k}")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, 2 rows × 2 accumulation steps per step (the same global batch)."""
    out = tmp_path_factory.mktemp("one") / "run"
    logs = run(out, "--ga", "2", nproc=1)["logs"]
    result = saved(out)
    trained, initial = result[FILES[0]], result[FILES[1]]
    moved = max((trained[k] - initial[k]).abs().max().item() for k in trained)
    assert moved > 1e-2, "the adapter did not train: the comparisons would be vacuous"
    return {**result, "losses": [h["loss"] for h in logs]}


def assert_resumed(logs: list[dict], one_process: dict) -> None:
    """Steps 1-2 come from the checkpoint's state, steps 3-4 were trained after resuming, with the same losses."""
    assert [h["step"] for h in logs] == [1, 2, 3, 4]
    assert [h["loss"] for h in logs[2:]] == pytest.approx(one_process["losses"][2:], rel=1e-5)


def check_facts(facts: dict, *, engine: str, ref_model: str | None = None) -> None:
    """The run was the engine it claims (2 ranks, the head sharded) — not a silent fallback to DDP."""
    assert facts["world_size"] == 2
    if engine.startswith("zero"):
        assert facts["distributed_type"] == "DEEPSPEED" and facts["zero_stage"] == int(engine[-1])
        assert facts["head_sharded"] == (engine == "zero3")
    else:
        assert facts["distributed_type"] == "FSDP" and facts["fsdp_version"] == int(engine[-1])
        assert facts["head_sharded"]
    assert facts["ref_model"] == ref_model


# ---------------------------------------------------------------------------------------------- DeepSpeed
@pytest.mark.slow
@pytest.mark.engines
def test_zero2_callback_matches_one_process(one_process, tmp_path):
    pytest.importorskip("deepspeed")
    result = run(tmp_path / "run", "--engine", "zero2")
    check_facts(result["facts"], engine="zero2")
    assert_same_run(saved(tmp_path / "run"), one_process)


@pytest.mark.slow
@pytest.mark.engines
def test_zero3_callback_with_a_ref_model_matches_one_process(one_process, tmp_path):
    """ZeRO-3 through BALoRACallback with an explicit ref_model: the head is partitioned (gathered per step), the
    reference model is a DeepSpeed inference engine sharded like the trained model (as TRL prepares its reference),
    placed once although the callback attaches again to save, and the step-0 adapter is kept for the export. The
    pre-trained base as reference = the snapshot reference."""
    pytest.importorskip("deepspeed")
    result = run(tmp_path / "run", "--engine", "zero3", "--ref-model")
    check_facts(result["facts"], engine="zero3", ref_model="DeepSpeedEngine")
    assert_same_run(saved(tmp_path / "run"), one_process)


@pytest.mark.slow
@pytest.mark.engines
def test_zero3_trl_killed_and_resumed_ends_where_one_process_ends(one_process, tmp_path):
    """BALoRASFTTrainer under ZeRO-3, killed after its step-2 checkpoint: DeepSpeed's checkpoint holds no frozen
    weight, so the resumed run must take the reference snapshot from the checkpoint's balora_ref/."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    run(out, "--engine", "zero3", "--door", "trl", "--save-steps", "2", "--kill-after", "2")
    ckpt = out / "checkpoint-2"
    assert (ckpt / "global_step2").is_dir() and not (
        out / "final"
    ).exists()  # DeepSpeed's own checkpoint, killed
    from safetensors.torch import load_file

    card = (ckpt / "README.md").read_text()  # the engine's own files are named as not servable
    assert "`global_step2`: the training engine's own resume state" in card
    ref = load_file(
        ckpt / "balora_resume" / "balora_ref" / "adapter_model.safetensors"
    )  # gathered from the partitions
    for k, v in one_process[FILES[1]].items():
        torch.testing.assert_close(ref[k], v, rtol=0, atol=0)
    result = run(out, "--engine", "zero3", "--door", "trl", "--save-steps", "2", "--resume")
    check_facts(result["facts"], engine="zero3")
    assert_resumed(result["logs"], one_process)
    assert_same_run(saved(out), one_process)


# ---------------------------------------------------------------------------------------------- FSDP
@pytest.mark.slow
@pytest.mark.engines
def test_fsdp2_trl_killed_and_resumed_ends_where_one_process_ends(one_process, tmp_path):
    """FSDP2 (fsdp_version 2, accelerate's default SHARDED_STATE_DICT): the checkpoint holds the adapter files and
    balora_ref/ (written from a full state dict) beside the sharded model and optimizer; resume restores the
    DTensor-sharded reference from it."""
    out = tmp_path / "run"
    run(out, "--engine", "fsdp2", "--door", "trl", "--save-steps", "2", "--kill-after", "2")
    ckpt = out / "checkpoint-2"
    assert (ckpt / "pytorch_model_fsdp_0").is_dir() and (
        ckpt / "balora_resume" / "balora_ref" / "adapter_config.json"
    ).is_file()
    assert "`pytorch_model_fsdp*`: the training engine's own resume state" in (ckpt / "README.md").read_text()
    result = run(out, "--engine", "fsdp2", "--door", "trl", "--save-steps", "2", "--resume")
    check_facts(result["facts"], engine="fsdp2")
    assert_resumed(result["logs"], one_process)
    assert_same_run(saved(out), one_process)


@pytest.mark.slow
@pytest.mark.skipif(
    package_version("peft") >= (0, 21),
    reason="PEFT >= 0.21 saves empty adapters under FSDP1: refused (tested with 0.20)",
)
def test_fsdp1_callback_matches_one_process(one_process, tmp_path):
    """FSDP1 (use_orig_params): the root unit (embeddings, norm, head) is gathered for the head and the reference
    forward. PEFT 0.21 saves empty adapters under FSDP1, so there BA-LoRA refuses it (see the refusal tests)."""
    result = run(tmp_path / "run", "--engine", "fsdp1")
    check_facts(result["facts"], engine="fsdp1")
    assert_same_run(saved(tmp_path / "run"), one_process)


# ---------------------------------------------------------------------------------------------- refusals
def _accelerator(zero=None, fsdp=None, parallel=None):
    ds = None if zero is None else SimpleNamespace(deepspeed_config={"zero_optimization": zero})
    state = SimpleNamespace(deepspeed_plugin=ds, fsdp_plugin=fsdp)
    return SimpleNamespace(state=state, parallelism_config=parallel)


@pytest.mark.parametrize(
    ("accelerator", "match"),
    [
        pytest.param(
            _accelerator(zero={"stage": 3}), "stage3_gather_16bit_weights_on_model_save", id="zero3 no gather"
        ),
        pytest.param(
            _accelerator(zero={"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}),
            "stage3_gather_16bit_weights_on_model_save=False",
            id="zero3 gather false",
        ),
        pytest.param(
            _accelerator(fsdp=SimpleNamespace(fsdp_version=1, use_orig_params=False)),
            "use_orig_params",
            id="fsdp1 flat params",
        ),
        pytest.param(
            _accelerator(parallel=SimpleNamespace(cp_enabled=True, sp_enabled=False)),
            "context parallelism",
            id="context parallel",
        ),
    ],
)
def test_engine_settings_that_cannot_work_are_refused_by_name(accelerator, match):
    from balora_plugins.engines import check_engine

    with pytest.raises(ValueError, match=match):
        check_engine(accelerator)


def test_fsdp1_is_refused_with_peft_021_and_the_supported_engines_pass(monkeypatch):
    from balora_plugins import engines

    fsdp1 = _accelerator(fsdp=SimpleNamespace(fsdp_version=1, use_orig_params=True))
    monkeypatch.setattr(engines, "package_version", lambda name: (0, 21))
    with pytest.raises(ValueError, match=r"FSDP1 .*PEFT 0\.21.*FSDP2"):
        engines.check_engine(fsdp1)
    monkeypatch.setattr(engines, "package_version", lambda name: (0, 20))
    engines.check_engine(fsdp1)
    for ok in (
        _accelerator(),
        _accelerator(zero={"stage": 2}),
        _accelerator(zero={"stage": 3, "gather_16bit_weights_on_model_save": True}),  # the newer key name
        _accelerator(fsdp=SimpleNamespace(fsdp_version=2)),
    ):
        engines.check_engine(ok)


def test_full_state_dict_saving_switches_only_for_the_block():
    pytest.importorskip("torch.distributed.fsdp")
    from accelerate.utils import FullyShardedDataParallelPlugin

    from balora_plugins.engines import full_state_dict_saving

    plugin = FullyShardedDataParallelPlugin.__new__(FullyShardedDataParallelPlugin)
    plugin.fsdp_version, plugin.state_dict_type = 2, None
    plugin.state_dict_config = plugin.optim_state_dict_config = None
    plugin.set_state_dict_type("SHARDED_STATE_DICT")
    before = (plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config)
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))
    with full_state_dict_saving(accelerator):
        assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
        assert type(plugin.state_dict_config).__name__ == "FullStateDictConfig"
    assert (plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config) == before
