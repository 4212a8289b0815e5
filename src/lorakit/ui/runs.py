"""Runs as the dashboard shows them, read from each run's own files and lock: status, progress, checkpoints,
metrics; and metrics.jsonl followed as it grows (by byte offset, never re-reading what was sent)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..train.checkpoint import MANIFEST, list_checkpoints
from ..train.lock import lock_holder
from ..train.metrics import METRICS_FILE
from ..train.output_dir import ADAPTER_DIR, RUN_FILE, TRAINER_STATE, read_run_file
from .paths import UI_DIR


@dataclass
class RunSummary:
    name: str
    status: str
    """running, starting, finished, interrupted, failed, or killed (stopped without a word: kill -9, out of memory)"""
    detail: str | None
    pid: int | None
    step: int | None
    total_steps: int | None
    loss: float | None
    eval_loss: float | None
    started: str | None
    has_adapter: bool

    def as_dict(self) -> dict:
        return asdict(self)


def find_runs(root: Path) -> list[Path]:
    """Every run directory under `root` (runs, and a sweep's members one level down), sorted by name."""
    found = []
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        if child.name == UI_DIR or not child.is_dir() or child.is_symlink():
            continue
        if (child / RUN_FILE).is_file():
            found.append(child)
        found += [g for g in sorted(child.iterdir()) if g.is_dir() and not g.is_symlink() and (g / RUN_FILE).is_file()]
    return found


def status_of(path: Path, launch: tuple[int, float] | None = None) -> tuple[str, str | None, int | None]:
    """(status, detail, pid) of the run in `path`. The lock says running; else the run file's record of how it
    ended; a run file with neither was killed. `launch`: (pid, start time) of a process the dashboard started for
    this run and that still runs: before it takes the lock (and writes the run file) the run is starting."""
    pid = lock_holder(path)
    if pid is not None:
        return "running", None, pid
    if launch is not None and _written_before(path / RUN_FILE, launch[1]):
        return "starting", None, launch[0]
    record = read_run_file(path) or {}
    ended = record.get("ended")
    if isinstance(ended, dict) and ended.get("status"):
        return str(ended["status"]), ended.get("detail"), None
    if (path / TRAINER_STATE).is_file():
        return "finished", None, None
    if record:
        return "killed", "the run stopped without recording why (killed, or out of memory); resume continues from " \
                         "its last checkpoint", None
    return "failed", "the run never started (see its log)", None


def _written_before(file: Path, moment: float) -> bool:
    try:
        return file.stat().st_mtime < moment
    except OSError:
        return True  # not written yet


def summary(root: Path, path: Path, launch: tuple[int, float] | None = None) -> RunSummary:
    status, detail, pid = status_of(path, launch)
    record = read_run_file(path) or {}
    rows = tail_rows(path / METRICS_FILE, 64 * 1024)
    train = [r for r in rows if isinstance(r.get("loss"), (int, float))]
    evals = [r for r in rows if isinstance(r.get("eval_loss"), (int, float))]
    settings = record.get("settings") or {}
    total = settings.get("train.max_steps")
    try:
        final = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        total = final.get("total_steps", total)
    except (OSError, json.JSONDecodeError):
        pass
    return RunSummary(name=path.relative_to(root).as_posix(), status=status, detail=detail, pid=pid,
                      step=train[-1]["step"] if train else None, total_steps=total if isinstance(total, int) else None,
                      loss=train[-1]["loss"] if train else None, eval_loss=evals[-1]["eval_loss"] if evals else None,
                      started=record.get("started"), has_adapter=has_adapter(path))


def has_adapter(path: Path) -> bool:
    """Whether the run in `path` has written its final adapter (at the end of training)."""
    return (path / ADAPTER_DIR / "adapter_config.json").is_file()


def checkpoints(path: Path) -> list[dict]:
    return [{"name": c.name, "complete": (c / MANIFEST).is_file()} for c in list_checkpoints(path)]


def tail_rows(path: Path, limit: int) -> list[dict]:
    """The complete rows among the last `limit` bytes of a metrics file."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            handle.seek(max(0, size - limit))
            data = handle.read()
    except OSError:
        return []
    if size > limit:
        data = data[data.find(b"\n") + 1:]  # the first line is likely cut
    return _rows(data)


def _rows(data: bytes) -> list[dict]:
    rows = []
    for line in data.splitlines():
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


class MetricsFollower:
    """New rows of a metrics.jsonl since the last read. A resumed run rewrites the file (dropping the steps after
    its checkpoint): a new inode or a shorter file starts over, and `reset` says so."""

    def __init__(self, path: Path):
        self.path, self.offset, self.inode, self.partial = path, 0, None, b""

    def read(self) -> tuple[bool, list[dict]]:
        """(reset, rows): reset means the rows sent before are void and these are the file from its start."""
        try:
            stat = self.path.stat()
        except OSError:
            return False, []
        reset = self.inode is not None and (stat.st_ino != self.inode or stat.st_size < self.offset)
        if reset or self.inode is None:
            self.offset, self.partial, self.inode = 0, b"", stat.st_ino
        if stat.st_size == self.offset:
            return reset, []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read(stat.st_size - self.offset)
        self.offset += len(data)
        data = self.partial + data
        end = data.rfind(b"\n") + 1  # a line still being written waits for its newline
        complete, self.partial = data[:end], data[end:]
        return reset, _rows(complete)
