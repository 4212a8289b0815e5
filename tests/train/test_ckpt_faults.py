"""A save that fails or is killed at any point leaves the previous checkpoint intact; corruption is detected."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ckpt_support import edit_manifest, flip_bit, linear_setup, linear_step, replace_file_and_rehash, snapshot
from lorakit import CheckpointError
from lorakit.train import (checkpoint_lock, latest_checkpoint, list_checkpoints, load_checkpoint, resume,
                           save_checkpoint)
from lorakit.train.checkpoint import (CHECKPOINTS, FAULT_ENV, MANIFEST, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE,
                                      step_dir_name)

SAVE_SITES = ["mid_file", "after_tensor_file", "before_manifest", "before_rename", "before_dir_fsync"]


def _tmp_litter(out: Path) -> list[str]:
    return [p.name for p in (out / CHECKPOINTS).glob(".tmp-*")]


def _two_checkpoints(out: Path):
    """Steps 1 and 2 saved; returns the live objects and the parameter values at each step."""
    model, params, optimizer = linear_setup()
    values = {}
    with checkpoint_lock(out):
        for step in (1, 2):
            linear_step(model, optimizer)
            save_checkpoint(out, step, params, optimizer, trainer_state={"step": step})
            values[step] = snapshot(params)
    return model, params, optimizer, values


@pytest.mark.parametrize("site", SAVE_SITES)
def test_an_exception_at_any_save_stage_keeps_the_previous_checkpoint(site, tmp_path, monkeypatch):
    model, params, optimizer = linear_setup()
    with checkpoint_lock(tmp_path):
        linear_step(model, optimizer)
        first = save_checkpoint(tmp_path, 1, params, optimizer)
        at_first = snapshot(params)
        linear_step(model, optimizer)
        monkeypatch.setenv(FAULT_ENV, site)
        with pytest.raises(CheckpointError, match=f"injected fault at {site}") as err:
            save_checkpoint(tmp_path, 2, params, optimizer)
        monkeypatch.delenv(FAULT_ENV)
    assert str(tmp_path) in str(err.value)  # the error names where it was writing
    assert _tmp_litter(tmp_path) == []  # a raised (not killed) save cleans up after itself
    # Only after the rename is step 2 committed; before it, only step 1 exists.
    expected = {"before_dir_fsync": step_dir_name(2)}.get(site, step_dir_name(1))
    assert latest_checkpoint(tmp_path, full_hash=True).name == expected
    _, params, optimizer = linear_setup(seed=9)
    load_checkpoint(first, params, optimizer)
    assert all(torch.equal(params[n], t) for n, t in at_first.items())


CHILD = textwrap.dedent("""
    import json, os, sys, torch
    import torch._dynamo  # optimizer.step imports it lazily (~1 s a time); import it once, before forking
    from lorakit.train import checkpoint_lock, save_checkpoint

    def run(out, site):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        params = dict(model.named_parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        with checkpoint_lock(out):
            for step in (1, 2, 3):
                model(torch.randn(2, 4)).sum().backward()
                optimizer.step()
                optimizer.zero_grad()
                if step == 3:
                    os.environ["LORAKIT_FAULT"] = site + ":kill"
                save_checkpoint(out, step, params, optimizer, keep_last=2)

    # One interpreter imports torch once, then forks a writer per site (torch has run no op yet, so
    # forking is safe). Each writer dies inside save_checkpoint via os._exit(137), as under SIGKILL.
    codes = {}
    for site in sys.argv[2:]:
        pid = os.fork()
        if pid == 0:
            run(os.path.join(sys.argv[1], site), site)
            os._exit(3)  # not reached: the fault kills the writer first
        codes[site] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    print(json.dumps(codes))
""")

KILL_SITES = [*SAVE_SITES, "mid_rotate"]


def test_a_hard_kill_at_any_save_stage_never_exposes_a_partial_checkpoint(tmp_path):
    """A writer killed mid-save (no cleanup runs): the last committed checkpoint is what loads."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop(FAULT_ENV, None)
    done = subprocess.run([sys.executable, str(script), str(tmp_path), *KILL_SITES], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {site: 137 for site in KILL_SITES}

    for site in KILL_SITES:
        out = tmp_path / site
        committed = site in ("before_dir_fsync", "mid_rotate")  # killed after the rename of step 3
        assert latest_checkpoint(out, full_hash=True).name == step_dir_name(3 if committed else 2), site
        if site == "mid_rotate":
            assert [p.name for p in list_checkpoints(out)] == [step_dir_name(2), step_dir_name(3)]
        if not committed:
            assert _tmp_litter(out), site  # the half-built step 3 is still there ...
        with pytest.warns(UserWarning, match="stale lock left by pid"):
            with checkpoint_lock(out):  # ... until the next run starts; the dead run's lock is taken over
                assert _tmp_litter(out) == [], site
        _, params, optimizer = linear_setup()
        assert load_checkpoint(latest_checkpoint(out), params, optimizer).step == (3 if committed else 2)


def test_a_bit_flip_is_caught_by_sha256(tmp_path):
    model, params, optimizer, values = _two_checkpoints(tmp_path)
    second = tmp_path / CHECKPOINTS / step_dir_name(2)
    flip_bit(second / MODEL_FILE)
    before = snapshot(params)
    with pytest.raises(CheckpointError, match=rf"{MODEL_FILE}: sha256 .* does not match"):
        load_checkpoint(second, params, optimizer)
    assert all(torch.equal(params[n], t) for n, t in before.items())  # a refused load changes nothing
    assert latest_checkpoint(tmp_path) == second  # the cheap listing check sees sizes only
    with pytest.warns(UserWarning, match=f"skipping checkpoint {step_dir_name(2)}:.*sha256"):
        assert latest_checkpoint(tmp_path, full_hash=True).name == step_dir_name(1)
    with pytest.warns(UserWarning, match=f"cannot resume from {step_dir_name(2)}"):
        state = resume(tmp_path, params, optimizer)  # "auto" falls back to the previous checkpoint
    assert state.step == 1 and state.trainer_state == {"step": 1}
    assert all(torch.equal(params[n], t) for n, t in values[1].items())


@pytest.mark.parametrize("damage", ["truncate", "delete_manifest", "delete_file"])
def test_an_incomplete_checkpoint_is_skipped_by_listing_and_refused_by_name(damage, tmp_path):
    _, params, optimizer, _ = _two_checkpoints(tmp_path)
    second = tmp_path / CHECKPOINTS / step_dir_name(2)
    if damage == "truncate":
        os.truncate(second / OPTIMIZER_FILE, 10)
        message = rf"{OPTIMIZER_FILE}: 10 bytes, the manifest says .* truncated"
    elif damage == "delete_manifest":
        (second / MANIFEST).unlink()
        message = f"no {MANIFEST}; the checkpoint is incomplete"
    else:
        (second / STATE_FILE).unlink()
        message = f"{STATE_FILE}: missing"
    with pytest.warns(UserWarning, match=message):
        assert latest_checkpoint(tmp_path).name == step_dir_name(1)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(second, params, optimizer)
    with pytest.raises(CheckpointError, match=message):
        resume(tmp_path, params, optimizer, checkpoint=second)  # an explicit choice never falls back


def test_an_unknown_format_version_is_refused(tmp_path):
    _, params, optimizer, _ = _two_checkpoints(tmp_path)
    second = tmp_path / CHECKPOINTS / step_dir_name(2)
    edit_manifest(second, format_version=99)
    with pytest.raises(CheckpointError, match="format_version 99 is not one this lorakit reads"):
        load_checkpoint(second, params, optimizer)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)  # runs on unpickling, if anything ever unpickles it


@pytest.mark.parametrize("name", [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, MANIFEST])
def test_a_pickle_in_place_of_any_file_is_never_executed(name, tmp_path):
    _, params, optimizer, _ = _two_checkpoints(tmp_path)
    second = tmp_path / CHECKPOINTS / step_dir_name(2)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    if name == MANIFEST:
        (second / MANIFEST).write_bytes(payload)
    else:
        replace_file_and_rehash(second, name, payload)  # hashes match: only parsing stands in the way
    events = []

    def audit(event, args):
        if event.startswith("pickle."):
            events.append(event)

    sys.addaudithook(audit)  # cannot be removed; it only records, so it is harmless for later tests
    with pytest.raises(CheckpointError, match=re.escape(name)):
        load_checkpoint(second, params, optimizer)
    with pytest.warns(UserWarning):
        assert resume(tmp_path, params, optimizer).step == 1
    assert not marker.exists() and events == []


def test_no_checkpoint_code_path_can_unpickle():
    source = Path(__file__).resolve().parents[2] / "src" / "lorakit" / "train"
    banned = re.compile(r"torch\.load\b|\bimport pickle\b|\bfrom pickle\b|\bpickle\.\w+\(|weights_only")
    for file in source.glob("*.py"):
        assert not banned.search(file.read_text()), file
