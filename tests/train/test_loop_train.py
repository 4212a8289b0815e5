"""The loop end to end on a tiny Llama: it learns, touches only LoRA weights, writes metrics/state/adapter,
is deterministic; plus schedules, LoRA+ groups and evaluate()."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lorakit.train import build_optimizer, build_scheduler, evaluate, fit, lr_multiplier, read_metrics
from lorakit.train.checkpoint import trainable_parameters
from lorakit.data import iter_batches
from test_loop_support import TARGETS, base_state, config, lora_model, lora_state, quiet, toy_data


def test_loss_falls_on_a_learnable_task(tmp_path):
    """30 steps on counting sequences: the last steps' loss is well below the first steps'."""
    # lm_head is adapted too: its frozen random init (std 0.02) caps the logits' range, and with it how far the
    # loss can fall.
    model = lora_model(r=8, targets=TARGETS + ["lm_head"])
    result = fit(model, toy_data(32), config(max_steps=30, batch_size=4, lr=2e-2), tmp_path, log=quiet)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert result.step == 30 and len(result.losses) == 30
    assert last < 0.8 * first, (first, last)


def _step_lengths(tmp_path, data, **overrides) -> list[list[int]]:
    """The lengths of the examples each optimizer step trained on (a forward pre-hook reads the attention mask)."""
    model, seen = lora_model(), []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["attention_mask"].sum(1).tolist()), with_kwargs=True)
    cfg = config(max_steps=12, lr=1e-3, loss_chunk_tokens=None, **overrides)
    fit(model, data, cfg, tmp_path / "x".join(map(str, overrides.values())), log=quiet)
    per_step = cfg.grad_accum
    return [sum(seen[k:k + per_step], []) for k in range(0, len(seen), per_step)]


def test_each_step_trains_on_a_random_sample_not_a_length_group(tmp_path):
    """Steps of similar-length examples (length-grouped batches) trained worse than random batches in
    bench/quality.py: each step's examples must spread over the lengths like a random sample. With grad_accum 2
    the step is a random sample too; only its 2 micro-batches split it by length."""
    data = toy_data(96, lengths=tuple(range(4, 40, 3)), seed=2)

    def spread(steps):
        return sum(max(s) - min(s) for s in steps) / len(steps)

    one = _step_lengths(tmp_path, data, batch_size=8, grad_accum=1)
    two = _step_lengths(tmp_path, data, batch_size=4, grad_accum=2)
    assert spread(one) > 20 and spread(two) > 20, (spread(one), spread(two))  # lengths 4..37; grouped: ~3
    assert max(one[0]) == max(two[0]) == 37  # the longest example still comes first


def test_only_lora_weights_change_and_base_stays_bit_identical(tmp_path):
    model = lora_model()
    base_before, lora_before = base_state(model), lora_state(model)
    fit(model, toy_data(8), config(max_steps=3), tmp_path, log=quiet)
    assert all(torch.equal(base_before[n], p) for n, p in base_state(model).items())
    changed = [n for n, p in lora_state(model).items() if not torch.equal(lora_before[n], p)]
    assert len(changed) == len(lora_before)  # every A and B moved


def test_metrics_eval_rows_trainer_state_and_adapter(tmp_path):
    """metrics.jsonl: a train row per step with the required keys, eval rows at eval_every and at the end;
    trainer_state.json is valid JSON naming the best step; the adapter is in PEFT layout."""
    seen = []
    result = fit(lora_model(), toy_data(8), config(max_steps=5, eval_every=2), tmp_path,
                 eval_data=toy_data(4, seed=9), log=quiet, hooks=[lambda event, info: seen.append((event, info["step"]))])
    rows = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    for r in train:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r)
    assert [r["step"] for r in evals] == [2, 4, 5]
    assert all(math.isclose(r["eval_perplexity"], math.exp(r["eval_loss"]), rel_tol=1e-9) for r in evals)
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    best = min(evals, key=lambda r: r["eval_loss"])
    assert state["best_step"] == best["step"] == result.best_step and state["step"] == 5
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert [s for e, s in seen if e == "step"] == [1, 2, 3, 4, 5]
    assert [s for e, s in seen if e == "eval"] == [2, 4, 5]
    assert [s for e, s in seen if e == "save"] == [5]
    assert "5 steps" in result.summary


def test_same_seed_same_losses(tmp_path):
    """RELIABILITY C7: two runs with the same seed (LoRA dropout on) give bitwise equal loss sequences."""
    runs = [fit(lora_model(dropout=0.2), toy_data(8), config(max_steps=4), tmp_path / str(i), log=quiet).losses
            for i in range(2)]
    assert runs[0] == runs[1]


def test_epochs_set_the_step_count(tmp_path):
    """epochs=1.5 over 8 examples in batches of 2 with grad_accum 2: 2 steps per epoch, 3 steps."""
    result = fit(lora_model(), toy_data(8), config(max_steps=None, epochs=1.5, grad_accum=2), tmp_path, log=quiet)
    assert result.step == 3


@pytest.mark.parametrize("kind, expected", [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 0.5, 0.125]),
    ("cosine", [0.5, 1.0, 1.0, 0.5, 0.5 * (1 + math.cos(math.pi * 7 / 8))]),
])
def test_schedules_warm_up_then_decay(kind, expected):
    """warmup 2 of 10 steps: factors at steps 0, 1, 2, 6, 9."""
    f = lr_multiplier(kind, 2, 10)
    assert [f(s) for s in (0, 1, 2, 6, 9)] == pytest.approx(expected, abs=1e-12)


def test_scheduler_state_is_json_and_drives_every_group():
    model = lora_model()
    opt = build_optimizer(trainable_parameters(model), config(lr=1e-3, loraplus_lr_ratio=4.0))
    sched = build_scheduler(opt, "linear", warmup_steps=0, total_steps=4)
    opt.step()
    sched.step()
    json.dumps(sched.state_dict())
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * 0.75, 4e-3 * 0.75])


def test_loraplus_puts_b_in_its_own_group_at_ratio_times_lr():
    model = lora_model()
    params = trainable_parameters(model)
    opt = build_optimizer(params, config(lr=1e-3, loraplus_lr_ratio=16.0, weight_decay=0.01))
    ids = [{id(p) for p in g["params"]} for g in opt.param_groups]
    assert ids[1] == {id(p) for n, p in params.items() if ".lora_B." in n}
    assert ids[0] == {id(p) for n, p in params.items() if ".lora_B." not in n}
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 16e-3]
    plain = build_optimizer(params, config(lr=1e-3))
    assert len(plain.param_groups) == 1 and len(plain.param_groups[0]["params"]) == len(params)


def test_evaluate_is_token_weighted_and_restores_mode():
    """evaluate() = sum of per-token CE / supervised tokens over all batches (not a mean of batch means)."""
    model = lora_model()
    data = toy_data(5, lengths=(4, 11, 7))
    model.train()
    result = evaluate(model, iter_batches(data, 2))
    assert model.training
    total, count = 0.0, 0
    with torch.no_grad():
        model.eval()
        for e in data.examples:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
            target = torch.tensor(e.labels[1:])
            keep = target != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    assert result.tokens == count
    assert result.loss == pytest.approx(total / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
