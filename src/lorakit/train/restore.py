"""Restore a checkpoint written by checkpoint.py: verify every byte, check every name and shape, then apply.

Loading is a trust boundary (RELIABILITY §1-2): files are parsed only as safetensors and JSON, each file's
sha256 is checked on the exact bytes that are parsed, and nothing is changed until everything has passed.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from ..errors import CheckpointError
from .checkpoint import (CHECKPOINTS, FILES, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, check_sha256, list_checkpoints,
                         read_manifest)
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
                    optimizer: torch.optim.Optimizer | None = None, scheduler=None) -> Resumed:
    """Restore parameters, optimizer, scheduler and RNG from checkpoint `path`, in place.

    Every file's sha256 is checked and every part parsed and matched against the live objects first; only
    then is anything changed, so a refused checkpoint (CheckpointError) leaves the objects as they were.
    """
    path = Path(path)
    manifest = read_manifest(path)
    blobs = {}
    for name in FILES:
        # Hash the very bytes we parse, so the file cannot change between check and use.
        blobs[name] = (path / name).read_bytes()
        check_sha256(path / name, blobs[name], manifest["files"][name]["sha256"])
    tensors = _parse_tensors(path / MODEL_FILE, blobs[MODEL_FILE])
    optim_tensors = _parse_tensors(path / OPTIMIZER_FILE, blobs[OPTIMIZER_FILE])
    state = _parse_state(path / STATE_FILE, blobs[STATE_FILE])
    _check_model_tensors(path / MODEL_FILE, tensors, model_params)
    optim_sd = None
    if optimizer is not None:
        optim_sd = optimizer_state_from_names(optimizer, model_params, optim_tensors, state["optimizer"],
                                              str(path / STATE_FILE))
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
                   trainer_state=state["trainer_state"], fingerprints=manifest.get("fingerprints") or {})


def resume(out_dir: str | os.PathLike, model_params: dict[str, nn.Parameter],
           optimizer: torch.optim.Optimizer | None = None, scheduler=None, *,
           checkpoint: str | os.PathLike = "auto") -> Resumed | None:
    """Resume from `checkpoint`: a path (errors raise), or "auto": the newest checkpoint under `out_dir` that
    loads, falling back past corrupt ones with a warning each. None means there is nothing to resume from."""
    if str(checkpoint) != "auto":
        return load_checkpoint(checkpoint, model_params, optimizer, scheduler)
    candidates = list_checkpoints(out_dir)
    for path in reversed(candidates):
        try:
            return load_checkpoint(path, model_params, optimizer, scheduler)
        except CheckpointError as err:
            warnings.warn(f"cannot resume from {path.name}: {err}; trying the previous checkpoint", stacklevel=2)
    if candidates:
        warnings.warn(f"no valid checkpoint found in {Path(out_dir) / CHECKPOINTS} "
                      f"({len(candidates)} present, none loads)", stacklevel=2)
    return None


def compare_fingerprints(saved: dict, current: dict, *, allow_change: Iterable[str] = ()) -> None:
    """Refuse a resume whose settings drifted: CheckpointError listing each differing key, unless allowed."""
    allowed = set(allow_change)
    diffs = [f"{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}"
             for key in sorted(set(saved) | set(current))
             if key not in allowed and saved.get(key) != current.get(key)]
    if diffs:
        raise CheckpointError("the run differs from the checkpoint it resumes:\n" + "\n".join(f"  - {d}" for d in diffs)
                              + "\nresume with the original settings, or allow the change explicitly")
