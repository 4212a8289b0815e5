"""Quantized base models: bitsandbytes 4-bit / 8-bit layers, memory-lean loading, LoRA on top, dequantization."""

from .bnb import QuantSpec, dequantize_model, is_quantized_linear, require_bitsandbytes
from .load import load_quantized
from .lora_layer import prepare_for_lora

__all__ = ["QuantSpec", "dequantize_model", "is_quantized_linear", "load_quantized", "prepare_for_lora",
           "require_bitsandbytes"]
