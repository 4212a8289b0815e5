"""lorakit: LoRA fine-tuning for Hugging Face models, with PEFT-compatible adapter files."""

from .errors import AdapterError, CheckpointError, ConfigError, DataError, LorakitError, TargetNotFoundError
from .lora import LoraConfig, LoraModel, TrainableReport, load_adapter, read_adapter_config, wrap

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "LoraConfig",
    "LoraModel",
    "LorakitError",
    "TargetNotFoundError",
    "TrainableReport",
    "load_adapter",
    "read_adapter_config",
    "wrap",
    "__version__",
]
