"""What the loop asks of a way of training: the Objective protocol, and the parts every objective shares.

The loop (loop.py) knows optimizer steps, accumulation windows, clipping, checkpoints and evaluation cadence;
an objective knows its data and its loss. Per step the loop takes a window of micro-batches from
`batches`, asks `normaliser(window)` for what the window's loss is divided by (its supervised tokens, or each
task's), calls `loss` per micro-batch and backpropagates it, sums the `BatchLoss.sums` of the window (and
across processes), and turns them into the step's metrics with `window_metrics`.

Batches must be a pure function of (epoch, start): that is what makes resume exact.

Optional, for an objective that needs them (GRPO with num_iterations > 1 reuses a rollout over several steps):
`steps_per_epoch(window_size)` when a micro-batch with "ends_window" ends some windows early; `state_tensors()`,
saved with every checkpoint, and `load_state_tensors(tensors)`, called once before training with what the resumed
checkpoint held ({} when starting afresh).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

import torch
from torch import nn

from ..evaluate import EvalResult
from ..runtime import Runtime

Normaliser = dict[str, int]
"""What a window's loss is divided by, by part ({"tokens": n}, or one count per task); all zero: no update."""


@dataclass
class BatchLoss:
    term: torch.Tensor
    """This micro-batch's term of the window's objective (already divided by the window's normaliser): the loop
    backpropagates it."""
    sums: dict[str, float]
    """What adds up over a window (and across processes) to give the step's metrics."""


@dataclass
class WindowMetrics:
    loss: float
    """The step's loss: the window's objective as one process computing all of it would have it."""
    tokens: int
    """Tokens the step ran through the model (for tokens/s)."""
    parts: dict[str, float | None] = field(default_factory=dict)
    """A loss per part (multi-task: per task), logged beside the loss."""
    fields: dict = field(default_factory=dict)
    """More columns for metrics.jsonl."""


class Objective(Protocol):
    examples: int
    """Training examples (for the log)."""
    evaluates: bool
    """Whether there is evaluation data."""
    compile_obstacle: str | None
    """Why torch.compile cannot trace the model as this objective calls it (None: it can)."""
    sum_keys: tuple[str, ...]
    """The keys of every BatchLoss.sums (a process with no micro-batch in a window sums zeros under them)."""

    def describe(self) -> list[str]:
        """Lines logged before training starts."""

    def batches_per_epoch(self) -> int: ...

    def batches(self, epoch: int, start: int, group: int) -> Iterator[dict]:
        """Micro-batches `start`, `start + 1`, ... of `epoch`, grouped by length within runs of `group`."""

    def normaliser(self, window: Sequence[dict]) -> Normaliser: ...

    def loss(self, model: nn.Module, batch: dict, normaliser: Normaliser, *, compiled: bool = False) -> BatchLoss: ...

    def window_metrics(self, sums: dict[str, float], normaliser: Normaliser) -> WindowMetrics: ...

    def clip(self, params: dict[str, nn.Parameter], max_norm: float | None) -> tuple[float, dict]:
        """The gradient norm before clipping (what the non-finite check reads), and more metrics columns."""

    def evaluate(self, model: nn.Module, runtime: Runtime) -> EvalResult: ...

    def fingerprint(self) -> dict:
        """What fixes the data this objective trains on, for checkpoints (state.py compares it on resume)."""


def clip_together(params: dict[str, nn.Parameter], max_norm: float | None) -> float:
    """The norm of all gradients together, before clipping them to `max_norm` (when it is finite)."""
    grads = [p.grad for p in params.values() if p.grad is not None]
    norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    if max_norm is not None and math.isfinite(norm):
        torch.nn.utils.clip_grads_with_norm_(list(params.values()), max_norm, torch.tensor(norm))
    return norm


def batch_tokens(batch: dict) -> int:
    """Tokens a batch runs through the model: its unmasked positions."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None and mask.dim() == 2 else batch["input_ids"].numel()
