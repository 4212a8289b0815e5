"""Learning-rate schedules: linear warmup, then constant, linear or cosine decay, as a `LambdaLR`.

The multiplier is a closure (a plain function), so `LambdaLR.state_dict()` stores no lambda state, only
numbers (`last_epoch`, `base_lrs`, ...): JSON-able, which `save_checkpoint` requires.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import ConfigError

SCHEDULES = ("constant", "linear", "cosine")


def lr_multiplier(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The factor applied to the base lr before optimizer step `step` (0-based).

    Warmup: (step + 1) / warmup_steps, so the first update already moves and step warmup_steps - 1 runs at the
    full lr. Then `progress` runs from 0 (first step after warmup) towards 1 (one step past the last):
    constant 1; linear 1 - progress; cosine (1 + cos(pi * progress)) / 2 (Loshchilov & Hutter, SGDR, eq. 5,
    one cycle, eta_min 0).
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"lr_schedule: {schedule!r} is not one of {', '.join(SCHEDULES)}", where="train config")
    if warmup_steps < 0 or total_steps < 1:
        raise ConfigError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}",
                          where="train config")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, *, warmup_steps: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over every param group (each keeps its own base lr, e.g. LoRA+'s B group)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(schedule, warmup_steps, total_steps))
