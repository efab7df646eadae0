"""Worker for tests/test_distributed.py: BA-LoRA gradients under FSDP2 (fully_shard, 2 CPU ranks on gloo).

Each rank runs its own micro-batch; the token-level terms use the global token count and the ×world-size
factor, FSDP averages the gradients, and rank 0 saves the full LoRA gradients for comparison with one
process running the concatenated batch. Argument: OUT.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from conftest import CONSTANT, batch, lora, tiny_llama  # noqa: E402

from balora_plugins import BALoRAConfig  # noqa: E402
from balora_plugins.core import BALoRAObjective, LossScaling  # noqa: E402
from balora_plugins.functional import valid_position_mask  # noqa: E402

CFG = BALoRAConfig(
    lambda_consistency=1.0, lambda_diversity=0.5, lambda_svd=0.0, diversity_top_k=8, **CONSTANT
)


def model_and_objective():
    model = lora(tiny_llama(seed=3), init="pissa")
    obj = BALoRAObjective(CFG).prepare(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # move away from the reference so the consistency term has a gradient
        for name, p in model.named_parameters():
            if ".default." in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model, obj


def micro_batches():
    return [batch(b=2, t=10, seed=s) for s in (0, 1)]


def total_rows(batches):
    return sum(int(valid_position_mask(b["labels"]).sum()) for b in batches)


def grads(model):
    out = {}
    for name, p in model.named_parameters():
        if ".default." in name and p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[name.replace("_fsdp_wrapped_module.", "")] = g.detach().clone()
    return out


def run_single():
    model, obj = model_and_objective()
    model.train()
    mbs = micro_batches()
    x = {k: torch.cat([b[k] for b in mbs]) for k in mbs[0]}
    model(**x)
    reg, _ = obj.compute(
        model, x, scaling=LossScaling(num_items_in_batch=total_rows(mbs), host_divides_by_ga=False)
    )
    reg.backward()
    return grads(model)


def run_fsdp(out):
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, obj = model_and_objective()
    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.train()
    mbs = micro_batches()
    x = mbs[rank]
    model(**x)
    scaling = LossScaling(
        num_items_in_batch=total_rows(mbs), world_factor=float(world), host_divides_by_ga=False
    )
    reg, _ = obj.compute(model, x, scaling=scaling)
    reg.backward()
    g = grads(model)
    if rank == 0:
        torch.save(g, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "single":
        torch.save(run_single(), sys.argv[2])
    else:
        run_fsdp(sys.argv[2])
