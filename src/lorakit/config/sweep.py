"""A one-pass hyperparameter sweep (the run config's `sweep:`): the grid expanded into members, each trained as a
task of one multi-task run over the same data, with its own LoRA options and learning rate.

The expansion happens when the config loads, so everything that reads `tasks` (the memory plan, the deploy check,
the settings a resume compares, `lorakit eval --task MEMBER`) sees the members as the tasks they are.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any

from ..errors import ConfigError
from ..eval.metrics import METRICS
from ..lora.config import LoraConfig
from ..lora.model import ADAPTER_NAME
from .sections import RunConfig, TaskConfig

SWEPT = ("lr", "r", "lora_alpha", "target_modules", "init_lora_weights", "lora_dropout")
SHORT = {"lr": "lr", "r": "r", "lora_alpha": "alpha", "target_modules": "targets", "init_lora_weights": "init",
         "lora_dropout": "dropout"}
MAX_MEMBERS = 16
GENERATION_METRICS = tuple(m for m in METRICS if m != "regex")  # regex needs a pattern, which a sweep has no field for


@dataclasses.dataclass(frozen=True)
class Member:
    name: str
    """Its adapter name: the swept values that differ between members, e.g. lr3e-04_r16."""
    lora: LoraConfig
    lr: float
    settings: dict[str, Any]
    """The swept fields' values for this member (all of them, not only those in its name)."""


def grid(config: RunConfig) -> list[tuple[str, list]]:
    """The swept fields with their values, in SWEPT order (only those the sweep names)."""
    sweep = config.sweep
    return [(name, list(values)) for name in SWEPT if (values := getattr(sweep, name)) is not None]


def members(config: RunConfig) -> list[Member]:
    """Every combination of the grid, in order (the last field varying fastest)."""
    fields = grid(config)
    varied = [name for name, values in fields if len(values) > 1]
    out = []
    for combo in itertools.product(*(values for _, values in fields)):
        settings = dict(zip((name for name, _ in fields), combo))
        lora = dataclasses.replace(config.lora, **{k: v for k, v in settings.items() if k != "lr"})
        name = "_".join(_part(k, settings[k], dict(fields)[k]) for k in varied) or "member"
        out.append(Member(name, lora, settings.get("lr", config.train.lr), settings))
    names = [m.name for m in out]
    if len(set(names)) != len(names) or not all(ADAPTER_NAME.match(n) for n in names):
        out = [dataclasses.replace(m, name=f"member{i + 1}") for i, m in enumerate(out)]
    return out


def _part(field: str, value: Any, values: list) -> str:
    if field == "lr":
        mantissa, exponent = f"{value:.2e}".split("e")
        text = mantissa.rstrip("0").rstrip(".") + "e" + exponent  # 3e-04, 1.5e-04: never two members alike
    elif field == "target_modules":
        text = value if isinstance(value, str) else str(values.index(value) + 1)  # its place in the sweep's list
    else:
        text = f"{value:g}" if isinstance(value, float) else str(value).lower()
    return SHORT[field] + re.sub(r"[^A-Za-z0-9-]", "p", text.replace("+", ""))


def sweep_problems(config: RunConfig) -> list[str]:
    """What a sweep cannot do, each problem naming the field and the fix."""
    sweep = config.sweep
    if sweep is None:
        return []
    problems = []
    fields = grid(config)
    for name, values in fields:
        if not values:
            problems.append(f"sweep.{name}: give at least one value, or remove it")
    count = 1
    for _, values in fields:
        count *= max(len(values), 1)
    if count < 2:
        problems.append("sweep: names fewer than two combinations; give a field two or more values, e.g. "
                        "{lr: [1.0e-4, 3.0e-4]}")
    elif count > MAX_MEMBERS:
        problems.append(f"sweep: {count} combinations; at most {MAX_MEMBERS} train in one run (each adds "
                        "train.batch_size rows to every micro-batch); drop some values")
    if config.tasks:
        problems.append("sweep: trains its members on data.train; remove tasks (or run the sweep per task)")
    if config.objective != "sft":
        problems.append(f"sweep: supervised fine-tuning only for now (objective sft); objective {config.objective} "
                        "trains one adapter per run")
    if config.eval.general_text is not None:
        problems.append("eval.general_text: measures one adapter against its base, and a sweep trains several at "
                        "once; remove it, and check the best member's forgetting in a run of its own")
    if config.data.packing:
        problems.append("data.packing: a sweep batches every member's rows together, which packed rows cannot "
                        "hold; set packing: false")
    if config.data.validation is None and not config.data.validation_fraction:
        problems.append("sweep: ranking the members needs validation data; set data.validation or "
                        "data.validation_fraction")
    if sweep.metrics and config.data.validation is None:
        problems.append("sweep.metrics: generated answers are scored on data.validation's prompts and references; "
                        "set data.validation (a held-out fraction has no records to prompt with)")
    for metric in sweep.metrics:
        if metric not in GENERATION_METRICS:
            problems.append(f"sweep.metrics: unknown metric {metric!r}; choose from {', '.join(GENERATION_METRICS)}")
    if sweep.rank_by != "eval_loss" and sweep.rank_by not in sweep.metrics:
        problems.append(f"sweep.rank_by: {sweep.rank_by!r} is neither eval_loss nor one of sweep.metrics "
                        f"({', '.join(sweep.metrics) or 'none'})")
    if sweep.max_new_tokens < 1:
        problems.append(f"sweep.max_new_tokens: must be at least 1, got {sweep.max_new_tokens}")
    if sweep.lr is not None and not all(isinstance(v, (int, float)) and v > 0 for v in sweep.lr):
        problems.append(f"sweep.lr: every learning rate must be a positive number, got {sweep.lr}")
    for init in sweep.init_lora_weights or ():
        if isinstance(init, str) and init.startswith("pissa"):
            problems.append(f"sweep.init_lora_weights: {init} moves part of the base weights into the adapter, and "
                            "the members share one base; sweep true and gaussian, or train pissa alone")
    if problems or count < 2:
        return problems
    try:
        members(config)  # each member's LoraConfig checks its values
    except ConfigError as err:
        problems += [f"sweep: a member's lora.{problem}" for problem in err.problems]
    return problems


def expand(config: RunConfig) -> RunConfig:
    """The config with one task per member (data.train and data.validation kept: the recipe prepares them once
    and shares them among the members)."""
    if config.sweep is None:
        return config
    tasks = [TaskConfig(name=m.name, train=config.data.train, validation=config.data.validation, lora=m.lora, lr=m.lr)
             for m in members(config)]
    return dataclasses.replace(config, tasks=tasks)
