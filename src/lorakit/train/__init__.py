"""Training: checkpoints and resume (the loop itself lives beside them)."""

from .checkpoint import (
    checkpoint_lock,
    latest_checkpoint,
    list_checkpoints,
    rotate_checkpoints,
    save_checkpoint,
    trainable_parameters,
    verify_checkpoint,
)
from .restore import Resumed, compare_fingerprints, load_checkpoint, resume

__all__ = [
    "Resumed",
    "checkpoint_lock",
    "compare_fingerprints",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "resume",
    "rotate_checkpoints",
    "save_checkpoint",
    "trainable_parameters",
    "verify_checkpoint",
]
