"""DDP (2 CPU processes, gloo) follows the one-process trajectory for the token-level terms (SPEC §3.3)."""

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
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000)] + cmd[1:]
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
