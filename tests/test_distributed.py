"""DDP (2 CPU processes, gloo) follows the one-process trajectory for the token-level terms (docs/method.md §3.3)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(__file__)


def _run(out, per_device, nproc, ga=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, os.path.join(HERE, "dist_worker.py"), str(out), str(per_device), str(ga)]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(29500 + os.getpid() % 1000),
        ] + cmd[1:]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return torch.load(os.path.join(out, "adapter.pt"))


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    one = _run(tmp_path / "one", per_device=4, nproc=1)
    single, ddp = one["final"], _run(tmp_path / "two", per_device=2, nproc=2)["final"]
    accum = _run(tmp_path / "ga", per_device=2, nproc=1, ga=2)["final"]
    assert single.keys() == ddp.keys() and len(single) > 0
    moved = max((single[k] - one["initial"][k]).abs().max().item() for k in single)
    assert moved > 1e-3, "the adapter did not train: the comparison would be vacuous"
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-5, atol=1e-6, msg=f"DDP differs at {k}")
        torch.testing.assert_close(accum[k], single[k], rtol=1e-5, atol=1e-6, msg=f"GA differs at {k}")


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_process_gradients(tmp_path):
    """FSDP2 (fully_shard) on CPU/gloo: the head is gathered, the reference forward runs through the sharded
    backbone, and the LoRA gradients equal one process's on the concatenated batch."""
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed.fsdp.fully_shard")
    worker = os.path.join(HERE, "fsdp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    single, sharded = tmp_path / "single.pt", tmp_path / "fsdp.pt"
    res = subprocess.run(
        [sys.executable, worker, "single", str(single)], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-4000:]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(30500 + os.getpid() % 1000),
        worker,
        "fsdp",
        str(sharded),
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    one, two = torch.load(single), torch.load(sharded)
    assert one.keys() == two.keys() and len(one) > 0
    assert max(g.abs().max().item() for g in one.values()) > 1e-4, "vacuous: no gradient"
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-7, msg=f"FSDP2 gradient differs at {k}")
