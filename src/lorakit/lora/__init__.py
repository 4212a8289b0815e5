"""The LoRA core: layers, adapter methods, injection, the wrapped model, adapter files.

Depends on torch and safetensors, and within lorakit only on the leaf modules errors, atomic and
safetensors_header; quantized bases reach it through inject.BaseKind, set by lorakit.quant."""

from .config import LoraConfig
from .io import read_adapter_config
from .load import load_adapter
from .methods import parameter_roles
from .model import LoraModel, TrainableReport, wrap

__all__ = ["LoraConfig", "LoraModel", "TrainableReport", "load_adapter", "parameter_roles", "read_adapter_config", "wrap"]
