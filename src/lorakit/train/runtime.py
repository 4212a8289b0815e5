"""Who does what when a run has one process or several: the loop asks its runtime and never branches on it.

A runtime answers four questions: which of a step's micro-batches this process computes (`split`), how values
and gradients computed on shares become the step's (`sum`, `sum_gradients`), what every process must repeat
so that collectives line up (the fillers `split` returns), and who writes files and logs (`is_main`).

OneProcess is the identity. Torchrun (one process of a torchrun launch, distributed.py sets it up) shares a
step's window by position: process r takes micro-batches r, r + N, ... Every process divides its losses by
the whole window's normaliser, so summing the LoRA gradients across processes gives exactly the gradient one
process with grad_accum x N computes. The gradients are a few MB, so they are summed with one all_reduce per
dtype after the backward; a process whose share of a short last window is empty just contributes zeros, where
DistributedDataParallel would wait for its backward forever. With fsdp every forward gathers weights, so a
short share is padded with fillers: repeats of a micro-batch that count zero (training) or are discarded
(evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


def silent(_line: str) -> None:
    """The log of processes other than rank 0."""


class OneProcess:
    """A run in this process alone: every micro-batch is its own, every sum is the value itself."""

    rank, world, is_main, strategy = 0, 1, True, None

    def split(self, items: Iterable[T]) -> tuple[Iterable[T], list[T]]:
        """(this process's items, fillers to run besides): here all of them, lazily, and no fillers."""
        return items, []

    def sum(self, values: Sequence[float]) -> list[float]:
        return list(values)

    def sum_gradients(self, params: Sequence[nn.Parameter]) -> None:
        pass

    def broadcast_parameters(self, params: Sequence[nn.Parameter]) -> None:
        pass

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass

    def log(self, log: Callable[[str], None]) -> Callable[[str], None]:
        return log

    def describe(self, grad_accum: int, batch_size: int) -> str | None:
        return None


@dataclass
class Torchrun:
    """This process's place in a torchrun launch (init_distributed in distributed.py builds it)."""

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

    def split(self, items: Iterable[T]) -> tuple[list[T], list[T]]:
        """(this process's share of `items`, fillers: repeats of the first item to run with zero weight)."""
        items = list(items)
        return self.share(items), items[:1] * self.padding(items)

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

    def log(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """`log` on rank 0; the others stay silent."""
        return log if self.is_main else silent

    def describe(self, grad_accum: int, batch_size: int) -> str | None:
        return (f"distributed: {self.world} processes ({self.backend}); each step takes {self.world} x grad_accum "
                f"{grad_accum} micro-batches of {batch_size} = a global batch of {self.world * grad_accum * batch_size}")

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")


Runtime = OneProcess | Torchrun
