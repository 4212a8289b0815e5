"""Training checkpoints: save atomically, rotate, and find the newest one whose manifest verifies.

Layout of `<out>/checkpoints/step-00000042/`:
    model.safetensors      trainable tensors by parameter name
    optimizer.safetensors  per-parameter optimizer tensors, keyed "<param name>/<state key>" (optim_state.py)
    state.json             optimizer groups and scalars, LR scheduler, RNG (rng.py), data position, trainer state
    manifest.json          format_version, step, created, size + sha256 of each file above, caller fingerprints

Commit protocol (Pillai et al., OSDI'14; torch.distributed.checkpoint does the same with `.metadata`): build
`.tmp-step-N-<random>/`, fsync every file, write the manifest last and fsync it, fsync the directory, rename it
to `step-N/`, fsync `checkpoints/`. A directory named `step-N` is therefore complete, and the manifest lets a
reader prove it. Reading back (restore.py) parses only safetensors and JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from ..atomic import fsync_dir
from ..errors import CheckpointError, ConfigError
from .lock import acquire_lock, holds_lock, release_lock
from .optim_state import optimizer_state_by_name
from .rng import capture_rng_state

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
MANIFEST = "manifest.json"
OBJECTIVE_FILE = "objective.safetensors"  # what an objective needs to go on exactly (GRPO: the rollout being reused)
FILES = (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE)
OPTIONAL_FILES = (OBJECTIVE_FILE,)
STEP_DIR = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"
MAX_MANIFEST_BYTES = 1 << 20  # a manifest lists four files; anything near this size is not ours
FAULT_ENV = "LORAKIT_FAULT"


def _fault(site: str) -> None:
    """Test hook: LORAKIT_FAULT=<site> raises OSError at that point of a save; LORAKIT_FAULT=<site>:kill dies
    there as if SIGKILLed (os._exit skips every cleanup). Sites: mid_file, after_tensor_file, before_manifest,
    before_rename, before_dir_fsync, mid_rotate."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, action = spec.partition(":")
    if name == site:
        if action == "kill":
            os._exit(137)
        raise OSError(errno.EIO, f"injected fault at {site}")


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter for every parameter that requires grad: what a LoRA checkpoint holds."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"  # zero-padded so `ls` sorts; readers still sort by the number


# ---- the output directory -----------------------------------------------------------------------------
def remove_stale_tmp(out_dir: str | os.PathLike) -> list[Path]:
    """Delete `.tmp-*` directories left by interrupted saves or rotations. Call only while holding the lock."""
    root = Path(out_dir) / CHECKPOINTS
    removed = [p for p in root.glob(f"{TMP_PREFIX}*") if p.is_dir()] if root.is_dir() else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


@contextlib.contextmanager
def checkpoint_lock(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold the output directory for one run: take the PID lock, clear litter from interrupted saves."""
    out_dir = Path(out_dir)
    acquire_lock(out_dir)
    try:
        remove_stale_tmp(out_dir)
        yield out_dir
    finally:
        release_lock(out_dir)


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Every `step-N` directory, oldest first by N (whether or not it verifies)."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


# ---- save ---------------------------------------------------------------------------------------------
def _json_bytes(value: object, what: str) -> bytes:
    try:
        return (json.dumps(value, indent=1, sort_keys=True) + "\n").encode("utf-8")
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"cannot save the {what}: it must be JSON-able ({err})") from None


def _serialize(step: int, model_params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
               scheduler, data_position: dict | None, trainer_state: dict | None,
               objective_state: dict[str, torch.Tensor] | None = None) -> dict[str, bytes]:
    """Every checkpoint file's bytes. Built before the first write, so a bad value fails with nothing on disk."""
    model = {name: p.detach().to("cpu").contiguous().clone() for name, p in model_params.items()}
    optim_tensors, optim_meta = optimizer_state_by_name(optimizer, model_params)
    for part, value in (("data position", data_position), ("trainer state", trainer_state)):
        if value is not None and not isinstance(value, dict):
            raise CheckpointError(f"the {part} must be a dict, got {type(value).__name__}")
    state = {
        "step": step,
        "optimizer": optim_meta,
        "scheduler": None if scheduler is None else {"class": type(scheduler).__name__,
                                                     "state": scheduler.state_dict()},
        "rng": capture_rng_state(),
        "data_position": data_position or {},
        "trainer_state": trainer_state or {},
    }
    _json_bytes(state["scheduler"], "LR scheduler state")  # a clearer message than one for the whole file
    files = {
        MODEL_FILE: save_safetensors(model, metadata={"format": "pt"}),
        OPTIMIZER_FILE: save_safetensors(optim_tensors, metadata={"format": "pt"}),
        STATE_FILE: _json_bytes(state, "checkpoint state (data position / trainer state)"),
    }
    if objective_state:
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in objective_state.items()}
        files[OBJECTIVE_FILE] = save_safetensors(tensors, metadata={"format": "pt"})
    return files


