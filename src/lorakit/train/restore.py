"""Restore a checkpoint written by checkpoint.py: verify every byte, check every name and shape, then apply.

Loading is a trust boundary (RELIABILITY §1-2): files are parsed only as safetensors and JSON, each file's
sha256 is checked on the exact bytes that are parsed, and nothing is changed until everything has passed.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from ..errors import CheckpointError
from .checkpoint import (CHECKPOINTS, MODEL_FILE, OBJECTIVE_FILE, OPTIMIZER_FILE, STATE_FILE, check_sha256,
                         list_checkpoints, read_manifest)
from .fingerprint import VERSION_KEY
from .optim_state import optimizer_state_from_names
from .rng import check_rng_state, restore_rng_state


@dataclass(frozen=True)
class Resumed:
    """What load_checkpoint restored besides the tensors: where the caller's loop picks up."""

    path: Path
    step: int
    data_position: dict
    trainer_state: dict
    fingerprints: dict
    changes: list[str] = field(default_factory=list)
    """Settings that differ from the checkpoint's and were accepted (may_change or allow_change)."""
    objective_state: dict[str, torch.Tensor] = field(default_factory=dict)
    """The objective's own tensors (objective.safetensors; empty when it saved none)."""


# ---- parse and check ----------------------------------------------------------------------------------
def _parse_tensors(file: Path, data: bytes) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, OSError) as err:
        raise CheckpointError(f"{file}: not a valid safetensors file ({err})") from None


def _parse_state(file: Path, data: bytes) -> dict:
    try:
        state = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from None
    needed = ("step", "optimizer", "scheduler", "rng", "data_position", "trainer_state")
    if not isinstance(state, dict) or any(key not in state for key in needed):
        raise CheckpointError(f"{file}: expected a JSON object with {', '.join(needed)}")
    return state


