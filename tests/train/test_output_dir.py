"""No run destroys an earlier one: the output directory is claimed, resumed, or explicitly overwritten.

Each test trains a tiny model with `fit` and then tries what destroyed runs before (issue 15): training again
into the same directory, resuming after a config change, resuming with changed settings, rotation failures.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import warnings
from pathlib import Path

import pytest

from lorakit.errors import CheckpointError, ConfigError
from lorakit.train import fit, list_checkpoints, save_checkpoint, checkpoint_lock
from lorakit.train.fingerprint import run_settings
from lorakit.train.output_dir import RUN_FILE, check_output_dir, inspect_output_dir
from lorakit.train.restore import CheckpointMismatch
from ckpt_support import linear_setup
from test_loop_support import config, lora_model, quiet, toy_data


def _snapshot(out: Path) -> dict[str, str]:
    """Every file under `out` (the lock file aside) with its sha256: what must survive a refused run."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lorakit.lock"}


@pytest.fixture
def finished_run(tmp_path):
    out = tmp_path / "run"
    fit(lora_model(), toy_data(8), config(max_steps=4, save_every=2), out, log=quiet)
    return out


def test_a_second_run_into_a_finished_run_is_refused_and_changes_nothing(finished_run):
    before = _snapshot(finished_run)
    assert {"adapter/adapter_model.safetensors", "metrics.jsonl", RUN_FILE} <= set(before)
    with pytest.raises(ConfigError, match=r"holds a previous run .*to continue it: --resume auto.*--overwrite"):
        fit(lora_model(seed=1), toy_data(8), config(max_steps=2), finished_run, log=quiet)
    assert _snapshot(finished_run) == before


def test_overwrite_deletes_only_lorakits_outputs(finished_run):
    (finished_run / "notes.txt").write_text("mine")
    (finished_run / "data").mkdir()
    (finished_run / "data" / "train.jsonl").write_text("{}\n")
    lines = []
    fit(lora_model(seed=1), toy_data(8), config(max_steps=2), finished_run, log=lines.append, overwrite=True)
    assert (finished_run / "notes.txt").read_text() == "mine"
    assert (finished_run / "data" / "train.jsonl").read_text() == "{}\n"
    assert [p.name for p in list_checkpoints(finished_run)] == ["step-00000002"]  # the old step 4 is gone
    assert len((finished_run / "metrics.jsonl").read_text().splitlines()) == 2
    assert any("overwrite: deleting the previous run's" in line for line in lines)


def test_a_directory_of_foreign_files_is_refused_unless_overwrite_and_then_left_alone(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "paper.tex").write_text("draft")
    with pytest.raises(ConfigError, match=r"not empty \(paper.tex\)") as refused:
        fit(lora_model(), toy_data(8), config(max_steps=1), out, log=quiet)
    assert "--overwrite" in refused.value.hint
    fit(lora_model(), toy_data(8), config(max_steps=1), out, log=quiet, overwrite=True)
    assert (out / "paper.tex").read_text() == "draft" and (out / "adapter").is_dir()


