"""Several adapters trained in one run (the run config's `tasks:`), each as if it were trained alone.

The batches are tasks.py's joint micro-batches: rows of every task, each routed through its own adapter, so
one forward and backward over the frozen base trains them all. Each task's loss is divided by ITS OWN
supervised tokens in the window and each adapter's gradient is clipped by its own norm, so every adapter gets
the update training it alone on the same rows would give (AdamW is per parameter). The step's loss is the
mean over all the window's supervised tokens; each task's is logged beside it.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch import nn

from ...config import TrainConfig
from ...data import iter_batches
from ...errors import DataError
from ..checkpoint import trainable_parameters
from ..evaluate import EvalResult, eval_result, loss_sums, model_device, model_inputs
from ..fingerprint import examples_fingerprint
from ..runtime import Runtime
from ..tasks import TaskSet, adapter_parameters, clip_by_task, supervised_by_task, task_loss_sums
from .base import BatchLoss, Normaliser, WindowMetrics, batch_tokens


class MultiTask:
    """One adapter per task of a TaskSet, trained together; `model` holds them (wrap_adapters)."""

    compile_obstacle = "several tasks route rows to their adapters, which torch.compile cannot trace"

    def __init__(self, tasks: TaskSet, config: TrainConfig, model: nn.Module, *, dtype: torch.dtype = torch.float32):
        if tasks.examples == 0:
            raise DataError("no training examples left after preparation")
        self.tasks, self.config, self.dtype = tasks, config, dtype
        self.names = tasks.names
        self.sum_keys = ("loss", "tokens", *(f"task.{n}" for n in self.names))
        self.examples = tasks.examples
        self.evaluates = any(task.eval_data for task in tasks.tasks)
        self.last_eval_losses: dict[str, float] = {}  # each task's loss at the latest evaluation
        # Each task's trainable tensors, for clipping it alone; refuses anything trained that is not per-task.
        self.owned = adapter_parameters(model, self.names, trainable_parameters(model))

    def describe(self) -> list[str]:
        return [f"tasks: {', '.join(self.names)}; each micro-batch holds {self.config.batch_size} rows of each "
                f"task, an epoch is one pass over the largest task (smaller ones start their next epoch)"]

    def learning_rates(self) -> dict[int, float]:
        """The peak learning rate of each parameter of a task with its own (id(parameter) -> lr); the loop's
        optimizer gives them their own groups on the run's schedule."""
        return {id(p): task.lr for task in self.tasks.tasks if task.lr is not None for p in self.owned[task.name]}

    def batches_per_epoch(self) -> int:
        return self.tasks.batches_per_epoch(self.config.batch_size)

    def batches(self, epoch: int, start: int, group: int) -> Iterator[dict]:
        return self.tasks.batches(self.config.batch_size, seed=self.config.seed, epoch=epoch, start=start, group=group)

    def normaliser(self, window: Sequence[dict]) -> Normaliser:
        return supervised_by_task(window, self.names)

    def loss(self, model: nn.Module, batch: dict, normaliser: Normaliser, *, compiled: bool = False) -> BatchLoss:
        sums = task_loss_sums(model, model_inputs(batch, model_device(model)), batch, self.names,
                              self.config.loss_chunk_tokens)
        objective = sum(sums[n] / normaliser[n] for n in sums if normaliser[n])
        return BatchLoss(objective, {"loss": float(sum(sums.values()).detach()), "tokens": batch_tokens(batch),
                                     **{f"task.{n}": float(value.detach()) for n, value in sums.items()}})

    def window_metrics(self, sums: dict[str, float], normaliser: Normaliser) -> WindowMetrics:
        by_task = {n: sums[f"task.{n}"] / normaliser[n] if normaliser[n] else None for n in self.names}
        return WindowMetrics(loss=sums["loss"] / sum(normaliser.values()), tokens=int(sums["tokens"]),
                             parts=by_task, fields={"task_loss": by_task})

    def clip(self, params: dict[str, nn.Parameter], max_norm: float | None) -> tuple[float, dict]:
        """Each adapter clipped by its own norm; the step's norm is theirs together (a non-finite one skips all)."""
        norms = clip_by_task(self.owned, max_norm)
        return math.sqrt(sum(n * n for n in norms.values())), {"task_grad_norm": norms}

    def evaluate(self, model: nn.Module, runtime: Runtime) -> EvalResult:
        """Each task's validation data through its own adapter; the result is over all their tokens. Every
        process scores everything (the sets are small; only rank 0 logs)."""
        total, tokens, parts = 0.0, 0, {}
        try:
            for task in self.tasks.tasks:
                if task.eval_data is None:
                    continue
                model.set_adapter(task.name)
                one = loss_sums(model, iter_batches(task.eval_data, self.config.batch_size, seed=self.config.seed,
                                                    epoch=0, dtype=self.dtype),
                                loss_chunk_tokens=self.config.loss_chunk_tokens)
                total, tokens = total + one[0], tokens + one[1]
                parts[task.name] = eval_result(*one).loss
        finally:
            model.set_adapter(self.names)
        self.last_eval_losses = dict(parts)  # a sweep ranks its members by the final evaluation's
        return eval_result(total, tokens, parts=parts)

    def fingerprint(self) -> dict:
        return {**examples_fingerprint([(t.name, t.data) for t in self.tasks.tasks]), "data.examples": self.examples,
                "data.packing": False, "tasks": list(self.names)}
