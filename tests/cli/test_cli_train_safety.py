"""`lorakit train` never destroys an earlier run (issue 15): the CLI side of train/output_dir.py and resume."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

from lorakit.cli import main
from test_cli_commands import model_dir, run_config  # noqa: F401 (fixtures: a tiny chat Llama and a run config)


def _files(out):
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lorakit.lock"}


def test_training_again_into_a_run_is_refused_until_resumed_or_overwritten(run_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(run_config)]) == 0
    before = _files(out)
    capsys.readouterr()
    assert main(["train", str(run_config), "--set", "train.lr=0.05"]) == 2
    err = capsys.readouterr().err
    assert "holds a previous run" in err and "--resume auto" in err and "--overwrite" in err
    assert _files(out) == before

    # a changed lr is named, and refused, on resume as well (the old fingerprint covered only the batch order)
    assert main(["train", str(run_config), "--resume", "--set", "train.lr=0.05", "--set", "train.max_steps=12"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: checkpoint 0.005, now 0.05" in err and "--allow-change train.lr" in err
    assert _files(out) == before

    # a changed LoRA shape stops the run, naming the field, instead of starting over
    assert main(["train", str(run_config), "--resume", "auto", "--set", "lora.r=8"]) == 2
    err = capsys.readouterr().err
    assert "lora.r: checkpoint 4, now 8" in err and "hint: resume with the checkpoint's settings" in err
    assert _files(out) == before

    # bare --resume means auto, before or after the config; extending max_steps is not a change to refuse
    assert main(["train", "--set", "train.max_steps=10", "--resume", str(run_config)]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert main(["train", str(run_config), "--resume", "--set", "train.max_steps=12"]) == 0
    assert "resumed from" in capsys.readouterr().out

    assert main(["train", str(run_config), "--overwrite", "--set", "train.max_steps=2"]) == 0
    assert "overwrite: deleting the previous run's" in capsys.readouterr().out
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 2


def test_an_unwritable_output_dir_is_one_line_before_the_model_loads(run_config, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for bad in (a_file, "/proc/lorakit-run"):
        assert main(["train", str(run_config), "--set", f"output_dir={bad}"]) == 2
        out, err = capsys.readouterr()
        assert err.startswith("error: invalid output_dir:") and "Traceback" not in err
        assert "trainable params" not in out  # refused before the model was loaded and wrapped


def test_sigterm_saves_a_checkpoint_like_ctrl_c(run_config, tmp_path):
    """What schedulers, `docker stop` and `kill` send: before, the run died (143) without a checkpoint."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "lorakit", "train", str(run_config), "--set", "train.max_steps=100000",
               "--set", "train.save_every=100000", "--set", "train.eval_every=null"]
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        for line in child.stdout:
            if line.startswith("step 3/") or time.monotonic() > deadline:
                break
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 143, err
    assert "terminated (SIGTERM) at step" in out and "saved checkpoint" in out
    checkpoints = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints and checkpoints[-1].name.startswith("step-")
    assert main(["train", str(run_config), "--resume", "--set", f"train.max_steps={int(checkpoints[-1].name[5:]) + 2}",
                 "--set", "train.save_every=100000", "--set", "train.eval_every=null"]) == 0
