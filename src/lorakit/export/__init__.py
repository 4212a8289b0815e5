"""Deployment outputs: merged Hugging Face checkpoints (GGUF comes later)."""

from .hf import merge_to_directory

__all__ = ["merge_to_directory"]