def _write_file(path: Path, data: bytes) -> dict:
    with open(path, "xb") as handle:
        half = len(data) // 2
        handle.write(data[:half])
        handle.flush()
        _fault("mid_file")
        handle.write(data[half:])
        handle.flush()
        os.fsync(handle.fileno())
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished tmp dir to its final name, replacing a same-step checkpoint from an earlier attempt."""
    if final.exists():
        # rename() cannot replace a non-empty directory. Move the old one aside under a .tmp- name (cleaned as
        # litter if we die here); older checkpoints stay valid throughout, so a crash loses nothing committed.
        aside = final.with_name(f"{TMP_PREFIX}replaced-{final.name}-{secrets.token_hex(4)}")
        os.rename(final, aside)
        os.rename(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, final)


def save_checkpoint(out_dir: str | os.PathLike, step: int, model_params: dict[str, nn.Parameter],
                    optimizer: torch.optim.Optimizer, scheduler=None, *, data_position: dict | None = None,
                    trainer_state: dict | None = None, fingerprints: dict | None = None,
                    keep_last: int | None = None, best_step: int | None = None,
                    objective_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Commit a checkpoint of `step` under `<out_dir>/checkpoints/` and return its directory.

    The caller must hold `checkpoint_lock(out_dir)`. `fingerprints` (config hash, base model id, data hash, ...)
    go into the manifest for `compare_fingerprints` on resume. With `keep_last`, older checkpoints beyond the
    newest `keep_last` are deleted after this one is committed, except `best_step`'s. `objective_state` (tensors
    the objective needs to continue exactly) goes into objective.safetensors, verified like the other files.
    """
    out_dir = Path(out_dir)
    if not holds_lock(out_dir):
        raise CheckpointError(f"{out_dir}: save_checkpoint needs the output directory's lock; "
                              "run inside `with checkpoint_lock(out_dir):`")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"step must be a non-negative int, got {step!r}")
    payload = _serialize(step, model_params, optimizer, scheduler, data_position, trainer_state, objective_state)
    manifest = {"format_version": FORMAT_VERSION, "step": step,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": {},
                "fingerprints": fingerprints or {}}
    _json_bytes(manifest, "fingerprints")  # fail on a bad fingerprint before anything is written

    root = out_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out_dir)  # we hold the lock, so any .tmp- here is from a save that died
    tmp = root / f"{TMP_PREFIX}{step_dir_name(step)}-{secrets.token_hex(4)}"
    final = root / step_dir_name(step)
    tmp.mkdir()
    try:
        for name, data in payload.items():
            manifest["files"][name] = _write_file(tmp / name, data)
            if name == MODEL_FILE:
                _fault("after_tensor_file")
        _fault("before_manifest")
        _write_file(tmp / MANIFEST, _json_bytes(manifest, "manifest"))  # last: its presence with matching hashes marks completeness
        fsync_dir(tmp)  # the files' directory entries must be durable before the rename publishes them
        _fault("before_rename")
        _publish(tmp, final)
        _fault("before_dir_fsync")
        fsync_dir(root)  # makes the rename itself survive a power loss
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise CheckpointError(f"saving checkpoint step {step} in {root} failed: {err}") from err
        raise
    if keep_last is not None:
        try:
            rotate_checkpoints(out_dir, keep_last, keep_steps=() if best_step is None else (best_step,))
        except OSError as err:  # the new checkpoint is committed; an old one we cannot delete costs only space
            warnings.warn(f"checkpoint step {step} is saved, but deleting older checkpoints failed: {err}; "
                          "training goes on (delete them by hand to free the space)", stacklevel=2)
    return final


