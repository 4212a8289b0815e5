"""A run records how it ended in its own run file (lorakit_run.json "ended"), and its lock says whether it runs:
what `lorakit ui` reads to show a run's status, without asking the process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lorakit.errors import TrainingError
from lorakit.train import fit
from lorakit.train.lock import LOCK_FILE, acquire_lock, lock_holder, release_lock
from lorakit.train.output_dir import RUN_FILE
from test_loop_support import config, lora_model, quiet, toy_data


def ended(out) -> dict:
    return json.loads((out / RUN_FILE).read_text())["ended"]


def test_a_finished_run_records_finished(tmp_path):
    fit(lora_model(), toy_data(8), config(max_steps=2), tmp_path, log=quiet)
    assert ended(tmp_path)["status"] == "finished" and ended(tmp_path)["detail"] is None


def test_an_interrupted_run_records_interrupted_and_a_resumed_one_finished(tmp_path):
    def interrupt(event, info):
        if event == "step" and info["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(lora_model(), toy_data(8), config(max_steps=4, save_every=1), tmp_path, log=quiet, hooks=[interrupt])
    assert ended(tmp_path)["status"] == "interrupted"
    fit(lora_model(), toy_data(8), config(max_steps=4, resume="auto"), tmp_path, log=quiet)
    assert ended(tmp_path)["status"] == "finished"


def test_a_failed_run_records_the_error(tmp_path):
    def fail(event, info):
        if event == "step":
            raise TrainingError("the disk caught fire", step=info["step"])

    with pytest.raises(TrainingError):
        fit(lora_model(), toy_data(8), config(max_steps=3), tmp_path, log=quiet, hooks=[fail])
    assert ended(tmp_path)["status"] == "failed"
    assert "the disk caught fire" in ended(tmp_path)["detail"]


def test_a_run_refused_before_it_starts_writes_nothing_into_the_other_runs_directory(tmp_path):
    fit(lora_model(), toy_data(8), config(max_steps=2), tmp_path, log=quiet)
    before = (tmp_path / RUN_FILE).read_text()
    with pytest.raises(Exception, match="previous run"):
        fit(lora_model(), toy_data(8), config(max_steps=2), tmp_path, log=quiet)  # resume never: refused
    assert (tmp_path / RUN_FILE).read_text() == before


def test_lock_holder_names_the_holder_only_while_it_holds_the_lock(tmp_path):
    assert lock_holder(tmp_path) is None
    acquire_lock(tmp_path)
    try:
        assert lock_holder(tmp_path) == os.getpid()
    finally:
        release_lock(tmp_path)
    assert lock_holder(tmp_path) is None


def test_lock_holder_ignores_a_pid_left_by_a_killed_run_and_a_live_pid_without_the_lock(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(dead.stdout)
    assert lock_holder(tmp_path) is None
    (tmp_path / LOCK_FILE).write_text(f"{os.getpid()}\n")  # alive, but holds no flock on the file
    if os.path.exists("/proc/locks"):
        assert lock_holder(tmp_path) is None
