"""The loop's seam: a way of training is an Objective, and fit trains whatever the objective defines (its
batches, normaliser, loss and metrics) with no change to the loop; recipes are chosen by the config's name."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lorakit.config import load_run_config
from lorakit.errors import ConfigError
from lorakit.recipes import RECIPES, run_recipe
from lorakit.train import fit
from lorakit.train.evaluate import model_device, model_inputs
from lorakit.train.objectives import BatchLoss, LanguageModeling, WindowMetrics
from lorakit.train.objectives.base import batch_tokens
from test_loop_support import config, lora_model, quiet, toy_data


def _row_means(model, batch) -> torch.Tensor:
    """Each row's mean cross-entropy over its supervised tokens. (rows,)"""
    logits = model(**model_inputs(batch, model_device(model))).logits[:, :-1]  # (rows, seq - 1, vocab)
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")  # (rows, seq - 1)
    return losses.sum(1) / (labels != -100).sum(1)


class RowMean(LanguageModeling):
    """A toy objective defined outside lorakit: every row weighs the same, however long (a per-sequence mean)."""

    def normaliser(self, window):
        return {"rows": sum(batch["input_ids"].shape[0] for batch in window)}

    def loss(self, model, batch, normaliser, *, compiled=False):
        total = _row_means(model, batch).sum()
        return BatchLoss(total / normaliser["rows"], {"loss": float(total.detach()), "tokens": batch_tokens(batch)})

    def window_metrics(self, sums, normaliser):
        return WindowMetrics(loss=sums["loss"] / normaliser["rows"], tokens=int(sums["tokens"]))


def test_fit_trains_the_objective_it_is_given(tmp_path):
    """The first step's loss is the objective's (mean over the window's rows, not over its tokens), and a second
    run with the same objective repeats it exactly: the loop adds nothing of its own."""
    data, cfg = toy_data(8, lengths=(6, 12)), config(max_steps=2, batch_size=2, grad_accum=2)
    model = lora_model()
    before = copy.deepcopy(model)
    objective = RowMean(data, cfg)
    window = list(objective.batches(0, 0, group=2))[:2]
    with torch.no_grad():
        expected = float(torch.cat([_row_means(before, b) for b in window]).mean())
        tokens_mean = (sum(float(F.cross_entropy(before(**model_inputs(b, torch.device("cpu"))).logits[:, :-1]
                                                 .transpose(1, 2), b["labels"][:, 1:], ignore_index=-100,
                                                 reduction="sum")) for b in window)
                       / sum(int((b["labels"][:, 1:] != -100).sum()) for b in window))
    assert abs(expected - tokens_mean) > 1e-3  # the two normalisers differ on this data, so the test can tell

    result = fit(model, objective, cfg, tmp_path / "a", log=quiet)
    assert result.losses[0] == pytest.approx(expected, rel=1e-5)
    again = fit(before, RowMean(data, cfg), cfg, tmp_path / "b", log=quiet)
    assert again.losses == result.losses


def test_a_recipe_is_chosen_by_the_objective_name(tmp_path):
    assert RECIPES["sft"].__module__ == "lorakit.recipes.sft"
    path = tmp_path / "run.yaml"
    assert RECIPES["dpo"].__module__ == "lorakit.recipes.preference"
    assert RECIPES["grpo"].__module__ == "lorakit.recipes.grpo"
    path.write_text("objective: ppo\nmodel: {name_or_path: ./no-model}\ndata: {train: train.jsonl}\n")
    with pytest.raises(ConfigError, match="objective: 'ppo' is not one of sft, dpo, orpo, kto, grpo"):  # before loading
        run_recipe(load_run_config(path))
