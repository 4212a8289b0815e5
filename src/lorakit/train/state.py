"""The resumable state of a run, and the checkpoints that hold it: save, start afresh or resume exactly.

A checkpoint (checkpoint.py writes it) holds the trainable tensors, the optimizer and scheduler, the RNG, the
data position (epoch, micro-batches of it done) and TrainState; its manifest holds the run's fingerprints
(fingerprint.py). Resuming compares them (restore.py) and puts everything back, so the next step is the step
the interrupted run would have taken. Only rank 0 writes; the other processes hold the same values.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from ..errors import CheckpointError, TrainingError
from .checkpoint import checkpoint_lock, save_checkpoint
from .fingerprint import MAY_CHANGE
from .output_dir import check_output_dir, clear_own_outputs, record_outcome, write_run_file
from .restore import resume as resume_checkpoint
from .runtime import Runtime


@dataclass
class TrainState:
    """What trainer_state.json and each checkpoint's trainer_state hold (all JSON-able)."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # micro-batches of `epoch` already consumed
    best_eval_loss: float | None = None
    best_step: int | None = None
    last_eval_loss: float | None = None
    last_eval_perplexity: float | None = None
    skipped_steps: int = 0
    consecutive_skips: int = 0
    empty_windows: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Checkpoints:
    """The checkpoints of one run in `out`: what to save, where it was last saved, and where to start."""

    def __init__(self, out: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, scheduler, *,
                 fingerprints: dict, keep_last: int | None, runtime: Runtime, log: Callable[[str], None],
                 on_save: Callable[[int, Path], None],
                 objective_state: Callable[[], dict[str, torch.Tensor]] = dict):
        self.out, self.params, self.optimizer, self.scheduler = out, params, optimizer, scheduler
        self.fingerprints, self.keep_last, self.runtime, self.log, self.on_save = \
            fingerprints, keep_last, runtime, log, on_save
        self.objective_state = objective_state  # the objective's tensors, saved with each checkpoint
        self.last_saved: int | None = None
        self.started = False  # start() succeeded: this run owns the directory's run file
        self.resumed_from: int | None = None
        self.resumed_objective_state: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the output directory's lock (rank 0: the one that writes) for the whole run."""
        with checkpoint_lock(self.out) if self.runtime.is_main else contextlib.nullcontext():
            yield

    @contextlib.contextmanager
    def outcome_recorded(self) -> Iterator[None]:
        """Record in the run file how the block ended (finished, interrupted or failed), once start() succeeded;
        rank 0 only. Inside `locked()`, so the record is written before the lock is released."""
        try:
            yield
        except KeyboardInterrupt:
            self._record("interrupted", None)
            raise
        except Exception as err:
            self._record("failed", f"{type(err).__name__}: {err}")
            raise
        self._record("finished", None)

    def _record(self, status: str, detail: str | None) -> None:
        if self.started and self.runtime.is_main:
            record_outcome(self.out, status, detail)

    def start(self, state: TrainState, *, resume: str, overwrite: bool, allow_change: Iterable[str],
              batches_per_epoch: int) -> None:
        """Resume into `state` (resume: "auto" or a checkpoint) or start afresh, after checking output_dir;
        every process ends with rank 0's parameters."""
        found = check_output_dir(self.out, resume=resume, overwrite=overwrite) if self.runtime.is_main else None
        resumed = None
        if resume != "never":
            resumed = resume_checkpoint(self.out, self.params, self.optimizer, self.scheduler, checkpoint=resume,
                                        fingerprints=self.fingerprints, allow_change=allow_change,
                                        may_change=MAY_CHANGE)
            if resumed is None:
                self.log(f"resume={resume}: no checkpoint in {self.out}; starting from step 0")
        if resumed is None and self.runtime.is_main:
            if found.own and (overwrite or found.saved_nothing):
                why = "overwrite" if overwrite else "the previous start saved nothing"
                self.log(f"{why}: deleting the previous run's {', '.join(clear_own_outputs(found))} in {self.out}")
            write_run_file(self.out, self.fingerprints)
        if resumed is not None:
            for change in resumed.changes:
                self.log(f"resuming with a changed setting: {change}")
            position = resumed.data_position
            if not (isinstance(position.get("epoch"), int) and isinstance(position.get("batches_done"), int)):
                raise CheckpointError(f"{resumed.path}: data_position {position!r} lacks epoch/batches_done")
            for key, value in resumed.trainer_state.items():
                if hasattr(state, key):
                    setattr(state, key, value)
            state.step, state.epoch, state.batches_done = resumed.step, position["epoch"], position["batches_done"]
            self.resumed_from = self.last_saved = resumed.step
            self.resumed_objective_state = resumed.objective_state
            self.log(f"resumed from {resumed.path} at step {resumed.step} "
                     f"(epoch {state.epoch}, batch {state.batches_done} of {batches_per_epoch})")
        self.runtime.broadcast_parameters(list(self.params.values()))  # resumed or seeded alike; made identical
        self.started = True

    def save(self, state: TrainState, why: str) -> Path | None:
        """A checkpoint of `state` now (rank 0 writes it); parameters holding NaN/inf are never saved."""
        if not self.runtime.is_main:
            self.last_saved = state.step
            return None
        for name, p in self.params.items():
            if not torch.isfinite(p).all():
                raise TrainingError(f"step {state.step}: parameter {name} holds NaN/inf; not saving it, the last "
                                    f"good checkpoint is kept", step=state.step)
        path = save_checkpoint(self.out, state.step, self.params, self.optimizer, self.scheduler,
                               data_position={"epoch": state.epoch, "batches_done": state.batches_done},
                               trainer_state=state.as_dict(), fingerprints=self.fingerprints,
                               keep_last=self.keep_last, best_step=state.best_step,
                               objective_state=self.objective_state())
        self.last_saved = state.step
        self.log(f"saved checkpoint {path} ({why})")
        self.on_save(state.step, path)
        return path

    def last_good_note(self) -> str:
        return (f"the last good checkpoint (step {self.last_saved}) is kept in {self.out}"
                if self.last_saved is not None else "no checkpoint had been saved yet")
