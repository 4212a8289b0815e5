"""GRPO: run config -> trained adapter, for objective grpo (reinforcement learning from verifiable rewards).

Read top to bottom: check the output directory, the serving targets and the memory; build the reward functions
(a bad import path fails here, before any model loads); load the base model and put a new adapter on it; prepare
the prompts; fit, the objective rolling out each step's completions with lorakit's engine on the model being
trained (no second model, no weight copy). Every rl.sample_every steps the completions and their rewards are
written to samples/step-N.jsonl.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable

from ..base_model import load_base_model
from ..config import RunConfig
from ..data.prepare import split_validation
from ..data.prompts import PromptData, prepare_prompts
from ..errors import ConfigError
from ..plan.check import check_before_training
from ..serving_compat import check_run_config
from ..train.adapters import wrap_adapters
from ..train.distributed import init_runtime
from ..train.fingerprint import run_settings
from ..train.forgetting import forgetting_gate
from ..train.loop import FitResult, fit
from ..train.objectives.grpo import GRPO
from ..train.rewards import reward_set
from ..train.tensorboard import TensorBoardHook
from .start import start_run


def run_grpo(config: RunConfig, *, resume: str | None = None, overwrite: bool = False,
             allow_change: Iterable[str] = (), log: Callable[[str], None] = print) -> FitResult:
    """Train the adapter `config` describes with GRPO; the options are run_training's (recipes/sft.py)."""
    if config.objective != "grpo":
        raise ConfigError(f"objective: {config.objective!r} is not grpo", where="run config")
    runtime = init_runtime(config.distributed)
    try:
        if runtime.world > 1 and runtime.strategy == "fsdp":
            raise ConfigError("objective grpo runs under torchrun with distributed.strategy ddp only: each process "
                              "generates its own completions, and fsdp's sharded forwards would have to run in step "
                              "across processes; set distributed.strategy: ddp", where="run config")
        if runtime.world > 1 and config.rl.num_iterations > 1:
            raise ConfigError("rl.num_iterations > 1 runs in one process for now (a checkpoint between two steps of "
                              "a rollout would hold rank 0's rollouts only); set rl.num_iterations: 1 or start "
                              "without torchrun", where="run config")
        return _train(config, resume, overwrite, tuple(allow_change), runtime.log(log), runtime)
    finally:
        runtime.close()


def _train(config: RunConfig, resume: str | None, overwrite: bool, allow_change: tuple[str, ...],
           log: Callable[[str], None], runtime) -> FitResult:
    resume = start_run(config, resume, overwrite, runtime, log)
    check_run_config(config, log)
    check_before_training(config, log, enforce=True)
    rewards = reward_set(config.rl.rewards)

    loaded = load_base_model(config.model, log=log)
    log(loaded.describe())
    model = wrap_adapters(loaded.model, config)
    log(str(model.trainable_parameters()))

    train, validation = _prompts(config, loaded.tokenizer, log)
    objective = GRPO(model, loaded.tokenizer, train, config.train, config.rl, rewards, eval_data=validation, log=log,
                     runtime=runtime)
    forgetting = forgetting_gate(config, loaded.tokenizer, log)  # eval.general_text, or None
    out, every = Path(config.output_dir), config.rl.sample_every

    def write_samples(event: str, info: dict) -> None:
        if event == "step" and every and info["step"] % every == 0:
            objective.write_samples(info["step"], out)

    tensorboard = TensorBoardHook(out / "tensorboard") if config.train.tensorboard and runtime.is_main else None
    hooks = [write_samples] + ([tensorboard] if tensorboard is not None else [])
    try:
        return fit(model, objective, config.train, config.output_dir, runtime=runtime, log=log, resume=resume,
                   hooks=hooks, speed=config.speed, overwrite=overwrite, allow_change=allow_change,
                   settings=run_settings(config), forgetting=forgetting)
    finally:
        objective.close()
        if tensorboard is not None:
            tensorboard.close()


def _prompts(config: RunConfig, tokenizer, log: Callable[[str], None]) -> tuple[PromptData, PromptData | None]:
    budget = config.rl.prompt_budget(config.data.max_seq_len)

    def prepared(path: str | None) -> PromptData | None:
        if not path:
            return None
        data = prepare_prompts(path, tokenizer, config.data, max_prompt_len=budget)
        log(data.summary.line())
        return data

    train, validation = prepared(config.data.train), prepared(config.data.validation)
    if validation is None and config.data.validation_fraction > 0:
        kept, held = split_validation(train.records, config.data.validation_fraction, seed=config.train.seed)
        train, validation = dataclasses.replace(train, records=kept), dataclasses.replace(train, records=held)
        log(f"validation: {len(validation.records)} of {len(train.records) + len(validation.records)} prompts held "
            f"out (seed {config.train.seed})")
    return train, validation
