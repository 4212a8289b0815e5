"""Deployment outputs: merged Hugging Face checkpoints and GGUF files for llama.cpp."""

from .gguf import ExportError, write_gguf
from .hf import merge_to_directory

__all__ = ["ExportError", "merge_to_directory", "write_gguf"]
