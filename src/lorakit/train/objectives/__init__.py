"""Ways of training, as the loop sees them: each an Objective (base.py) over its own data and loss."""

from __future__ import annotations

import torch
from torch import nn

from ...config import TrainConfig
from ...data import PreparedData
from ..tasks import TaskSet
from .base import BatchLoss, Normaliser, Objective, WindowMetrics
from .multitask import MultiTask
from .sft import LanguageModeling

__all__ = ["BatchLoss", "LanguageModeling", "MultiTask", "Normaliser", "Objective", "WindowMetrics", "objective_for"]


def objective_for(data: PreparedData | TaskSet, config: TrainConfig, model: nn.Module, *,
                  eval_data: PreparedData | None = None) -> Objective:
    """Supervised fine-tuning of `model` on `data`: one adapter on a PreparedData, one per task on a TaskSet."""
    dtype = getattr(getattr(model, "model", model), "dtype", torch.float32)  # packed masks must match the model
    if isinstance(data, TaskSet):
        return MultiTask(data, config, model, dtype=dtype)
    return LanguageModeling(data, config, eval_data=eval_data, dtype=dtype)
