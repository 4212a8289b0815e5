"""Deployment outputs: merged Hugging Face checkpoints, GGUF files and GGUF LoRA adapters for llama.cpp."""

from ..errors import ExportError
from .gguf import write_gguf
from .hf import merge_to_directory
from .lora_gguf import write_lora_gguf

__all__ = ["ExportError", "merge_to_directory", "write_gguf", "write_lora_gguf"]
