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

from .. import __version__
from ..atomic import write_text_atomic
from ..errors import OutputDirError
from .checkpoint import CHECKPOINTS, MANIFEST, list_checkpoints
from .lock import LOCK_FILE
from .metrics import METRICS_FILE, PLOT_FILE

RUN_FILE = "lorakit_run.json"
ADAPTER_DIR = "adapter"
TRAINER_STATE = "trainer_state.json"
TENSORBOARD_DIR = "tensorboard"
SAMPLES_DIR = "samples"  # objective grpo: completions and rewards every rl.sample_every steps
SWEEP_FILE, BEST_ADAPTER = "sweep.json", "best_adapter"  # a sweep's ranking and its best member's adapter
# Everything a run writes; `overwrite` deletes these (but the lock) and nothing else.
OWN_OUTPUTS = (RUN_FILE, CHECKPOINTS, ADAPTER_DIR, METRICS_FILE, PLOT_FILE, TRAINER_STATE, TENSORBOARD_DIR, SAMPLES_DIR,
               SWEEP_FILE, BEST_ADAPTER, LOCK_FILE)


@dataclass(frozen=True)
class OutputDir:
    """What a run found in its output directory."""

    path: Path
    marked: bool
    """A lorakit run started here (lorakit_run.json)."""
    results: bool
    """A run left something to keep here: a checkpoint, an adapter, or (older lorakit) trainer_state.json."""
    own: tuple[str, ...]
    """Entries with the names of lorakit's outputs (the lock file left out)."""
    foreign: tuple[str, ...]
    """Entries lorakit never writes."""
    checkpoints: tuple[Path, ...]
    """Its `step-N` checkpoint directories, oldest first."""

    @property
    def previous_run(self) -> bool:
        return self.marked or self.results

    @property
    def saved_nothing(self) -> bool:
        """A run started here and was stopped before it saved anything (killed, out of memory): starting it
        again destroys nothing, whatever `resume` says."""
        return self.marked and not self.results

    def describe(self) -> str:
        parts = [f"checkpoints up to {self.checkpoints[-1].name}" if self.checkpoints else None,
                 f"{ADAPTER_DIR}/" if ADAPTER_DIR in self.own else None,
                 METRICS_FILE if METRICS_FILE in self.own else None]
        return ", ".join(p for p in parts if p) or ", ".join(self.own)


def inspect_output_dir(path: str | os.PathLike) -> OutputDir:
    """Look at `path` without changing it; OutputDirError if it exists and is not a directory."""
    path = Path(path)
    # One listdir, not exists() then is_dir(): under torchrun another rank's write probe makes and removes the
    # directory, and between two separate checks a vanished directory looked like "not a directory".
    try:
        names = sorted(os.listdir(path))
    except FileNotFoundError:
        names = []
    except NotADirectoryError:
        if path.exists():
            raise OutputDirError(f"{path} exists and is not a directory",
                                 hint="choose a directory for the run's outputs") from None
        names = []  # a parent is a file: the write probe says so
    own = tuple(n for n in names if n in OWN_OUTPUTS and n != LOCK_FILE)
    foreign = tuple(n for n in names if n not in OWN_OUTPUTS)
    checkpoints = tuple(list_checkpoints(path))
    results = (any((p / MANIFEST).is_file() for p in checkpoints) or (path / ADAPTER_DIR).is_dir()
               or _is_trainer_state(path / TRAINER_STATE))
    return OutputDir(path=path, marked=RUN_FILE in own, results=results, own=own, foreign=foreign,
                     checkpoints=checkpoints)


def _is_trainer_state(file: Path) -> bool:
    """Whether `file` is the trainer_state.json an older lorakit wrote at the end of a run."""
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(state, dict) and {"step", "adapter", "metrics"} <= set(state)


