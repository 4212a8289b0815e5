"""A run's output directory: what is in it, and whether this run may write there.

No run destroys an earlier one. A training run writes only into an empty (or new) directory, unless it resumes
the run already there (`resume: auto` or a checkpoint) or the user says `overwrite`, which deletes lorakit's own
outputs and nothing else. A directory is recognised as lorakit's by `lorakit_run.json`, written when a run
starts (older lorakit versions wrote none; their runs are recognised by a checkpoint manifest or
trainer_state.json). Files lorakit did not write are never touched: a directory holding them is refused unless
the user says `overwrite`, and even then a foreign file with the name of a lorakit output is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import OutputDirError
from .checkpoint import CHECKPOINTS, MANIFEST, list_checkpoints
from .lock import LOCK_FILE
from .metrics import METRICS_FILE, PLOT_FILE

RUN_FILE = "lorakit_run.json"
ADAPTER_DIR = "adapter"
TRAINER_STATE = "trainer_state.json"
TENSORBOARD_DIR = "tensorboard"
# Everything a run writes; `overwrite` deletes these (but the lock) and nothing else.
OWN_OUTPUTS = (RUN_FILE, CHECKPOINTS, ADAPTER_DIR, METRICS_FILE, PLOT_FILE, TRAINER_STATE, TENSORBOARD_DIR, LOCK_FILE)


@dataclass(frozen=True)
class OutputDir:
    """What a run found in its output directory."""

    path: Path
    previous_run: bool
    """A lorakit run wrote here (its marker, a checkpoint or trainer_state.json is present)."""
    own: tuple[str, ...]
    """Entries with the names of lorakit's outputs (the lock file left out)."""
    foreign: tuple[str, ...]
    """Entries lorakit never writes."""

    def describe(self) -> str:
        checkpoints = list_checkpoints(self.path)
        parts = [f"checkpoints up to {checkpoints[-1].name}" if checkpoints else None,
                 f"{ADAPTER_DIR}/" if ADAPTER_DIR in self.own else None,
                 METRICS_FILE if METRICS_FILE in self.own else None]
        return ", ".join(p for p in parts if p) or ", ".join(self.own)


def inspect_output_dir(path: str | os.PathLike) -> OutputDir:
    """Look at `path` without changing it; ConfigError if it exists and is not a directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{path} exists and is not a directory; choose a directory for the run's outputs")
    names = sorted(os.listdir(path)) if path.is_dir() else []
    own = tuple(n for n in names if n in OWN_OUTPUTS and n != LOCK_FILE)
    foreign = tuple(n for n in names if n not in OWN_OUTPUTS)
    previous = (RUN_FILE in own or any((p / MANIFEST).is_file() for p in list_checkpoints(path))
                or _is_trainer_state(path / TRAINER_STATE))
    return OutputDir(path=path, previous_run=previous, own=own, foreign=foreign)


def _is_trainer_state(file: Path) -> bool:
    """Whether `file` is the trainer_state.json an older lorakit wrote at the end of a run."""
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(state, dict) and {"step", "adapter", "metrics"} <= set(state)


def check_output_dir(path: str | os.PathLike, *, resuming: bool, overwrite: bool) -> OutputDir:
    """Refuse (ConfigError) a directory this run must not write into; create it if missing. Cheap: call it
    before loading a model. `resuming`: the run continues from a checkpoint found here (or given)."""
    found = inspect_output_dir(path)
    _ensure_writable(found.path)
    if found.own and not found.previous_run:
        listed = ", ".join(found.own[:4])
        raise OutputDirError(f"{found.path} holds {listed}, which lorakit did not write (no {RUN_FILE}); lorakit "
                          "would write over them. Move them away or choose another output_dir")
    if resuming or overwrite:
        return found
    if found.previous_run:
        raise OutputDirError(f"{found.path} holds a previous run ({found.describe()}). To continue it: --resume auto "
                          f"(train.resume: auto); to replace it: --overwrite (deletes only lorakit's outputs: "
                          f"{', '.join(n for n in OWN_OUTPUTS if n != LOCK_FILE)}); or choose another output_dir")
    if found.foreign:
        listed = ", ".join(found.foreign[:4]) + (f" and {len(found.foreign) - 4} more" if len(found.foreign) > 4 else "")
        raise OutputDirError(f"{found.path} is not empty ({listed}); choose a new or empty output_dir, or pass "
                          "--overwrite to train there anyway (files lorakit did not write are left alone)")
    return found


def _ensure_writable(path: Path) -> None:
    """Prove `path` can be created and written by doing it; what this made is removed again, so a run
    refused later (before training) leaves nothing behind."""
    made = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise OutputDirError(f"cannot write to {path}: {err.strerror or err}; choose a directory you can "
                             "write to") from None
    finally:
        for directory in made:  # deepest first
            with contextlib.suppress(OSError):
                directory.rmdir()


def clear_own_outputs(found: OutputDir) -> list[str]:
    """Delete a previous run's outputs (what `overwrite` means); the caller holds the directory's lock."""
    removed = []
    for name in found.own:
        target = found.path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
        removed.append(name)
    return removed


def write_run_file(path: str | os.PathLike, settings: dict) -> None:
    """Mark `path` as a lorakit run's directory, recording the settings it started with."""
    from .. import __version__

    record = {"lorakit_version": __version__, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "settings": settings}
    write_text_atomic(Path(path) / RUN_FILE, json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
