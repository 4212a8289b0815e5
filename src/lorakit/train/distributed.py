"""Data-parallel training under torchrun: the same run config on N processes, nothing else to set up.

torchrun starts the processes and tells each its rank (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
lorakit only joins the process group torch.distributed sets up from them (init_distributed), and the loop
then asks a runtime.Torchrun which micro-batches are this process's and how to sum (runtime.py says how).

strategy fsdp also shards the frozen weights of every decoder layer across the processes with PyTorch's
FSDP2 (`fully_shard`): a layer's full weights exist only while it runs (gathered for its forward and again
for its backward), so each process holds about 1/N of them. The LoRA weights are left out of the sharding
(`ignored_params`): they stay plain, replicated tensors, so gradients, optimizer, checkpoints and the saved
adapter work exactly as with ddp.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..config import DistributedConfig
from ..errors import ConfigError
from ..lora.inject import is_quantized_linear
from .activation_checkpointing import decoder_layers
from .runtime import OneProcess, Runtime, Torchrun

QUANTIZED_FSDP = ("distributed.strategy: fsdp cannot shard a 4/8-bit (bitsandbytes) base; use ddp, where each "
                  "process holds the quantized model (a 4-bit 7B takes about 4 GB)")


def shard_base_layers(model: nn.Module, run: Torchrun) -> int:
    """fully_shard every decoder layer's frozen weights across the processes; the trainable (LoRA) weights stay
    whole. Returns the number of layers sharded."""
    from torch.distributed.fsdp import FSDPModule

    base = getattr(model, "model", model)
    layers = decoder_layers(base)
    if not layers:
        raise ConfigError(f"distributed.strategy: fsdp shards decoder layers, and lorakit finds none in "
                          f"{type(base).__name__} (transformers' GradientCheckpointingLayer); use ddp",
                          where="run config")
    if any(is_quantized_linear(m) for m in base.modules()):
        raise ConfigError(QUANTIZED_FSDP, where="run config")
    todo = [layer for layer in layers if not isinstance(layer, FSDPModule)]  # not loaded into shards already
    if todo:
        fully_shard_layers(todo, run.world, "cuda" if run.backend == "nccl" else "cpu")
    return len(layers)


def fully_shard_layers(layers: list[nn.Module], world: int, device_type: str) -> None:
    """fully_shard each layer over `world` processes (FSDP2); its trainable (LoRA) parameters stay whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world,))
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params={p for p in layer.parameters() if p.requires_grad})


def launched_processes() -> int:
    """How many processes torchrun started for this run (1 when not under torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; start several processes with "
                          "torchrun --nproc-per-node N -m lorakit train run.yaml", where="distributed") from None


def init_distributed(config: DistributedConfig) -> Torchrun | None:
    """Join the process group torchrun described in the environment; None for a single process."""
    world = launched_processes()
    if world <= 1:
        return None
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the run with torchrun "
                          "(torchrun --nproc-per-node N -m lorakit train run.yaml), which sets them all",
                          where="distributed")
    backend = config.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("distributed.backend: nccl needs CUDA, which this process does not have; use gloo or "
                          "auto", where="run config")
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend == "nccl":
        torch.cuda.set_device(local_rank)  # "cuda" now means this process's GPU, for loading and for NCCL
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=config.timeout_s))
    return Torchrun(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, backend=backend,
                          strategy=config.strategy)


def init_runtime(config: DistributedConfig) -> Runtime:
    """This process's runtime: its place in a torchrun launch, or OneProcess when not launched by torchrun."""
    return init_distributed(config) or OneProcess()
