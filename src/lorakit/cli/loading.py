"""What several subcommands share: the task a run config's `--task` names, and loading a base (and adapter)."""

from __future__ import annotations

from ..errors import ConfigError


def chosen_task(config, name: str | None):
    """The task `--task` names in a config with tasks (None for a config without); an error names the choices."""
    names = [task.name for task in config.tasks]
    if not names:
        if name is not None:
            raise ConfigError(f"--task {name}: this run config has no tasks", where="run config")
        return None
    if name not in names:
        raise ConfigError(f"this run config trains several tasks; choose one with --task ({', '.join(names)})",
                          where="run config")
    return config.tasks[names.index(name)]


def model_config(model: str, dtype: str | None, quantize, **extra):
    """quantize: None, 4 / 8 (from --quantize), or a run config's QuantizationConfig."""
    from ..config import ModelConfig, QuantizationConfig

    quantization = QuantizationConfig(bits=quantize) if isinstance(quantize, int) else quantize
    return ModelConfig(name_or_path=model, dtype=dtype or "auto", quantization=quantization, **extra)


def load(model: str, adapter: str | None, dtype: str | None, quantize=None, *, log=print):
    """The base model (and tokenizer), with `adapter` loaded as "default" when given."""
    from ..base_model import load_base_model
    from ..lora import load_adapter

    loaded = load_base_model(model_config(model, dtype, quantize), log=log)
    if adapter:
        loaded.model = load_adapter(loaded.model, adapter)
    return loaded
