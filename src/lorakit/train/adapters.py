"""The run's adapters on a base model: what every recipe trains, and what the memory planner counts."""

from __future__ import annotations

import torch

from ..config import RunConfig
from ..lora import LoraModel


def wrap_adapters(model: torch.nn.Module, config: RunConfig, *, _init=None) -> LoraModel:
    """RunConfig.adapters() on `model`, in model.adapter_dtype, all active; each task's adapter initialised from
    the same seed as a run training it alone would be. `_init` overrides the init (the planner's meta model)."""
    lora_model = None
    for name, lora in config.adapters():
        if config.tasks:
            torch.manual_seed(config.train.seed)
        if lora_model is None:
            lora_model = LoraModel(model, lora, name, _init=_init)
        else:
            lora_model.add_adapter(name, lora, _init=_init)
    lora_model.set_adapter([name for name, _ in config.adapters()])
    if config.model.adapter_dtype != "float32":
        lora_model.cast_adapters(getattr(torch, config.model.adapter_dtype))
    return lora_model
