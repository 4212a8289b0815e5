"""Exact resume (RELIABILITY.md A1/A2): a run SIGKILLed mid-way and resumed with resume="auto" logs the same
per-step losses and ends with the same adapter tensors as an uninterrupted run; so does a Ctrl-C'd run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.train import fit, list_checkpoints, read_metrics
from test_loop_support import config, lora_model, quiet, toy_data
from tiny_models import randomize_lora

HERE = Path(__file__).resolve().parent
# 12 examples in batches of 2 with grad_accum 2: 3 steps per epoch, so 10 steps cross three epoch boundaries and
# the step-4 checkpoint sits mid-epoch (epoch 1, batch 2 of 6). LoRA dropout makes the RNG state matter.
SETUP = dict(n=12, steps=10, batch_size=2, grad_accum=2)

CHILD = """
import os, sys, torch
torch.set_num_threads(1)
from lorakit.train import fit
from test_loop_support import config, lora_model, quiet, toy_data
def die(event, info):
    if event == "step" and info["step"] == 6:
        os._exit(137)  # as abrupt as SIGKILL: no cleanup, no final save
fit(lora_model(dropout=0.1), toy_data(12), config(max_steps=10, batch_size=2, grad_accum=2, save_every=4,
    lr_schedule="cosine", warmup_steps=2), sys.argv[1], log=quiet, hooks=[die])
"""


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order: reruns are bitwise equal
    yield
    torch.set_num_threads(before)


def _cfg(**kw):
    return config(max_steps=10, batch_size=2, grad_accum=2, lr_schedule="cosine", warmup_steps=2, **kw)


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def _assert_same_run(a: Path, b: Path) -> None:
    assert _losses(a) == _losses(b) and len(_losses(a)) == 10
    ta, tb = load_file(a / "adapter" / "adapter_model.safetensors"), load_file(b / "adapter" / "adapter_model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.filterwarnings("ignore:.*taking over a stale lock left by pid:UserWarning")  # what the killed run left
def test_killed_run_resumes_exactly(tmp_path, one_thread):
    ref = tmp_path / "ref"
    fit(lora_model(dropout=0.1), toy_data(12), _cfg(), ref, log=quiet)

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, "-c", CHILD, str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode == 137, child.stderr[-2000:]
    assert [p.name for p in list_checkpoints(out)] == ["step-00000004"]
    assert [s for s, _ in _losses(out)] == [1, 2, 3, 4, 5, 6]  # the killed run logged past its checkpoint

    fresh = lora_model(dropout=0.1)
    randomize_lora(fresh, seed=7)  # other adapter values: the checkpoint must overwrite them
    result = fit(fresh, toy_data(12), _cfg(save_every=4), out, log=quiet, resume="auto")
    assert result.resumed_from == 4 and result.step == 10
    _assert_same_run(ref, out)


def test_keyboard_interrupt_saves_the_current_step_and_resumes(tmp_path, one_thread):
    ref = tmp_path / "ref"
    fit(lora_model(dropout=0.1), toy_data(12), _cfg(), ref, log=quiet)

    out = tmp_path / "interrupted"

    def interrupt(event, info):
        if event == "step" and info["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(lora_model(dropout=0.1), toy_data(12), _cfg(), out, log=quiet, hooks=[interrupt])
    assert [p.name for p in list_checkpoints(out)] == ["step-00000005"]
    result = fit(lora_model(dropout=0.1), toy_data(12), _cfg(resume="auto"), out, log=quiet)
    assert result.resumed_from == 5
    _assert_same_run(ref, out)


def test_resume_refuses_a_changed_batch_size(tmp_path):
    from lorakit.errors import CheckpointError

    fit(lora_model(), toy_data(8), config(max_steps=2), tmp_path, log=quiet)
    with pytest.raises(CheckpointError, match="batch_size"):
        fit(lora_model(), toy_data(8), config(max_steps=4, batch_size=4), tmp_path, log=quiet, resume="auto")
