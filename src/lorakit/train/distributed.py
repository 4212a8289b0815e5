"""Data-parallel training under torchrun: the same run config on N processes, nothing else to set up.

torchrun starts the processes and tells each its rank (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
lorakit only joins the process group torch.distributed sets up from them. Each step's global window of
micro-batches (grad_accum x N of them, in the same order a single process would take them) is shared out
by position: process r takes micro-batches r, r + N, ... Every process divides its losses by the window's
supervised-token count, so summing the LoRA gradients across processes gives exactly the gradient one
process with grad_accum x N would compute. The LoRA gradients are a few MB, so they are summed with one
all_reduce per dtype after the backward; a process whose share of a short last window is empty just
contributes zeros, where DistributedDataParallel would wait for its backward forever.

strategy fsdp also shards the frozen weights of every decoder layer across the processes with PyTorch's
FSDP2 (`fully_shard`): a layer's full weights exist only while it runs (gathered for its forward and again
for its backward), so each process holds about 1/N of them. The LoRA weights are left out of the sharding
(`ignored_params`): they stay plain, replicated tensors, so gradients, optimizer, checkpoints and the saved
adapter work exactly as with ddp. Every forward gathers, so all processes must run the same number of them:
a short share is padded with a zero-weight repeat of a micro-batch (training) or a discarded forward (evaluation).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..config import DistributedConfig
from ..errors import ConfigError
from ..lora.inject import is_quantized_linear

T = TypeVar("T")


@dataclass
class DistributedRun:
    rank: int
    world: int
    local_rank: int
    backend: str
    strategy: str = "ddp"

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes metrics, checkpoints and the adapter; the others only compute."""
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's items: positions rank, rank + world, ... (possibly none)."""
        return list(items[self.rank::self.world])

    def padding(self, items: Sequence) -> int:
        """How many extra forwards this process runs so that every process runs as many as the busiest one:
        0 with ddp; with fsdp, one per item its share lacks (every forward is a collective)."""
        if self.strategy != "fsdp":
            return 0
        return -(-len(items) // self.world) - len(self.share(items))

    def sum(self, values: Sequence[float]) -> list[float]:
        """The element-wise sum of `values` over all processes (float64)."""
        total = torch.tensor(list(values), dtype=torch.float64, device=self._device())
        dist.all_reduce(total)
        return total.tolist()

    def sum_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Replace each parameter's gradient by its sum over all processes (a missing one counts as zeros)."""
        groups: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
        for group in groups.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            dist.all_reduce(flat)
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n

    def broadcast_parameters(self, params: Sequence[nn.Parameter]) -> None:
        """Make every process start from rank 0's values (they agree already when seeded alike; this makes it so)."""
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")


def silent(_line: str) -> None:
    """The log of processes other than rank 0."""


QUANTIZED_FSDP = ("distributed.strategy: fsdp cannot shard a 4/8-bit (bitsandbytes) base; use ddp, where each "
                  "process holds the quantized model (a 4-bit 7B takes about 4 GB)")


def shard_base_layers(model: nn.Module, run: DistributedRun) -> int:
    """fully_shard every decoder layer's frozen weights across the processes; the trainable (LoRA) weights stay
    whole. Returns the number of layers sharded."""
    from torch.distributed.fsdp import FSDPModule

    from .checkpointing import decoder_layers

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


def init_distributed(config: DistributedConfig) -> DistributedRun | None:
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
    return DistributedRun(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, backend=backend,
                          strategy=config.strategy)
