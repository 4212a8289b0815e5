"""run_training(RunConfig): load the base model, wrap it, prepare the data, fit. What `lorakit train` calls."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..base_model import load_base_model
from ..config import RunConfig, TaskConfig, data_options
from ..data import PreparedData, prepare, split_validation
from ..errors import ConfigError
from ..lora import LoraModel
from ..serving_compat import check_run_config
from .distributed import QUANTIZED_FSDP, DistributedRun, init_distributed, shard_base_layers, silent
from .fingerprint import run_settings
from .loop import FitResult, fit
from .output_dir import check_output_dir
from .plan_check import check_before_training
from .tasks import Task, TaskSet
from .tensorboard import TensorBoardHook


def run_training(config: RunConfig, *, resume: str | None = None, overwrite: bool = False,
                 allow_change: Iterable[str] = (), log: Callable[[str], None] = print) -> FitResult:
    """Train the adapter `config` describes; `resume` ("never", "auto" or a checkpoint) overrides train.resume.
    `overwrite` replaces a previous run in output_dir; `allow_change` names settings a resume may change (see
    fit). Under torchrun with several processes, each runs this (distributed.py); only rank 0 logs and writes."""
    distributed = init_distributed(config.distributed)
    if distributed is not None and not distributed.is_main:
        log = silent
    try:
        return _run(config, resume, overwrite, tuple(allow_change), log, distributed)
    finally:
        if distributed is not None:
            distributed.close()


def _run(config: RunConfig, resume: str | None, overwrite: bool, allow_change: tuple[str, ...],
         log: Callable[[str], None], distributed: DistributedRun | None) -> FitResult:
    torch.manual_seed(config.train.seed)  # the LoRA A init draws from it
    random.seed(config.train.seed)
    if overwrite and resume is None and config.train.resume != "never":
        log(f"overwrite: starting over, so the run config's train.resume: {config.train.resume} does not apply")
        resume = "never"
    resume = str(config.train.resume if resume is None else resume)
    # Every process looks (the same files), so that a refusal stops them all before anything loads.
    check_output_dir(config.output_dir, resume=resume, overwrite=overwrite,
                     probe=distributed is None or distributed.is_main)
    fsdp = distributed is not None and distributed.strategy == "fsdp"
    if fsdp and config.model.quantization is not None:
        raise ConfigError(QUANTIZED_FSDP, where="run config")  # before loading it, not after
    check_run_config(config, log)  # deploy_targets: a server that would refuse the adapter stops the run here
    check_before_training(config, log, enforce=distributed is None)  # predicted peak memory (plan_check.py)
    loaded = load_base_model(config.model, log=log, shard_over=distributed if fsdp else None)
    log(loaded.describe())
    lora_model = wrap_adapters(loaded.model, config)
    if fsdp:
        layers = shard_base_layers(lora_model, distributed)  # a no-op for layers loaded into their shards
        log(f"fsdp: the frozen weights of {layers} decoder layers are sharded over {distributed.world} processes")
    log(str(lora_model.trainable_parameters()))
    options = data_options(config.data)
    if config.tasks:
        train, validation = TaskSet([_prepare_task(task, loaded.tokenizer, options, log) for task in config.tasks]), None
    else:
        train, validation = _prepare_data(config, loaded.tokenizer, options, log)
    hooks = []
    if config.train.tensorboard and (distributed is None or distributed.is_main):
        hooks.append(TensorBoardHook(Path(config.output_dir) / "tensorboard"))
    try:
        return fit(lora_model, train, config.train, config.output_dir, eval_data=validation, log=log, resume=resume,
                   hooks=hooks, speed=config.speed, distributed=distributed, overwrite=overwrite,
                   allow_change=allow_change, settings=run_settings(config))
    finally:
        for hook in hooks:
            hook.close()


def _prepared(path: str | None, tokenizer, options, log: Callable[[str], None], label: str = "") -> PreparedData | None:
    """The data file `path` prepared and its summary logged; None for no file."""
    if not path:
        return None
    data = prepare(path, tokenizer, options)
    log(label + data.summary.line())
    return data


def _prepare_data(config: RunConfig, tokenizer, options, log: Callable[[str], None]) \
        -> tuple[PreparedData, PreparedData | None]:
    train = _prepared(config.data.train, tokenizer, options, log)
    validation = _prepared(config.data.validation, tokenizer, options, log)
    if validation is None and config.data.validation_fraction > 0:
        kept, held = split_validation(train.examples, config.data.validation_fraction, seed=config.train.seed)
        train, validation = dataclasses.replace(train, examples=kept), dataclasses.replace(train, examples=held)
        log(f"validation: {len(held)} of {len(kept) + len(held)} examples held out (seed {config.train.seed})")
    return train, validation


def wrap_adapters(model: torch.nn.Module, config: RunConfig, *, _init=None) -> LoraModel:
    """The run's adapters on `model`, in model.adapter_dtype: the lora section's, or one per task, each initialised
    from the same seed as a run training it alone would be. `_init` overrides the init (the planner's meta model)."""
    tasks = [(task.name, task.lora or config.lora) for task in config.tasks] or [("default", config.lora)]
    lora_model = None
    for name, lora in tasks:
        if config.tasks:
            torch.manual_seed(config.train.seed)
        if lora_model is None:
            lora_model = LoraModel(model, lora, name, _init=_init)
        else:
            lora_model.add_adapter(name, lora, _init=_init)
    lora_model.set_adapter([name for name, _ in tasks])
    if config.model.adapter_dtype != "float32":
        lora_model.cast_adapters(getattr(torch, config.model.adapter_dtype))
    return lora_model


def _prepare_task(task: TaskConfig, tokenizer, options, log: Callable[[str], None]) -> Task:
    label = f"task {task.name}: "
    return Task(task.name, _prepared(task.train, tokenizer, options, log, label),
                _prepared(task.validation, tokenizer, options, log, label))
