"""Preference tuning: run config -> trained adapter, for objective dpo, orpo or kto.

Read top to bottom: check the output directory, the serving targets and the memory; load the base model; put
the adapters on it (a new one from the lora section, or the SFT adapter the policy starts from plus a frozen
copy of it as the reference); prepare the pairs (or KTO's labelled completions); precompute the reference's
log-probabilities if asked; fit. The reference is never a second model in memory: it is the base with adapters
disabled, or that frozen adapter on the same base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch

from ..base_model import load_base_model
from ..config import RunConfig, as_trained
from ..data.preference import Lengths, PreferenceData, prepare_preference, split_preference
from ..errors import ConfigError
from ..lora import LoraModel
from ..plan.check import check_before_training
from ..serving_compat import check_run_config
from ..train.adapters import wrap_adapters
from ..train.distributed import QUANTIZED_FSDP, init_runtime, shard_base_layers
from ..train.fingerprint import run_settings
from ..train.forgetting import forgetting_gate
from ..train.loop import FitResult, fit
from ..train.objectives.preference import REFERENCE_ADAPTER, Preference, Reference
from ..train.runtime import Runtime
from ..train.tensorboard import TensorBoardHook
from .start import start_run


def run_preference(config: RunConfig, *, resume: str | None = None, overwrite: bool = False,
                   allow_change: Iterable[str] = (), log: Callable[[str], None] = print) -> FitResult:
    """Train the adapter `config` describes with its preference objective (config.objective: dpo, orpo, kto);
    the options are run_training's (recipes/sft.py)."""
    if config.objective not in ("dpo", "orpo", "kto"):
        raise ConfigError(f"objective: {config.objective!r} is not a preference objective (dpo, orpo, kto)",
                          where="run config")
    runtime = init_runtime(config.distributed)
    try:
        return _train(config, resume, overwrite, tuple(allow_change), runtime.log(log), runtime)
    finally:
        runtime.close()


def _train(config: RunConfig, resume: str | None, overwrite: bool, allow_change: tuple[str, ...],
           log: Callable[[str], None], runtime: Runtime) -> FitResult:
    resume = start_run(config, resume, overwrite, runtime, log)
    fsdp = runtime.strategy == "fsdp"
    if fsdp and config.model.quantization is not None:
        raise ConfigError(QUANTIZED_FSDP, where="run config")
    check_run_config(as_trained(config), log)  # reference.adapter: that adapter's r and targets are deployed
    check_before_training(config, log, enforce=runtime.world == 1)

    loaded = load_base_model(config.model, log=log, shard_over=runtime if fsdp else None)
    log(loaded.describe())
    model, reference = _policy_and_reference(loaded.model, config, log)
    if fsdp:
        layers = shard_base_layers(model, runtime)
        log(f"fsdp: the frozen weights of {layers} decoder layers are sharded over {runtime.world} processes")
    log(str(model.trainable_parameters()))

    train, validation = _data(config, loaded.tokenizer, log)
    objective = Preference(config.objective, train, config.train, config.preference, reference, eval_data=validation)
    if config.preference.reference.precompute:
        objective.precompute_reference(model, log)
    forgetting = forgetting_gate(config, loaded.tokenizer, log)  # eval.general_text, or None
    hooks = [TensorBoardHook(Path(config.output_dir) / "tensorboard")] if config.train.tensorboard and runtime.is_main else []
    try:
        return fit(model, objective, config.train, config.output_dir, runtime=runtime, log=log, resume=resume,
                   hooks=hooks, speed=config.speed, overwrite=overwrite, allow_change=allow_change,
                   settings=run_settings(config), forgetting=forgetting)
    finally:
        for hook in hooks:
            hook.close()


def _policy_and_reference(base: torch.nn.Module, config: RunConfig, log: Callable[[str], None]) \
        -> tuple[LoraModel, Reference]:
    """A new adapter with the base as reference; or, with reference.adapter, that adapter trainable as the
    policy's start and a frozen copy of it routed to every row as the reference."""
    start = config.preference.reference.adapter
    if start is None:
        return wrap_adapters(base, config), Reference("base", config.train.loss_chunk_tokens)
    model = LoraModel(base, None)
    model.load_adapter(start, "default", is_trainable=True)
    model.load_adapter(start, REFERENCE_ADAPTER)  # frozen
    model.set_adapter("default")
    if config.model.adapter_dtype != "float32":
        model.cast_adapters(getattr(torch, config.model.adapter_dtype))
    log(f"policy starts from {start} (its adapter_config replaces the lora section); a frozen copy is the reference")
    return model, Reference("adapter", config.train.loss_chunk_tokens)


def _data(config: RunConfig, tokenizer, log: Callable[[str], None]) -> tuple[PreferenceData, PreferenceData | None]:
    pref = config.preference
    lengths = Lengths(config.data.max_seq_len, pref.max_prompt_len, pref.max_completion_len)
    paired = config.objective != "kto"

    def prepared(path: str | None) -> PreferenceData | None:
        if not path:
            return None
        data = prepare_preference(path, tokenizer, config.data, lengths=lengths, paired=paired)
        log(data.summary.line())
        return data

    train, validation = prepared(config.data.train), prepared(config.data.validation)
    if validation is None and config.data.validation_fraction > 0:
        train, validation = split_preference(train, config.data.validation_fraction, seed=config.train.seed)
        log(f"validation: {len(validation.examples)} of {len(train.examples) + len(validation.examples)} examples "
            f"held out (seed {config.train.seed})")
    return train, validation