def test_foreign_files_with_lorakits_names_are_refused_even_with_overwrite(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.jsonl").write_text("my own metrics\n")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=r"holds metrics.jsonl, which lorakit did not write"):
            fit(lora_model(), toy_data(8), config(max_steps=1), out, log=quiet, overwrite=overwrite)
    assert (out / "metrics.jsonl").read_text() == "my own metrics\n"


def test_overwrite_and_resume_together_are_refused(finished_run):
    with pytest.raises(ConfigError, match="choose one"):
        fit(lora_model(), toy_data(8), config(max_steps=2), finished_run, log=quiet, overwrite=True, resume="auto")


def test_resume_auto_into_an_empty_directory_starts_fresh(tmp_path):
    lines = []
    result = fit(lora_model(), toy_data(8), config(max_steps=1), tmp_path / "new", log=lines.append, resume="auto")
    assert result.resumed_from is None and any("starting from step 0" in line for line in lines)


def test_a_checkpoint_of_another_lora_shape_stops_the_run_instead_of_starting_over(finished_run):
    """Before: every checkpoint was 'cannot resume', then 'no checkpoint; starting from step 0', and the run's
    checkpoints and adapter were overwritten and rotated away."""
    before = _snapshot(finished_run)
    with pytest.raises(CheckpointMismatch, match=r"is torch.float32 \[4, 32\], the parameter is torch.float32 \[8, 32\]"):
        fit(lora_model(r=8), toy_data(8), config(max_steps=6), finished_run, log=quiet, resume="auto")
    assert _snapshot(finished_run) == before


def test_resume_names_every_changed_setting_and_refuses(finished_run):
    before = _snapshot(finished_run)
    with pytest.raises(CheckpointMismatch) as refused:
        fit(lora_model(), toy_data(8), config(max_steps=6, save_every=2, lr=0.05, weight_decay=0.1), finished_run,
            log=quiet, resume="auto")
    message = str(refused.value)
    assert "train.lr: checkpoint 0.01, now 0.05" in message and "train.weight_decay: checkpoint 0.0, now 0.1" in message
    assert "--allow-change train.lr --allow-change train.weight_decay" in message
    assert "max_steps" not in message  # extending a run is not a change to refuse
    assert _snapshot(finished_run) == before


def test_an_accepted_change_resumes_and_is_logged(finished_run):
    lines = []
    result = fit(lora_model(), toy_data(8), config(max_steps=6, save_every=2, lr=0.05), finished_run,
                 log=lines.append, resume="auto", allow_change=["train.lr"])
    assert result.resumed_from == 4 and result.step == 6
    assert any("changed setting: train.lr: checkpoint 0.01, now 0.05" in line for line in lines)
    assert any("changed setting: train.max_steps: checkpoint 4, now 6" in line for line in lines)


def test_a_changed_run_config_section_is_named(finished_run, tmp_path):
    """The run config's other sections (model, lora, data, ...) are recorded too: a resume that changes them
    says which field changed, before any tensor is compared."""
    from lorakit.config import run_config_from_dict

    raw = {"model": {"name_or_path": "tiny"}, "data": {"train": "t.jsonl"}, "output_dir": str(finished_run)}
    out = tmp_path / "run2"
    fit(lora_model(), toy_data(8), config(max_steps=2), out, log=quiet, settings=run_settings(run_config_from_dict(raw)))
    changed = run_config_from_dict({**raw, "data": {"train": "moved/t.jsonl", "max_seq_len": 64}})
    with pytest.raises(CheckpointMismatch, match=r"data.max_seq_len: checkpoint 2048, now 64") as refused:
        fit(lora_model(), toy_data(8), config(max_steps=4), out, log=quiet, resume="auto",
            settings=run_settings(changed))
    assert "data.train" not in str(refused.value)  # a moved file with the same examples is the same data


def test_when_every_checkpoint_is_corrupt_resume_stops(finished_run):
    before_count = len(list_checkpoints(finished_run))
    for path in list_checkpoints(finished_run):
        (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"none of the 2 checkpoints .* is intact"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit(lora_model(), toy_data(8), config(max_steps=6), finished_run, log=quiet, resume="auto")
    assert len(list_checkpoints(finished_run)) == before_count


def test_resume_auto_in_a_run_without_checkpoints_is_refused(finished_run):
    import shutil

    shutil.rmtree(finished_run / "checkpoints")
    with pytest.raises(ConfigError, match="no checkpoint to continue it from"):
        fit(lora_model(), toy_data(8), config(max_steps=6), finished_run, log=quiet, resume="auto")
    assert (finished_run / "adapter").is_dir()


def test_an_output_dir_that_cannot_be_written_is_refused_by_name(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        check_output_dir(a_file, resume="never", overwrite=False)
    with pytest.raises(ConfigError, match="cannot write to"):
        check_output_dir(a_file / "below", resume="never", overwrite=False)
    with pytest.raises(ConfigError, match="cannot write to"):
        check_output_dir("/proc/lorakit-run", resume="never", overwrite=False)


def test_a_directory_another_rank_is_probing_is_not_mistaken_for_a_file(tmp_path):
    """Before: under torchrun, rank 0's write probe makes and removes a new output_dir while rank 1 looks at it;
    exists() then is_dir() saw it vanish between the two calls and refused the run ("exists and is not a
    directory", a CI failure)."""
    target, stop = tmp_path / "run", threading.Event()

    def probe_forever():
        while not stop.is_set():
            target.mkdir()
            target.rmdir()

    prober = threading.Thread(target=probe_forever)
    prober.start()
    try:
        for _ in range(20000):
            assert inspect_output_dir(target).own == ()
    finally:
        stop.set()
        prober.join()


def test_a_checkpoint_that_cannot_be_rotated_away_only_warns(tmp_path, monkeypatch):
    """Before: an OSError while deleting an old checkpoint aborted training, although the new one was saved."""
    _, params, optimizer = linear_setup()
    real_rename = os.rename

    def refuse_deletes(src, dst):
        if ".tmp-delete-" in str(dst):
            raise PermissionError(13, "Permission denied", str(src))
        return real_rename(src, dst)

    with checkpoint_lock(tmp_path):
        for step in (1, 2):
            save_checkpoint(tmp_path, step, params, optimizer, keep_last=1)
        monkeypatch.setattr(os, "rename", refuse_deletes)
        with pytest.warns(UserWarning, match="could not delete old checkpoint .*step-00000002.*keeping it"):
            path = save_checkpoint(tmp_path, 3, params, optimizer, keep_last=1)
    assert path.name == "step-00000003"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]


# ---- resuming a named checkpoint ----------------------------------------------------------------------
def test_resuming_an_older_checkpoint_of_the_run_is_refused(finished_run):
    """Resuming step 2 while step 4 exists would rotate step 4 away and rewrite metrics and adapter."""
    before = _snapshot(finished_run)
    older = list_checkpoints(finished_run)[0]
    with pytest.raises(ConfigError, match="older than this run's newest checkpoint step-00000004") as refused:
        fit(lora_model(), toy_data(8), config(max_steps=6), finished_run, log=quiet, resume=str(older))
    assert "resume it into a new output_dir" in refused.value.hint
    assert _snapshot(finished_run) == before


def test_another_runs_checkpoint_is_not_resumed_over_a_run(finished_run, tmp_path):
    other = tmp_path / "other"
    fit(lora_model(), toy_data(8), config(max_steps=2), other, log=quiet)
    before = _snapshot(finished_run)
    with pytest.raises(ConfigError, match="holds another run .* would write over it"):
        fit(lora_model(), toy_data(8), config(max_steps=6), finished_run, log=quiet,
            resume=str(list_checkpoints(other)[-1]))
    assert _snapshot(finished_run) == before


def test_a_named_checkpoint_resumes_its_own_run_or_into_a_new_directory(finished_run, tmp_path):
    newest = list_checkpoints(finished_run)[-1]
    elsewhere = fit(lora_model(), toy_data(8), config(max_steps=5), tmp_path / "branch", log=quiet, resume=str(newest))
    assert elsewhere.resumed_from == 4 and len(list_checkpoints(finished_run)) == 2  # the original is untouched
    here = fit(lora_model(), toy_data(8), config(max_steps=5), finished_run, log=quiet, resume=str(newest))
    assert here.resumed_from == 4


def test_a_run_killed_before_it_saved_anything_starts_again(tmp_path):
    """A run that only wrote its marker and some metrics (killed, out of memory) holds nothing to lose: a
    scheduler that requeues it (resume: auto, or not) must not find it refused forever."""
    for resume in ("auto", "never"):
        out = tmp_path / resume
        out.mkdir()
        (out / RUN_FILE).write_text("{}\n")
        (out / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
        lines = []
        fit(lora_model(), toy_data(8), config(max_steps=1), out, log=lines.append, resume=resume)
        assert any("the previous start saved nothing" in line for line in lines)
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # this run's step 1 only


# ---- what a resume compares --------------------------------------------------------------------------
def _settings(**lora):
    from lorakit.config import run_config_from_dict

    raw = {"model": {"name_or_path": "tiny"}, "data": {"train": "t.jsonl"},
           "lora": {"r": 4, "target_modules": ["q_proj"], **lora}}
    return run_settings(run_config_from_dict(raw))


@pytest.mark.parametrize("before, after, named", [
    ({}, {"alpha_pattern": {"q_proj": 64}}, "lora.alpha_pattern"),         # {} was one key, {q_proj: 64} another
    ({"alpha_pattern": {"q_proj": 64}}, {"alpha_pattern": {"k_proj": 64}}, "lora.alpha_pattern.k_proj"),
    ({}, {"rank_pattern": {"q_proj": 8}}, "lora.rank_pattern"),
])
def test_a_setting_that_appears_or_disappears_is_a_change(tmp_path, before, after, named):
    out = tmp_path / "run"
    fit(lora_model(), toy_data(8), config(max_steps=2), out, log=quiet, settings=_settings(**before))
    with pytest.raises(CheckpointMismatch, match=re.escape(named)):
        fit(lora_model(), toy_data(8), config(max_steps=4), out, log=quiet, resume="auto", settings=_settings(**after))


def test_settings_that_compute_the_same_numbers_may_change(finished_run):
    """What a resume after running out of memory changes: checkpointing, the loss's chunk size."""
    result = fit(lora_model(), toy_data(8), config(max_steps=6, save_every=2, gradient_checkpointing=True,
                                                   loss_chunk_tokens=3), finished_run, log=quiet, resume="auto")
    assert result.resumed_from == 4


def test_each_tasks_own_lora_settings_are_recorded():
    from lorakit.config import run_config_from_dict

    raw = {"model": {"name_or_path": "tiny"}, "data": {},
           "tasks": [{"name": "sql", "train": "s.jsonl", "lora": {"r": 8, "lora_alpha": 16}},
                     {"name": "chat", "train": "c.jsonl"}]}
    settings = run_settings(run_config_from_dict(raw))
    assert settings["tasks.sql.lora.r"] == 8 and settings["tasks.sql.lora.lora_alpha"] == 16


def test_a_second_sigterm_during_the_interrupt_save_does_not_lose_the_checkpoint(tmp_path, monkeypatch):
    """Schedulers and torchrun may each send SIGTERM: the second arrives while the first one's save runs."""
    import signal

    import lorakit.train.state as state_module
    from lorakit.signals import Terminated

    real_save, calls = state_module.save_checkpoint, []

    def save_then_signal(*args, **kwargs):
        calls.append(kwargs.get("trainer_state", {}).get("step"))
        if len(calls) == 1:  # the first save is the interrupted one (no save_every): signal in its middle
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(*args, **kwargs)

    def hook(event, info):
        if event == "step" and info["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(state_module, "save_checkpoint", save_then_signal)
    with pytest.raises(Terminated):
        fit(lora_model(), toy_data(8), config(max_steps=50), tmp_path / "run", log=quiet, hooks=[hook])
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000002"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_a_checkpoint_from_before_the_random_step_order_is_not_resumed_silently():
    """Checkpoints written before 2026-12 trained on length-grouped steps; resuming one today would go on in
    another batch order, so the resume names that (and --allow-change data.batch_order accepts it)."""
    from lorakit.train.fingerprint import run_fingerprints
    from lorakit.train.objectives import LanguageModeling
    from lorakit.train.restore import compare_fingerprints

    current = run_fingerprints(LanguageModeling(toy_data(8), config()).fingerprint(), config())
    legacy = {"data_sha256": current["data.sha256"], "examples": 8, "packing": False, "batch_size": 2,
              "grad_accum": 1, "seed": 0}
    with pytest.raises(CheckpointMismatch, match="data.batch_order: checkpoint 'length-grouped steps"):
        compare_fingerprints(legacy, current)
    assert compare_fingerprints(legacy, current, allow_change=["data.batch_order"])
