"""Put this folder on PYTHONPATH with BALORA_CPU_ENGINE=deepspeed|fsdp to run a launcher's workers (``axolotl
train --launcher torchrun``) with DeepSpeed / FSDP on CPU processes; see cpu_engines.py. Inert otherwise, and in
processes a configured worker starts (dataset workers inherit its environment but must not join its group)."""

import os

if (
    os.environ.get("BALORA_CPU_ENGINE")
    and os.environ.get("LOCAL_RANK") is not None
    and not os.environ.get("BALORA_CPU_ENGINE_CONFIGURED")
):
    os.environ["BALORA_CPU_ENGINE_CONFIGURED"] = str(os.getpid())
    from cpu_engines import configure

    configure(os.environ["BALORA_CPU_ENGINE"])
