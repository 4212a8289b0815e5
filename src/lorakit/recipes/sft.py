"""Supervised fine-tuning: run config -> trained adapter. What `lorakit train` (and quickstart) calls.

Read top to bottom: check the output directory, the serving targets and the memory; load the base model; wrap
it in the run's adapters; prepare the data; fit. Under torchrun every process runs this (train/runtime.py);
only rank 0 logs and writes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable

from ..base_model import load_base_model
from ..config import RunConfig, TaskConfig
from ..data import PreparedData, prepare, split_validation
from ..errors import ConfigError
from ..eval.sweep import rank_sweep, sweep_examples
from ..plan.check import check_before_training
from ..serving_compat import check_run_config
from ..train.adapters import wrap_adapters
from ..train.distributed import QUANTIZED_FSDP, init_runtime, shard_base_layers
from ..train.fingerprint import run_settings
from ..train.forgetting import forgetting_gate
from ..train.loop import FitResult, fit
from ..train.objectives import Objective, objective_for
from ..train.runtime import Runtime
from ..train.tasks import Task, TaskSet
from ..train.tensorboard import TensorBoardHook
from .start import start_run


def run_training(config: RunConfig, *, resume: str | None = None, overwrite: bool = False,
                 allow_change: Iterable[str] = (), log: Callable[[str], None] = print) -> FitResult:
    """Train the adapter(s) `config` describes; `resume` ("never", "auto" or a checkpoint) overrides train.resume.
    `overwrite` replaces a previous run in output_dir; `allow_change` names settings a resume may change (see
    fit)."""
    runtime = init_runtime(config.distributed)
    try:
        return _train(config, resume, overwrite, tuple(allow_change), runtime.log(log), runtime)
    finally:
        runtime.close()


def _train(config: RunConfig, resume: str | None, overwrite: bool, allow_change: tuple[str, ...],
           log: Callable[[str], None], runtime: Runtime) -> FitResult:
    if config.sweep is not None and runtime.world > 1:  # the ranking after training runs in one process
        raise ConfigError("sweep: runs in one process for now; start it with `lorakit train`, not torchrun",
                          where="run config")
    resume = start_run(config, resume, overwrite, runtime, log)
    fsdp = runtime.strategy == "fsdp"
    if fsdp and config.model.quantization is not None:
        raise ConfigError(QUANTIZED_FSDP, where="run config")  # before loading it, not after
    check_run_config(config, log)  # deploy_targets: a server that would refuse the adapter stops the run here
    check_before_training(config, log, enforce=runtime.world == 1)  # predicted peak memory (plan/check.py)

    loaded = load_base_model(config.model, log=log, shard_over=runtime if fsdp else None)
    log(loaded.describe())
    model = wrap_adapters(loaded.model, config)
    if fsdp:
        layers = shard_base_layers(model, runtime)  # a no-op for layers loaded into their shards
        log(f"fsdp: the frozen weights of {layers} decoder layers are sharded over {runtime.world} processes")
    log(str(model.trainable_parameters()))

    objective = _objective(config, model, loaded.tokenizer, log)
    ranked_on = sweep_examples(config, model, loaded.tokenizer)  # sweep.metrics' prompts: read before training
    forgetting = forgetting_gate(config, loaded.tokenizer, log)  # eval.general_text, or None
    hooks = [TensorBoardHook(Path(config.output_dir) / "tensorboard")] if config.train.tensorboard and runtime.is_main else []
    try:
        result = fit(model, objective, config.train, config.output_dir, runtime=runtime, log=log, resume=resume,
                     hooks=hooks, speed=config.speed, overwrite=overwrite, allow_change=allow_change,
                     settings=run_settings(config), forgetting=forgetting)
    finally:
        for hook in hooks:
            hook.close()
    if config.sweep is not None and runtime.is_main:  # rank the members: sweep.json and best_adapter
        rank_sweep(config, model, loaded.tokenizer, objective.tasks.tasks[0].eval_data, config.output_dir,
                   dtype=loaded.dtype, eval_losses=objective.last_eval_losses, examples=ranked_on, log=log)
    return result


def _objective(config: RunConfig, model, tokenizer, log: Callable[[str], None]) -> Objective:
    """The data prepared, as the objective that trains on it: one adapter, or one per task (a sweep's members
    are tasks that share one preparation of data.train and its validation)."""
    if config.tasks and config.sweep is None:
        tasks = TaskSet([_prepare_task(task, tokenizer, config.data, log) for task in config.tasks])
        return objective_for(tasks, config.train, model)
    train, validation = _train_and_validation(config, tokenizer, log)
    if config.sweep is not None:
        members = TaskSet([Task(task.name, train, validation, task.lr) for task in config.tasks])
        return objective_for(members, config.train, model)
    return objective_for(train, config.train, model, eval_data=validation)


def _train_and_validation(config: RunConfig, tokenizer, log: Callable[[str], None]) \
        -> tuple[PreparedData, PreparedData | None]:
    options = config.data  # a DataOptions, plus where the data is
    train = _prepared(config.data.train, tokenizer, options, log)
    validation = _prepared(config.data.validation, tokenizer, options, log)
    if validation is None and config.data.validation_fraction > 0:
        kept, held = split_validation(train.examples, config.data.validation_fraction, seed=config.train.seed)
        train, validation = dataclasses.replace(train, examples=kept), dataclasses.replace(train, examples=held)
        log(f"validation: {len(held)} of {len(kept) + len(held)} examples held out (seed {config.train.seed})")
    return train, validation


def _prepared(path: str | None, tokenizer, options, log: Callable[[str], None], label: str = "") -> PreparedData | None:
    """The data file `path` prepared and its summary logged; None for no file."""
    if not path:
        return None
    data = prepare(path, tokenizer, options)
    log(label + data.summary.line())
    return data


def _prepare_task(task: TaskConfig, tokenizer, options, log: Callable[[str], None]) -> Task:
    label = f"task {task.name}: "
    return Task(task.name, _prepared(task.train, tokenizer, options, log, label),
                _prepared(task.validation, tokenizer, options, log, label), task.lr)