def _check_model_tensors(file: Path, tensors: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> None:
    missing = [name for name in params if name not in tensors]
    if missing:
        raise CheckpointError(f"{file}: no tensor for parameter {missing[0]!r} ({len(missing)} missing in all); "
                              "was the checkpoint written for another model or LoRA config?")
    unexpected = [name for name in tensors if name not in params]
    if unexpected:
        raise CheckpointError(f"{file}: tensor {unexpected[0]!r} is not a parameter of this model "
                              f"({len(unexpected)} unexpected in all)")
    for name, param in params.items():
        tensor = tensors[name]
        if tensor.shape != param.shape or tensor.dtype != param.dtype:
            raise CheckpointError(f"{file}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, "
                                  f"the parameter is {param.dtype} {list(param.shape)}")


def load_checkpoint(path: str | os.PathLike, model_params: dict[str, nn.Parameter],
                    optimizer: torch.optim.Optimizer | None = None, scheduler=None, *,
                    fingerprints: dict | None = None, allow_change: Iterable[str] = (),
                    may_change: Iterable[str] = ()) -> Resumed:
    """Restore parameters, optimizer, scheduler and RNG from checkpoint `path`, in place.

    Every file's sha256 is checked and every part parsed and matched against the live objects first; only
    then is anything changed, so a refused checkpoint (CheckpointError) leaves the objects as they were.
    A checkpoint that is intact but does not fit (`fingerprints` differ, or the tensors do) raises
    CheckpointMismatch, so that callers can tell it from a corrupt one.
    """
    path = Path(path)
    manifest = read_manifest(path)
    blobs = {}
    for name in manifest["files"]:  # FILES, and objective.safetensors where the objective saved one
        # Hash the very bytes we parse, so the file cannot change between check and use.
        blobs[name] = (path / name).read_bytes()
        check_sha256(path / name, blobs[name], manifest["files"][name]["sha256"])
    changes = []
    if fingerprints is not None:
        changes = compare_fingerprints(manifest.get("fingerprints") or {}, fingerprints, allow_change=allow_change,
                                       may_change=may_change)
    return _apply(path, manifest, blobs, model_params, optimizer, scheduler, changes)


def _apply(path: Path, manifest: dict, blobs: dict[str, bytes], model_params: dict[str, nn.Parameter],
           optimizer, scheduler, changes: list[str]) -> Resumed:
    tensors = _parse_tensors(path / MODEL_FILE, blobs[MODEL_FILE])
    optim_tensors = _parse_tensors(path / OPTIMIZER_FILE, blobs[OPTIMIZER_FILE])
    state = _parse_state(path / STATE_FILE, blobs[STATE_FILE])
    objective_state = _parse_tensors(path / OBJECTIVE_FILE, blobs[OBJECTIVE_FILE]) if OBJECTIVE_FILE in blobs else {}
    optim_sd = None
    try:  # intact files whose tensors are not this model's: a mismatch, never a reason to try an older checkpoint
        _check_model_tensors(path / MODEL_FILE, tensors, model_params)
        if optimizer is not None:
            optim_sd = optimizer_state_from_names(optimizer, model_params, optim_tensors, state["optimizer"],
                                                  str(path / STATE_FILE))
    except CheckpointError as err:
        raise CheckpointMismatch(str(err)) from None
    if scheduler is not None:
        saved = state["scheduler"]
        if not isinstance(saved, dict) or saved.get("class") != type(scheduler).__name__ \
                or not isinstance(saved.get("state"), dict):
            raise CheckpointError(f"{path / STATE_FILE}: holds no {type(scheduler).__name__} state "
                                  f"(found {saved.get('class') if isinstance(saved, dict) else None})")
        unknown = sorted(set(saved["state"]) - set(scheduler.state_dict()))
        if unknown:
            raise CheckpointError(f"{path / STATE_FILE}: unknown LR scheduler field {unknown[0]!r}")
    check_rng_state(state["rng"], str(path / STATE_FILE))
    for part in ("data_position", "trainer_state"):
        if not isinstance(state[part], dict):
            raise CheckpointError(f"{path / STATE_FILE}: {part} must be a JSON object")

    with torch.no_grad():
        for name, param in model_params.items():
            param.copy_(tensors[name])
    if optimizer is not None:
        optimizer.load_state_dict(optim_sd)
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"]["state"])
    restore_rng_state(state["rng"])
    return Resumed(path=path, step=manifest["step"], data_position=state["data_position"],
                   trainer_state=state["trainer_state"], fingerprints=manifest.get("fingerprints") or {},
                   changes=changes, objective_state=objective_state)


def resume(out_dir: str | os.PathLike, model_params: dict[str, nn.Parameter],
           optimizer: torch.optim.Optimizer | None = None, scheduler=None, *,
           checkpoint: str | os.PathLike = "auto", fingerprints: dict | None = None,
           allow_change: Iterable[str] = (), may_change: Iterable[str] = ()) -> Resumed | None:
    """Resume from `checkpoint`: a path (errors raise), or "auto": the newest checkpoint under `out_dir`,
    falling back past corrupt ones (a bad manifest or hash) with a warning each. None means there is no
    checkpoint at all. A checkpoint that is intact but does not fit this run (other settings, other shapes:
    CheckpointMismatch) is never skipped, and neither is a directory whose every checkpoint is corrupt: both
    stop the run, because starting over would write over the run that is there.
    With `fingerprints`, the checkpoint's recorded settings are compared first (compare_fingerprints)."""
    if str(checkpoint) != "auto":
        return load_checkpoint(checkpoint, model_params, optimizer, scheduler, fingerprints=fingerprints,
                               allow_change=allow_change, may_change=may_change)
    candidates = list_checkpoints(out_dir)
    problems = []
    for path in reversed(candidates):
        try:
            return load_checkpoint(path, model_params, optimizer, scheduler, fingerprints=fingerprints,
                                   allow_change=allow_change, may_change=may_change)
        except CheckpointMismatch:
            raise
        except CheckpointError as err:
            problems.append(f"{path.name}: {err}")
            warnings.warn(f"cannot resume from {path.name}: {err}; trying the previous checkpoint", stacklevel=2)
    if candidates:
        raise CheckpointError(f"none of the {len(candidates)} checkpoints in {Path(out_dir) / CHECKPOINTS} is intact:\n"
                              + "\n".join(f"  - {p}" for p in problems)
                              + "\nresume from a copy you trust (--resume PATH), or start over with --overwrite")
    return None


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint that does not fit this run: its settings or tensors differ from the run's."""

    hint = ("resume with the checkpoint's settings, accept a changed setting with --allow-change FIELD, or start "
            "over (--overwrite, or another output_dir)")


# Fingerprint keys written by lorakit before 2026-12, read under today's names.
LEGACY_KEYS = {"data_sha256": "data.sha256", "examples": "data.examples", "packing": "data.packing",
               "batch_size": "train.batch_size", "grad_accum": "train.grad_accum_x_processes", "seed": "train.seed"}


def _by_current_names(fingerprints: dict) -> dict:
    renamed = {LEGACY_KEYS.get(key, key): value for key, value in fingerprints.items()}
    if fingerprints and VERSION_KEY not in fingerprints and "data.sha256" in renamed:
        renamed["data.batch_order"] = "length-grouped steps (lorakit before 2026-12)"  # a resume would reorder
    return renamed


_UNSET = object()


def _shown(fingerprints: dict, key: str) -> str:
    return repr(fingerprints[key]) if key in fingerprints else "not set"


def _allowed(key: str, allowed: set[str]) -> bool:
    """`train.lr` is allowed by "train.lr", "train" or "all"; data.* by "data"."""
    return "all" in allowed or any(key == a or key.startswith(a + ".") for a in allowed)


def compare_fingerprints(saved: dict, current: dict, *, allow_change: Iterable[str] = (),
                         may_change: Iterable[str] = ()) -> list[str]:
    """Refuse a resume whose settings drifted: CheckpointMismatch listing each differing key, unless allowed
    (`allow_change`: the user's word; `may_change`: settings that may legitimately differ, such as max_steps).
    Keys the checkpoint did not record (an older lorakit wrote it) are not compared. Returns the accepted
    differences, one line each, for the log."""
    saved, current = _by_current_names(saved), _by_current_names(current)
    allowed, free = {LEGACY_KEYS.get(a, a) for a in allow_change}, set(may_change)
    if saved.get(VERSION_KEY) is not None and current.get(VERSION_KEY) is not None:
        # Every key either side has, within the sections both record: `lora.alpha_pattern: {}` recorded as one key
        # and `{q_proj: 64}` as `lora.alpha_pattern.q_proj` must still differ. A section one side did not record
        # at all (fit called without the run config's settings) is not compared.
        sections = {k.split(".")[0] for k in saved} & {k.split(".")[0] for k in current}
        keys = {k for k in set(saved) | set(current) if k.split(".")[0] in sections}
    else:
        keys = set(saved) & set(current)
    diffs = [(key, f"{key}: checkpoint {_shown(saved, key)}, now {_shown(current, key)}")
             for key in sorted(keys) if saved.get(key, _UNSET) != current.get(key, _UNSET)]
    refused = [line for key, line in diffs if not _allowed(key, allowed | free)]
    if refused:
        raise CheckpointMismatch("the run differs from the checkpoint it resumes:\n"
                                 + "\n".join(f"  - {d}" for d in refused)
                                 + "\nto accept: --allow-change "
                                 + " --allow-change ".join(k for k, l in diffs if l in refused))
    return [line for _, line in diffs]
