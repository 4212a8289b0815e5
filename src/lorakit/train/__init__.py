"""Training: the loop (fit) over an objective (objectives/), its runtime, schedules, evaluation, metrics,
checkpoints and resume. The recipes (lorakit.recipes) put them together for a run config."""

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
from .objectives import LanguageModeling, MultiTask, Objective, objective_for
from .restore import Resumed, compare_fingerprints, load_checkpoint, resume
from .runtime import OneProcess, Runtime, Torchrun
from .schedule import build_scheduler, lr_multiplier

__all__ = [
    "EvalResult",
    "FitResult",
    "LanguageModeling",
    "MultiTask",
    "Objective",
    "OneProcess",
    "Runtime",
    "Torchrun",
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
    "objective_for",
    "read_metrics",
]
