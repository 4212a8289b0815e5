"""A GRPO rollout: G completions per prompt from the engine, laid out as the loss takes them, scored, with
group-relative advantages; the sampler's log-probs are the training forward's; a step's draws repeat exactly."""

from __future__ import annotations

import torch

from engine_support import build_lora, build_tok, prompts
from lorakit.infer import Engine, SamplingParams
from lorakit.train.logprobs import token_log_probs_of_completions
from lorakit.train.objectives.grpo_losses import group_advantages, policy_loss
from lorakit.train.rewards import RewardSet
from lorakit.train.rollout import PromptRecord, roll_out

G = 3


def records(n: int = 2) -> list[PromptRecord]:
    return [PromptRecord(ids, f"prompt {i}", {"answer": str(i)}, f"prompts.jsonl:{i + 1}")
            for i, ids in enumerate(prompts(n, seed=9))]


def by_length(prompt, completion, record):
    return float(len(completion) % 5)  # varied rewards within a group


def training_logps(model, batch) -> torch.Tensor:
    """The training forward's per-token log-probs of the completion tokens, in the rollout's layout."""
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
    mask = torch.cat([batch.prompt_mask, batch.completion_mask], 1)
    labels = torch.cat([torch.full_like(batch.prompt_ids, -100),
                        batch.completion_ids.masked_fill(batch.completion_mask == 0, -100)], 1)
    logps, _ = token_log_probs_of_completions(model, {"input_ids": input_ids, "attention_mask": mask,
                                                      "labels": labels}, 4, adapter="a")
    return logps[:, batch.prompt_ids.shape[1] - 1:]


def test_a_rollout_is_laid_out_scored_and_on_policy():
    lora, tok = build_lora(), build_tok()
    params = SamplingParams(max_tokens=6, temperature=1.0)
    with Engine(lora, tok) as engine:
        batch = roll_out(engine, records(), "a", G, params, RewardSet([("len", by_length, 1.0)]), step_seed=11,
                         pad_id=0)
        again = roll_out(engine, records(), "a", G, params, RewardSet([("len", by_length, 1.0)]), step_seed=11,
                         pad_id=0)
        other = roll_out(engine, records(), "a", G, params, RewardSet([("len", by_length, 1.0)]), step_seed=12,
                         pad_id=0)
    assert batch.prompt_ids.shape[0] == 2 * G and batch.completion_mask.sum() > 0
    for g in range(2):  # a prompt's G completions are consecutive rows, and they differ from each other
        rows = batch.prompt_ids[g * G:(g + 1) * G]
        assert all(torch.equal(rows[0], r) for r in rows)
        assert len({tuple(c.tolist()) for c in batch.completion_ids[g * G:(g + 1) * G]}) > 1
    assert torch.equal(batch.completion_ids, again.completion_ids)  # the same step draws the same completions
    assert not torch.equal(batch.completion_ids, other.completion_ids)
    assert torch.equal(batch.rewards, torch.tensor([float(len(c) % 5) for c in batch.completions]))
    torch.testing.assert_close(batch.advantages, group_advantages(batch.rewards, G))
    with torch.no_grad():
        fresh = training_logps(lora, batch)
    torch.testing.assert_close(batch.old_logps, fresh * batch.completion_mask, rtol=0, atol=1e-5)

    # on-policy: the ratio is 1, so the grpo loss is minus the mean advantage, and its gradient reaches adapter a
    for name, p in lora.named_parameters():
        p.requires_grad_(name.endswith((".lora_A.a", ".lora_B.a")))
    out = policy_loss(training_logps(lora, batch), batch.old_logps, batch.advantages, batch.completion_mask)
    out.loss.backward()
    assert abs(float(out.loss.detach()) + float(batch.advantages.mean())) < 1e-5
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.parameters() if p.requires_grad)


def test_a_failing_reward_is_reported_and_its_completion_gets_no_advantage():
    lora, tok = build_lora(), build_tok()

    def picky(prompt, completion, record):
        if record["answer"] == "1":
            raise RuntimeError("cannot judge this one")
        return float(len(completion))

    with Engine(lora, tok) as engine:
        batch = roll_out(engine, records(), "a", G, SamplingParams(max_tokens=5, temperature=1.0),
                         RewardSet([("picky", picky, 1.0)]), step_seed=3, pad_id=0)
    assert len(batch.errors) == G and {e.location for e in batch.errors} == {"prompts.jsonl:2"}
    assert "RuntimeError: cannot judge this one" in batch.errors[0].line()
    assert torch.isnan(batch.rewards[G:]).all() and torch.all(batch.advantages[G:] == 0)
