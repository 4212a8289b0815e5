"""Several adapters trained in one run: a TaskSet's batches hold rows of every task, each row routed through its
own task's adapter (lora/routing.py), so one forward and backward over the frozen base trains them all.

Each task keeps the batch order it would have alone: its micro-batches are drawn from its own seeded sampler,
one per task in each joint micro-batch, and a task with fewer batches than the largest starts its next epoch
where it would alone. Its loss is divided by ITS OWN supervised tokens in the window and its adapter's
gradient is clipped by its own norm, so each adapter gets the update that training it alone on the same rows
would give (AdamW is per parameter). One joint epoch is one pass over the largest task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from ..data import LengthGroupedBatchSampler, PreparedData
from ..data.collate import collate
from ..data.templates import IGNORE_INDEX
from ..errors import ConfigError
from ..lora import LoraModel
from ..lora.routing import route_rows
from .chunked_loss import lm_loss_sums

TASK_ROWS = "task_rows"  # batch key: ((task name, first row, end row), ...); not a model input


@dataclass
class Task:
    name: str
    """The adapter this task trains (already added to the LoraModel)."""
    data: PreparedData
    eval_data: PreparedData | None = None
    lr: float | None = None
    """This adapter's peak learning rate (None: the run's train.lr)."""


class TaskSet:
    """The tasks of a run and their joint batches; `fit` takes it in place of one PreparedData."""

    def __init__(self, tasks: Sequence[Task]):
        self.tasks = list(tasks)
        if not self.tasks:
            raise ConfigError("a multi-task run needs at least one task", where="tasks")
        for task in self.tasks:
            if task.data.packing:
                raise ConfigError(f"task {task.name!r}: its data would be packed; rows of different tasks cannot "
                                  "share a packed row, so set data.packing: false", where="tasks")
        self.pad_token_id = self.tasks[0].data.pad_token_id
        self.names = [task.name for task in self.tasks]

    @property
    def examples(self) -> int:
        return sum(len(task.data.examples) for task in self.tasks)

    def _samplers(self, batch_size: int, seed: int, group: int = 50) -> list[LengthGroupedBatchSampler]:
        # The sampler iter_batches builds for the task alone: same lengths, batch size, seed and group, same order.
        return [LengthGroupedBatchSampler([len(e.input_ids) for e in task.data.examples], batch_size, seed=seed,
                                          mega_batch_factor=group) for task in self.tasks]

    def batches_per_epoch(self, batch_size: int) -> int:
        return max(len(sampler) for sampler in self._samplers(batch_size, 0))

    def batches(self, batch_size: int, *, seed: int, epoch: int, start: int = 0, group: int = 50) -> Iterator[dict]:
        """Joint micro-batches `start`, `start + 1`, ... of joint epoch `epoch`: a pure function of its
        arguments, so a resume lands on the exact batch. `group` as for iter_batches."""
        samplers = self._samplers(batch_size, seed, group)
        per_epoch = max(len(s) for s in samplers)
        orders: dict[tuple[int, int], list[list[int]]] = {}
        for index in range(start, per_epoch):
            parts = []
            for k, (task, sampler) in enumerate(zip(self.tasks, samplers)):
                drawn = epoch * per_epoch + index  # this task's micro-batches drawn before this one
                task_epoch, position = divmod(drawn, len(sampler))
                if (k, task_epoch) not in orders:
                    orders[(k, task_epoch)] = sampler.batches(task_epoch)
                rows = orders[(k, task_epoch)][position]
                parts.append((task.name, collate([task.data.examples[i] for i in rows], self.pad_token_id)))
            yield joint_batch(parts, self.pad_token_id)


def joint_batch(parts: Sequence[tuple[str, dict]], pad_token_id: int) -> dict:
    """Stack each task's collated batch into one, right-padded to the longest (pads are masked and unlabelled,
    so no real token's output changes), with the row range of each task."""
    width = max(batch["input_ids"].shape[1] for _, batch in parts)

    def padded(t: torch.Tensor, value: int) -> torch.Tensor:  # (rows, seq) -> (rows, width)
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    out = {"input_ids": torch.cat([padded(b["input_ids"], pad_token_id) for _, b in parts]),
           "labels": torch.cat([padded(b["labels"], IGNORE_INDEX) for _, b in parts]),
           "attention_mask": torch.cat([padded(b["attention_mask"], 0) for _, b in parts])}
    rows, first = [], 0
    for name, batch in parts:
        rows.append((name, first, first + batch["input_ids"].shape[0]))
        first = rows[-1][2]
    out[TASK_ROWS] = tuple(rows)
    return out


def row_adapters(batch: dict) -> list[str]:
    """One adapter name per row, for route_rows."""
    return [name for name, first, end in batch[TASK_ROWS] for _ in range(first, end)]


def task_labels(batch: dict, name: str) -> torch.Tensor:
    """The batch's labels with every row of the other tasks unlabelled."""
    labels = torch.full_like(batch["labels"], IGNORE_INDEX)
    for task, first, end in batch[TASK_ROWS]:
        if task == name:
            labels[first:end] = batch["labels"][first:end]
    return labels


def supervised_by_task(window: Sequence[dict], names: Sequence[str]) -> dict[str, int]:
    """Each task's supervised (shifted) label count over an accumulation window."""
    counts = dict.fromkeys(names, 0)
    for batch in window:
        for name, first, end in batch[TASK_ROWS]:
            counts[name] += int((batch["labels"][first:end, 1:] != IGNORE_INDEX).sum())
    return counts


def task_loss_sums(model: nn.Module, inputs: dict, batch: dict, names: Sequence[str], chunk_tokens: int | None,
                   *, compiled: bool = False) -> dict[str, torch.Tensor]:
    """Each task's summed loss over its rows of `batch`, from one forward with each row routed to its adapter."""
    with route_rows(row_adapters(batch)):
        sums = lm_loss_sums(model, inputs, [task_labels(batch, name) for name in names], chunk_tokens,
                            compiled=compiled)
    return {name: loss for name, (loss, _) in zip(names, sums)}


def adapter_parameters(model: LoraModel, names: Sequence[str], trainable: dict[str, nn.Parameter]) \
        -> dict[str, list[nn.Parameter]]:
    """The trainable parameters of each task's adapter. Every trainable parameter must belong to exactly one
    (modules_to_save copies and trained biases are not per-row adapters, so a multi-task run refuses them)."""
    owned: dict[str, list[nn.Parameter]] = {name: [] for name in names}
    for _, layer in model.lora_layers():
        for name, _, p in layer.adapter_parameters():  # every tensor of every method's adapters
            if name in owned and p.requires_grad:
                owned[name].append(p)
    ids = {id(p) for params in owned.values() for p in params}
    stray = [n for n, p in trainable.items() if id(p) not in ids]
    if stray:
        raise ConfigError(f"a multi-task run trains only per-task LoRA weights, but {stray[0]} (and {len(stray) - 1} "
                          "more) would train too; remove modules_to_save and set bias: none", where="tasks")
    return owned


def clip_by_task(owned: dict[str, list[nn.Parameter]], max_norm: float | None) -> dict[str, float]:
    """Each adapter's gradient norm before clipping; with `max_norm`, each is clipped by its own norm, as
    training it alone would."""
    norms = {}
    for name, params in owned.items():
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        norms[name] = float(norm)
        if max_norm is not None and grads and math.isfinite(norms[name]):
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norms
