"""Training: the loop (fit), schedules, evaluation, metrics, checkpoints and resume."""

from .checkpoint import (
    checkpoint_lock,
    latest_checkpoint,
    list_checkpoints,
    rotate_checkpoints,
    save_checkpoint,
    trainable_parameters,
    verify_checkpoint,
)
from .evaluate import EvalResult, evaluate
from .loop import FitResult, build_optimizer, fit
from .metrics import read_metrics
from .restore import Resumed, compare_fingerprints, load_checkpoint, resume
from .run import run_training
from .schedule import build_scheduler, lr_multiplier

__all__ = [
    "EvalResult",
    "FitResult",
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
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "fit",
    "lr_multiplier",
    "read_metrics",
    "run_training",
]
