"""Ways of training, one module each: a run config in, saved outputs out, read top to bottom.

A new way of training is a module here (and its objective in train/objectives/) plus its line in RECIPES,
under the name the run config's `objective:` gives it.
"""

from __future__ import annotations

from typing import Callable

from ..config import RunConfig
from ..errors import ConfigError
from ..train.loop import FitResult
from . import grpo, preference, sft

RECIPES: dict[str, Callable[..., FitResult]] = {
    "sft": sft.run_training,
    "dpo": preference.run_preference,
    "orpo": preference.run_preference,
    "kto": preference.run_preference,
    "grpo": grpo.run_grpo,
}


def run_recipe(config: RunConfig, **options) -> FitResult:
    """Train as `config.objective` says; `options` are the recipe's (resume, overwrite, allow_change, log)."""
    recipe = RECIPES.get(config.objective)
    if recipe is None:
        raise ConfigError(f"objective: {config.objective!r} is not one of {', '.join(RECIPES)}", where="run config")
    return recipe(config, **options)


__all__ = ["RECIPES", "run_recipe"]