def check_output_dir(path: str | os.PathLike, *, resume: str, overwrite: bool, option: str = "output_dir",
                     resume_option: str | None = "--resume auto", probe: bool = True) -> OutputDir:
    """Refuse (OutputDirError) a directory this run must not write into. Cheap, changes nothing: call it before
    loading a model. `resume`: "never", "auto" or a checkpoint path; `overwrite`: the user's word to replace a
    previous run. `option` and `resume_option` name the caller's options in messages (quickstart has no resume).
    `probe`: prove the directory writable by writing (one process of several only: the probe makes and removes
    the directory, which would race with another process's probe)."""
    if overwrite and resume != "never":
        raise OutputDirError(f"overwrite starts the run over and resume={resume} continues it; choose one",
                             hint="pass --overwrite or --resume, not both")
    found = inspect_output_dir(path)
    if probe:
        _ensure_writable(found.path)
    if found.own and not found.previous_run:
        raise OutputDirError(f"{found.path} holds {_listed(found.own)}, which lorakit did not write (no {RUN_FILE}); "
                             "training there would write over them",
                             hint=f"move them away, or choose another {option}")
    if overwrite or found.saved_nothing:
        return found
    if resume == "never":
        if found.previous_run:
            keep = f"to continue it: {resume_option}; " if resume_option else ""
            raise OutputDirError(f"{found.path} holds a previous run ({found.describe()}); {keep}to replace it: "
                                 f"--overwrite (deletes only lorakit's outputs: {', '.join(OWN_OUTPUTS[:-1])})",
                                 hint=f"continue the run ({resume_option}), start it over (--overwrite), or choose "
                                 f"another {option}" if resume_option else
                                 f"start it over (--overwrite), or choose another {option}")
        if found.foreign:
            raise OutputDirError(f"{found.path} is not empty ({_listed(found.foreign)})",
                                 hint=f"choose a new or empty {option}, or pass --overwrite to train there anyway "
                                 "(files lorakit did not write are left alone)")
    elif resume == "auto":
        if found.results and not found.checkpoints:
            raise OutputDirError(f"{found.path} holds a previous run ({found.describe()}) but no checkpoint to "
                                 "continue it from", hint=f"start it over with --overwrite, or choose another {option}")
    elif found.results:
        _check_resume_path(found, Path(resume), option)
    return found


def _check_resume_path(found: OutputDir, checkpoint: Path, option: str) -> None:
    """Resuming a given checkpoint into a directory with results: only this run's newest checkpoint, since later
    saves rotate away every newer one and rewrite metrics and adapter from the older step on."""
    newest = found.checkpoints[-1] if found.checkpoints else None
    inside = checkpoint.resolve().parent == (found.path / CHECKPOINTS).resolve()
    if inside and newest is not None and checkpoint.resolve() == newest.resolve():
        return
    if inside:
        raise OutputDirError(f"{checkpoint.name} is older than this run's newest checkpoint {newest.name}; resuming "
                             "from it would rotate the newer checkpoints away and rewrite the adapter and metrics",
                             hint=f"to go back to it, resume it into a new {option} (--set output_dir=NEW --resume "
                             f"{checkpoint}), or delete the newer checkpoints yourself")
    raise OutputDirError(f"{found.path} holds another run ({found.describe()}); resuming {checkpoint} there would "
                         "write over it", hint=f"resume it into a new or empty {option}")


def _listed(names: tuple[str, ...]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _ensure_writable(path: Path) -> None:
    """Prove `path` can be created and written by doing it; what this made is removed again, so a run
    refused later (before training) leaves nothing behind."""
    made = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise OutputDirError(f"cannot write to {path}: {err.strerror or err}",
                             hint="choose a directory you can write to") from None
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
    record = {"lorakit_version": __version__, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "settings": settings}
    _write_run_record(path, record)


def read_run_file(path: str | os.PathLike) -> dict | None:
    """The run file's record (None when there is none or it is unreadable)."""
    try:
        record = json.loads((Path(path) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def record_outcome(path: str | os.PathLike, status: str, detail: str | None = None) -> None:
    """Add how the run ended to its run file: "finished", "interrupted" (Ctrl-C, SIGTERM: a checkpoint was saved)
    or "failed" (`detail`: the error), so a dashboard reads a run's state from the run's own files. A run killed
    outright (kill -9, out of memory) records nothing: its state is its last record, or none."""
    record = read_run_file(path)
    if record is None:
        return
    record["ended"] = {"status": status, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "detail": detail}
    _write_run_record(path, record)


def _write_run_record(path: str | os.PathLike, record: dict) -> None:
    write_text_atomic(Path(path) / RUN_FILE, json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
