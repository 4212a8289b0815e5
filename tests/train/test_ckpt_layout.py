"""The checkpoint directory: lock, rotation, name and shape checks, fingerprints, empty directories."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from ckpt_support import linear_setup, linear_step, snapshot
from lorakit import CheckpointError
from lorakit.train import (checkpoint_lock, compare_fingerprints, latest_checkpoint, list_checkpoints,
                           load_checkpoint, resume, save_checkpoint, verify_checkpoint)
from lorakit.train.checkpoint import CHECKPOINTS, MANIFEST, step_dir_name
from lorakit.train.lock import LOCK_FILE, acquire_lock, release_lock


def _saved(out, steps=(1,), **save_kwargs):
    model, params, optimizer = linear_setup()
    with checkpoint_lock(out):
        for step in steps:
            linear_step(model, optimizer)
            path = save_checkpoint(out, step, params, optimizer, **save_kwargs)
    return path, model, params, optimizer


# ---- lock ---------------------------------------------------------------------------------------------
def test_saving_requires_the_lock(tmp_path):
    _, params, optimizer = linear_setup()
    with pytest.raises(CheckpointError, match="needs the output directory's lock"):
        save_checkpoint(tmp_path, 1, params, optimizer)


def test_a_second_run_on_a_locked_directory_is_refused_with_the_holders_pid(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from lorakit.train.lock import acquire_lock, release_lock
            acquire_lock({str(tmp_path)!r}); print("locked", flush=True)
            sys.stdin.readline(); release_lock({str(tmp_path)!r})
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=rf"in use by another run \(pid {holder.pid}"):
            acquire_lock(tmp_path)
    finally:
        holder.communicate("\n", timeout=60)
    with checkpoint_lock(tmp_path):  # released cleanly: no stale-lock warning, and it can be taken now
        pass


def test_a_stale_lock_of_a_dead_pid_is_taken_over_with_a_warning(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(f"{dead.pid}\n")
    with pytest.warns(UserWarning, match=f"stale lock left by pid {dead.pid}"):
        acquire_lock(tmp_path)
    try:
        assert (tmp_path / LOCK_FILE).read_text().strip() != str(dead.pid)
        with pytest.raises(CheckpointError, match="already holds the lock"):
            acquire_lock(tmp_path)
    finally:
        release_lock(tmp_path)


# ---- rotation and listing -------------------------------------------------------------------------------
def test_rotation_keeps_the_last_k_and_the_best(tmp_path):
    _saved(tmp_path, steps=range(1, 6), keep_last=2, best_step=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [step_dir_name(s) for s in (2, 4, 5)]
    assert [p.name for p in (tmp_path / CHECKPOINTS).iterdir() if p.name.startswith(".tmp-")] == []


def test_checkpoints_sort_by_step_number_not_by_name(tmp_path):
    _saved(tmp_path, steps=(9, 10, 123_456_789))
    assert latest_checkpoint(tmp_path).name == step_dir_name(123_456_789)


def test_saving_a_step_again_replaces_it(tmp_path):
    path, model, params, optimizer = _saved(tmp_path, steps=(1, 2))
    linear_step(model, optimizer)
    with checkpoint_lock(tmp_path):
        again = save_checkpoint(tmp_path, 2, params, optimizer, trainer_state={"attempt": 2})
    assert again == path and verify_checkpoint(again)["step"] == 2
    assert resume(tmp_path, *linear_setup(seed=3)[1:]).trainer_state == {"attempt": 2}


def test_an_empty_or_missing_directory_has_nothing_to_resume(tmp_path):
    _, params, optimizer = linear_setup()
    assert latest_checkpoint(tmp_path / "nowhere") is None
    assert resume(tmp_path, params, optimizer) is None  # "auto": a fresh start, which the caller logs
    with pytest.raises(CheckpointError, match="no checkpoint directory here"):
        resume(tmp_path, params, optimizer, checkpoint=tmp_path / "step-7")


def test_a_manifest_step_that_disagrees_with_the_directory_name_is_refused(tmp_path):
    import json

    path, *_ = _saved(tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    (path / MANIFEST).write_text(json.dumps({**manifest, "step": 8}))
    with pytest.raises(CheckpointError, match="step 8 does not match the directory name"):
        verify_checkpoint(path)


def test_an_objectives_tensors_come_back_and_are_verified_like_the_others(tmp_path):
    rollout = {"rollout.0.old_logps": torch.randn(3, 5), "rollout.0.key": torch.tensor([0, 2])}
    path, _, params, optimizer = _saved(tmp_path, objective_state=rollout)
    resumed = load_checkpoint(path, params, optimizer)
    assert resumed.objective_state.keys() == rollout.keys()
    assert all(torch.equal(resumed.objective_state[k], rollout[k]) for k in rollout)
    data = bytearray((path / "objective.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the tensors
    (path / "objective.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="objective.safetensors: sha256 .* does not match"):
        load_checkpoint(path, params, optimizer)
    plain, *_ = _saved(tmp_path / "plain")  # no objective state: no file, and nothing comes back
    assert not (plain / "objective.safetensors").exists()
    assert load_checkpoint(plain, params, optimizer).objective_state == {}


def test_a_manifest_listing_a_file_lorakit_does_not_write_is_refused(tmp_path):
    import json

    path, *_ = _saved(tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"]["extra.bin"] = {"size": 0, "sha256": "0" * 64}
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="may list objective.safetensors\\), no others"):
        verify_checkpoint(path)


# ---- names, shapes, order -------------------------------------------------------------------------------
def test_optimizer_state_follows_parameter_names_not_positions(tmp_path):
    path, _, params, optimizer = _saved(tmp_path)
    moments = {n: optimizer.state[p]["exp_avg"].clone() for n, p in params.items()}
    _, params2, optimizer2 = linear_setup(seed=4, reverse=True)  # bias first, weight second
    load_checkpoint(path, params2, optimizer2)
    for name, p in params2.items():
        assert torch.equal(optimizer2.state[p]["exp_avg"], moments[name]), name
    assert optimizer2.param_groups[0]["betas"] == (0.9, 0.999)  # a tuple again after JSON


def test_a_missing_or_unexpected_parameter_name_is_named(tmp_path):
    path, model, params, optimizer = _saved(tmp_path)
    renamed = {"proj.weight" if n == "weight" else n: p for n, p in params.items()}
    with pytest.raises(CheckpointError, match="no tensor for parameter 'proj.weight'"):
        load_checkpoint(path, renamed, optimizer)
    with pytest.raises(CheckpointError, match="tensor 'weight' is not a parameter of this model"):
        load_checkpoint(path, {"bias": params["bias"]})


def test_a_shape_mismatch_is_named_and_changes_nothing(tmp_path):
    path, *_ = _saved(tmp_path)
    other = torch.nn.Linear(4, 5)
    params = dict(other.named_parameters())
    before = snapshot(params)
    with pytest.raises(CheckpointError, match=r"tensor 'weight' is torch.float32 \[3, 4\], the parameter is .*\[5, 4\]"):
        load_checkpoint(path, params, torch.optim.AdamW(other.parameters()))
    assert all(torch.equal(params[n], t) for n, t in before.items())


def test_optimizer_group_mismatches_are_refused(tmp_path):
    path, model, params, _ = _saved(tmp_path)
    split = torch.optim.AdamW([{"params": [params["weight"]]}, {"params": [params["bias"]]}])
    with pytest.raises(CheckpointError, match="1 optimizer param group.*now has 2"):
        load_checkpoint(path, params, split)
    with pytest.raises(CheckpointError, match="holds AdamW state; the optimizer now is SGD"):
        load_checkpoint(path, params, torch.optim.SGD(model.parameters(), lr=0.1))


def test_a_scheduler_mismatch_is_refused(tmp_path):
    model, params, optimizer = linear_setup()
    with checkpoint_lock(tmp_path):
        path = save_checkpoint(tmp_path, 1, params, optimizer)  # no scheduler saved
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(CheckpointError, match="holds no LambdaLR state"):
        load_checkpoint(path, params, optimizer, scheduler)


# ---- fingerprints -------------------------------------------------------------------------------------
def test_fingerprints_are_kept_and_drift_is_reported_key_by_key(tmp_path):
    saved = {"config_sha256": "abc", "base_model": "tiny-llama", "seed": 1}
    _saved(tmp_path, fingerprints=saved)
    state = resume(tmp_path, *linear_setup()[1:])
    assert state.fingerprints == saved
    now = {**saved, "config_sha256": "abd", "seed": 2}
    with pytest.raises(CheckpointError, match=r"config_sha256: checkpoint 'abc', now 'abd'\n  - train.seed: checkpoint 1"):
        compare_fingerprints(state.fingerprints, now)
    compare_fingerprints(state.fingerprints, now, allow_change=["config_sha256", "seed"])
