"""Run DeepSpeed and FSDP through accelerate on CPU processes (gloo), for the tests only.

accelerate (1.13 - 1.15) sets up DeepSpeed and FSDP only on accelerator devices: on a CPU machine it never starts
a process group for DeepSpeed (its backend lookup knows GPUs, XPUs, NPUs, ...), so the Trainer sees one process,
and it switches FSDP on only for multi-device groups, so ``TrainingArguments(fsdp=...)`` silently trains DDP.
:func:`configure` starts the gloo group first and describes it as accelerate would on GPUs, again whenever a
host resets accelerate's state (the Trainer and axolotl do), and patches the few places where the hosts hard-code
a GPU. Everything else — how the Trainer wraps, shards, saves and resumes the model — is the host's own code.
"""

from __future__ import annotations

import os


def configure(engine: str) -> None:
    """Prepare this process for ``engine`` ("deepspeed" or "fsdp"); a no-op for anything else."""
    if engine not in ("deepspeed", "fsdp"):
        return
    from accelerate.state import AcceleratorState

    if engine == "deepspeed":
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        import importlib

        # DeepSpeed's shared-memory all-reduce for CPUs is a C++ op compiled on first use (minutes on 2 cores);
        # gloo's own all-reduce computes the same sums. (`deepspeed.comm.torch` as an attribute is the torch package.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    else:
        _fsdp_on_cpu()
    _state(engine)
    _axolotl_on_cpu()
    reset = AcceleratorState._reset_state

    def reset_and_configure(reset_partial_state: bool = False) -> None:
        reset(reset_partial_state)
        if reset_partial_state:
            _state(engine)

    AcceleratorState._reset_state = staticmethod(reset_and_configure)


def _state(engine: str) -> None:
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    PartialState(backend="gloo")  # the process group survives a reset: this only rebuilds accelerate's view
    if engine == "fsdp":
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def _fsdp_on_cpu() -> None:
    import torch.distributed.fsdp as fsdp

    # FSDP1's full state dict "offloaded to CPU" for rank 0 alone crashes (SIGSEGV) when the parameters are on the
    # CPU already (torch 2.13, the host alone); accelerate hard-codes it for FSDP1: gather on every rank instead
    full_config = fsdp.FullStateDictConfig
    fsdp.FullStateDictConfig = lambda **kw: full_config(offload_to_cpu=False, rank0_only=False)
    # axolotl (0.19 - 0.21) builds FSDP's device mesh with device type "cuda", hard-coded
    from accelerate.parallelism_config import ParallelismConfig

    build = ParallelismConfig.build_device_mesh
    ParallelismConfig.build_device_mesh = lambda self, device_type: build(self, "cpu")


def _axolotl_on_cpu() -> None:
    """axolotl (0.19 - 0.21) places each rank's model on accelerator ``LOCAL_RANK`` (``device_map: {"": rank}``,
    set after the YAML is read); on CPU processes the model stays on the CPU."""
    try:
        import axolotl.utils.config as config
    except ImportError:
        return
    normalize = config.normalize_config

    def normalize_on_cpu(cfg):
        normalize(cfg)
        if isinstance(cfg.device_map, dict):
            cfg.device_map = {"": "cpu"}

    config.normalize_config = normalize_on_cpu
    # axolotl 0.21 asks CUDA whether ranks 0 and 1 can access each other's memory; a CUDA build of torch without
    # a driver raises instead of answering
    import axolotl.utils.environment as environment

    environment.check_cuda_p2p_support = lambda: True
