"""What a checkpoint records about the run that wrote it, so that a resume can say exactly what changed.

Every training-relevant setting is recorded under its config path ("train.lr", "lora.r", "model.name_or_path"),
plus what fixes the sequence of batches: a hash of the prepared examples, their count and packing, and the
micro-batches per optimizer step. On resume a difference stops the run (restore.compare_fingerprints) unless
the setting may legitimately change (MAY_CHANGE: how long to run, how often to log and save, speed and
process layout) or the user accepts it by name.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
from typing import Any, Sequence

from ..base_model import gguf_file_of
from ..config import TrainConfig
from ..data import PreparedData

# Settings a resumed run may change without being asked: extending a run, logging and saving cadence, speed
# options and the process layout (the micro-batches per step are compared on their own, across layouts).
MAY_CHANGE = ("train.max_steps", "train.epochs", "train.save_every", "train.eval_every", "train.log_every",
              "train.keep_checkpoints", "train.tensorboard", "train.memory_check", "train.resume", "output_dir",
              "speed", "distributed", "deploy_targets", "data.skip_bad_records", "data.max_drop_fraction",
              # the same numbers computed another way: what a run resumed after running out of memory changes
              "train.gradient_checkpointing", "train.checkpoint_every", "train.loss_chunk_tokens", "train.nan_policy",
              "model.device", "model.attn_implementation", "preference.reference.precompute",
              "rl.sample_every")
# Checkpoints that record this compare every key either side has (a section set on one side only is a change);
# older ones recorded a few keys, compared where both have them.
VERSION_KEY, VERSION = "fingerprint_version", 2
# How the sampler orders an epoch; checkpoints older than this key used length-grouped steps (restore.py).
BATCH_ORDER = "random steps, grouped by length within a step"
# Compared through what they produce instead: the data files through the examples' hash (a moved file is the
# same data), batch_size, grad_accum and seed through the batch-order keys below.
NOT_RECORDED = ("data.train", "data.validation", "train.batch_size", "train.grad_accum", "train.seed")


def flat_settings(value: Any, prefix: str) -> dict[str, Any]:
    """A config section as {"prefix.field": value} with JSON-able leaves, nested sections flattened."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value) and value:
        out = {}
        for key, item in value.items():
            out.update(flat_settings(item, f"{prefix}.{key}"))
        return out
    if isinstance(value, (list, tuple)):
        return {prefix: [_leaf(v) for v in value]}
    return {prefix: _leaf(value)}


def _leaf(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)


def run_settings(config) -> dict[str, Any]:
    """The recorded settings of a RunConfig (all sections but train, which fit records itself)."""
    settings = {}
    for name in ("model", "lora", "data", "speed", "distributed"):
        settings.update(flat_settings(getattr(config, name), name))
    if config.objective == "grpo":
        settings.update(flat_settings(config.rl, "rl"))
    elif config.objective != "sft":  # sft runs record what they always did, so their older checkpoints resume
        settings.update(flat_settings(config.preference, "preference"))
    if settings.get("model.gguf_file") is None:
        settings.pop("model.gguf_file", None)  # recorded only when set: checkpoints from before it existed resume
    gguf = gguf_file_of(config.model)
    if gguf is not None:  # the file's content, not only its name: a re-downloaded or re-quantized file differs
        settings["model.gguf_sha256"] = gguf.sha256
    settings["output_dir"] = config.output_dir
    settings["deploy_targets"] = list(config.deploy_targets)
    for task in config.tasks:
        if task.lora is not None:
            settings.update(flat_settings(task.lora, f"tasks.{task.name}.lora"))
        if task.lr is not None:
            settings[f"tasks.{task.name}.lr"] = task.lr
    return {key: value for key, value in settings.items() if not _not_recorded(key)}


def _not_recorded(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in NOT_RECORDED)


def examples_fingerprint(named_data: Sequence[tuple[str | None, PreparedData]]) -> dict:
    """{"data.sha256": ...} over the prepared examples of each (name, data) in order; a name (a task's) is
    hashed before its examples."""
    digest = hashlib.sha256()
    for name, prepared in named_data:
        if name is not None:
            digest.update(name.encode() + b"\0")
        for e in prepared.examples:
            digest.update(array.array("q", e.input_ids).tobytes())
            digest.update(array.array("q", e.labels).tobytes())
            digest.update(b"|")
    return {"data.sha256": digest.hexdigest()}


def run_fingerprints(data: dict, config: TrainConfig, processes: int = 1, settings: dict | None = None) -> dict:
    """What a checkpoint of this run records: `settings` (run_settings of the run config), the train section,
    `data` (the objective's fingerprint: what fixes its examples) and what fixes the sequence of batches.
    "train.grad_accum_x_processes" is grad_accum x processes: a run checkpointed on 2 processes resumes exactly
    on 1 with grad_accum doubled (the data position counts micro-batches, not steps)."""
    train = {k: v for k, v in flat_settings(config, "train").items() if not _not_recorded(k)}
    return {VERSION_KEY: VERSION, **(settings or {}), **train, **data, "train.batch_size": config.batch_size,
            "train.grad_accum_x_processes": config.grad_accum * processes, "train.seed": config.seed,
            "data.batch_order": BATCH_ORDER}
