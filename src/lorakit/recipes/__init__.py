"""Ways of training, one module each: a run config in, saved outputs out, read top to bottom."""

from .sft import run_training

__all__ = ["run_training"]
