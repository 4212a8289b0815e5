"""The processes the dashboard starts: training runs and exports, each `python -m lorakit ...` in its own
session (closing the page or stopping the dashboard leaves it running), output appended to a log file.

What the dashboard keeps of a job lives under `<runs root>/.lorakit-ui/<name>/`: the run config it wrote
(config.yaml), the process's output (train.log, export-<format>.log) and beside each log its .job.json (the pid and command). The run's
own state is never kept here: it is read from the run directory (runs.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..atomic import write_text_atomic
from ..train.lock import lock_holder
from .paths import check_run_name

CONFIG_FILE, TRAIN_LOG = "config.yaml", "train.log"


class Jobs:
    """Start and stop `python -m lorakit` processes; reap them while the dashboard lives."""

    def __init__(self, ui_dir: Path):
        self.ui_dir = ui_dir
        self._children: dict[int, subprocess.Popen] = {}  # pid -> process, to reap (no zombies) and read exit codes
        self._exits: dict[int, int] = {}  # pid -> exit code of a child that ended

    def job_dir(self, name: str) -> Path:
        return self.ui_dir / check_run_name(name)  # never a path out of ui_dir, whatever a request sent

    def start(self, name: str, args: list[str], log_name: str, *, cwd: Path) -> int:
        """Run `python -m lorakit ARGS` for job `name`, its output appended to `log_name`; returns its pid."""
        folder = self.job_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "lorakit", *args]
        with open(folder / log_name, "ab") as log:
            log.write(f"\n$ lorakit {' '.join(args)}\n".encode())
            log.flush()
            process = subprocess.Popen(command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._children[process.pid] = process
        record = {"pid": process.pid, "args": args, "log": log_name, "started": time.time()}
        write_text_atomic(folder / f"{log_name}.job.json", json.dumps(record) + "\n")
        return process.pid

    def record(self, name: str, log_name: str) -> dict | None:
        try:
            return json.loads((self.job_dir(name) / f"{log_name}.job.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def alive(self, pid: int) -> bool:
        """Whether `pid` still runs: a child of this dashboard is asked (and reaped); any other process (one a
        previous dashboard started) is looked up."""
        child = self._children.get(pid)
        if child is not None:
            if child.poll() is None:
                return True
            self._exits[pid] = self._children.pop(pid).returncode
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def running(self, name: str, log_name: str) -> tuple[int, float] | None:
        """(pid, start time) of job `name`'s latest `log_name` process while it runs."""
        record = self.record(name, log_name)
        return (record["pid"], record["started"]) if record and self.alive(record["pid"]) else None

    def exit_code(self, name: str, log_name: str) -> int | None:
        """The exit code of job `name`'s latest `log_name` process, if it ended while this dashboard ran."""
        record = self.record(name, log_name)
        if record is None or self.alive(record["pid"]):
            return None
        return self._exits.get(record["pid"])

    def log_tail(self, name: str, log_name: str, limit: int = 16_000) -> str:
        path = self.job_dir(name) / log_name
        try:
            with open(path, "rb") as handle:
                handle.seek(max(0, path.stat().st_size - limit))
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""


def stop_run(run_dir: Path, launch: tuple[int, float] | None) -> int | None:
    """Ask the run in `run_dir` to stop the way Ctrl-C does: SIGTERM, on which it saves a checkpoint, then exits.
    The pid signalled is the lock's holder (a run started anywhere), else a run still starting; None: none runs."""
    pid = lock_holder(run_dir) or (launch[0] if launch else None)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
    return pid