def rotate_checkpoints(out_dir: str | os.PathLike, keep_last: int, keep_steps: Iterable[int] = ()) -> list[Path]:
    """Delete checkpoints older than the newest `keep_last` good ones, except those of `keep_steps`.

    Only checkpoints older than the newest good one are deleted, so rotation can never leave zero good
    checkpoints. Each is renamed to `.tmp-` first, so a crash mid-delete leaves litter, not a half `step-N`.
    """
    if not isinstance(keep_last, int) or keep_last < 1:
        raise ConfigError(f"keep_last must be an integer >= 1, got {keep_last!r}", where="checkpoint rotation")
    good = []
    for path in list_checkpoints(out_dir):
        with contextlib.suppress(CheckpointError):
            verify_checkpoint(path, full_hash=False)
            good.append(path)
    if not good:
        return []
    protected = set(keep_steps)
    keep = set(good[-keep_last:]) | {p for p in good if _step_of(p) in protected}
    newest = _step_of(good[-1])
    removed = []
    for path in list_checkpoints(out_dir):
        if path in keep or _step_of(path) >= newest:
            continue
        aside = path.with_name(f"{TMP_PREFIX}delete-{path.name}")
        try:
            os.rename(path, aside)
        except OSError as err:  # one we cannot move (permissions, a busy mount) is kept; the others still go
            warnings.warn(f"could not delete old checkpoint {path}: {err}; keeping it", stacklevel=2)
            continue
        shutil.rmtree(aside, ignore_errors=True)
        removed.append(path)
        _fault("mid_rotate")
    if removed:
        fsync_dir(Path(out_dir) / CHECKPOINTS)
    return removed


def _step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


# ---- verify -------------------------------------------------------------------------------------------
def read_manifest(path: Path) -> dict:
    """The manifest of checkpoint `path`, with its structure checked and every file's size matched."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no checkpoint directory here")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}; the checkpoint is incomplete (was its save interrupted?)")
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{manifest_path}: {manifest_path.stat().st_size:,} bytes; not a lorakit manifest")
    try:
        manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{manifest_path}: not valid JSON ({err}); the manifest is corrupt") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{manifest_path}: expected a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path}: format_version {version!r} is not one this lorakit reads "
                              f"({FORMAT_VERSION}); a newer lorakit may have written it")
    step, files = manifest.get("step"), manifest.get("files")
    match = STEP_DIR.match(path.name)
    if not isinstance(step, int) or (match and int(match.group(1)) != step):
        raise CheckpointError(f"{manifest_path}: step {step!r} does not match the directory name {path.name!r}")
    if not isinstance(files, dict) or not set(FILES) <= set(files) or not set(files) <= set(FILES + OPTIONAL_FILES):
        raise CheckpointError(f"{manifest_path}: must list the files {', '.join(FILES)} (and may list "
                              f"{', '.join(OPTIONAL_FILES)}), no others")
    for name in files:
        entry, file = files[name], path / name
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)):
            raise CheckpointError(f"{manifest_path}: the entry for {name} needs an integer size and a sha256")
        if not file.is_file():
            raise CheckpointError(f"{file}: missing; the checkpoint is incomplete")
        size = file.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{file}: {size:,} bytes, the manifest says {entry['size']:,}; "
                                  "the file is truncated or corrupt")
    return manifest


def check_sha256(file: Path, data: bytes, expected: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise CheckpointError(f"{file}: sha256 {actual} does not match the manifest's {expected}; the file is corrupt")


def verify_checkpoint(path: str | os.PathLike, *, full_hash: bool = True) -> dict:
    """Return checkpoint `path`'s manifest, or raise CheckpointError saying what is wrong and in which file.

    `full_hash=False` checks only the manifest and file sizes: cheap enough to list many checkpoints.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if full_hash:
        for name in manifest["files"]:
            check_sha256(path / name, (path / name).read_bytes(), manifest["files"][name]["sha256"])
    return manifest


def latest_checkpoint(out_dir: str | os.PathLike, *, full_hash: bool = False) -> Path | None:
    """The newest checkpoint under `out_dir` that verifies; each newer one that does not is skipped with a warning."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            verify_checkpoint(path, full_hash=full_hash)
        except CheckpointError as err:
            warnings.warn(f"skipping checkpoint {path.name}: {err}", stacklevel=2)
            continue
        return path
    return None
