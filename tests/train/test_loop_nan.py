"""NaN/inf policy (RELIABILITY.md section 4, rows C1-C3, C6): stop, skip, give up after 3 in a row."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import TrainingError
from lorakit.train import list_checkpoints, loop, read_metrics
from lorakit.train.objectives import sft
from test_loop_support import config, lora_model, lora_state, quiet, toy_data


def _nan_at(monkeypatch, steps: set[int]) -> None:
    """Make the loss NaN at the given (1-based) steps; with grad_accum 1 each step calls the loss once."""
    calls = {"n": 0}
    original = sft.lm_loss_sum

    def loss(*args, **kwargs):
        calls["n"] += 1
        value, count = original(*args, **kwargs)
        return (value * math.nan if calls["n"] in steps else value), count

    monkeypatch.setattr(sft, "lm_loss_sum", loss)


def test_stop_raises_naming_the_step_and_keeps_only_finite_checkpoints(tmp_path, monkeypatch):
    _nan_at(monkeypatch, {4})
    with pytest.raises(TrainingError, match=r"step 4.*last good checkpoint \(step 2\) is kept") as err:
        loop.fit(lora_model(), toy_data(8), config(max_steps=8, save_every=2), tmp_path, log=quiet)
    assert err.value.step == 4
    saved = list_checkpoints(tmp_path)
    assert [p.name for p in saved] == ["step-00000002"]
    for path in saved:
        assert all(torch.isfinite(t).all() for t in load_file(path / "model.safetensors").values())
    assert not (tmp_path / "adapter").exists()


def test_skip_leaves_params_and_schedule_untouched_and_continues(tmp_path, monkeypatch):
    _nan_at(monkeypatch, {3})
    model = lora_model()
    snapshots = {}
    hook = lambda event, info: snapshots.__setitem__(info["step"], lora_state(model)) if event == "step" else None
    result = loop.fit(model, toy_data(8), config(max_steps=6, nan_policy="skip", lr_schedule="linear"), tmp_path,
                      log=quiet, hooks=[hook])
    assert result.step == 6 and result.skipped_steps == 1
    assert all(torch.equal(snapshots[2][n], snapshots[3][n]) for n in snapshots[2])  # step 3 changed nothing
    assert not all(torch.equal(snapshots[3][n], snapshots[4][n]) for n in snapshots[3])  # step 4 did
    rows = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r}
    assert rows[3]["skipped"] is True and rows[3]["loss"] is None
    assert rows[4]["lr"] == rows[3]["lr"]  # the scheduler did not advance on the skipped step
    assert rows[5]["lr"] < rows[4]["lr"]


def test_three_consecutive_skips_stop(tmp_path, monkeypatch):
    _nan_at(monkeypatch, {3, 4, 5})
    with pytest.raises(TrainingError, match="step 5: 3 consecutive"):
        loop.fit(lora_model(), toy_data(8), config(max_steps=8, nan_policy="skip", save_every=2), tmp_path, log=quiet)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000004"]


def test_inf_gradient_with_finite_loss_is_skipped(tmp_path):
    """C3: the grad-norm check catches an inf gradient even though the loss is finite."""
    model = lora_model()
    calls = {"n": 0}
    name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)

    def poison(grad):
        calls["n"] += 1
        return grad * math.inf if calls["n"] == 2 else grad

    param.register_hook(poison)
    result = loop.fit(model, toy_data(8), config(max_steps=4, nan_policy="skip"), tmp_path, log=quiet)
    assert result.skipped_steps == 1 and all(math.isfinite(x) for x in result.losses)
    assert torch.isfinite(param).all()


def test_window_without_supervised_tokens_is_skipped_not_nan(tmp_path):
    """C6: a prompt-only batch is detected before the loss (no 0/0) and skipped."""
    data = toy_data(4, lengths=(8,))
    data.examples[0] = type(data.examples[0])(input_ids=data.examples[0].input_ids, labels=[-100] * 8, source="x")
    data.examples[1] = type(data.examples[1])(input_ids=data.examples[1].input_ids, labels=[-100] * 8, source="y")
    result = loop.fit(lora_model(), data, config(max_steps=3, batch_size=1), tmp_path, log=quiet)
    assert all(math.isfinite(x) for x in result.losses) and result.skipped_steps == 0
