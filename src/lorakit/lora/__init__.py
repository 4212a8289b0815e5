"""The LoRA core: layers, injection, the wrapped model, adapter files. Depends only on torch and safetensors."""

from .config import LoraConfig
from .io import read_adapter_config
from .load import load_adapter
from .methods import parameter_roles
from .model import LoraModel, TrainableReport, wrap

__all__ = ["LoraConfig", "LoraModel", "TrainableReport", "load_adapter", "parameter_roles", "read_adapter_config", "wrap"]
