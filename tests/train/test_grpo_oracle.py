"""lorakit's GRPO loss computes what TRL 1.16's GRPOTrainer._compute_loss computes, given the same weights and tokens.

Setup (fp32): the seeded 2-layer Llama of test_preference_oracle.py with a LoRA adapter of random non-zero A and B,
saved by lorakit and loaded into both lorakit and PEFT; fixed prompts (left-padded, of different lengths) and
completions (right-padded, of different lengths), fixed rewards in groups of G, and "old" per-token log-probs
that differ from the current ones by seeded noise, so some ratios leave the clipping range on both sides.
Compared, for each loss variant (grpo, dr_grpo, dapo; symmetric and asymmetric clipping; with and without the KL
term): the loss and every LoRA gradient within 1e-5. TRL computes the advantages in its generation step; here
lorakit's group_advantages gives them to both sides, and is checked against TRL's formula separately.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lorakit import LoraModel
from lorakit.train.logprobs import token_log_probs_of_completions
from lorakit.train.objectives.grpo_losses import group_advantages, policy_loss

from test_preference_oracle import TARGETS, adapters, base, tokenizer  # noqa: F401  (fixtures)
from test_preference_oracle import assert_same_grads, peft_model

peft = pytest.importorskip("peft")
pytest.importorskip("trl")

G = 3  # completions per prompt
MAX_COMPLETION = 7
PAD = 0


def prompts_and_completions(tokenizer):
    """Two prompts (left-padded) with G completions each (right-padded), as TRL lays them out; the rewards."""
    g = torch.Generator().manual_seed(3)
    vocab = len(tokenizer)
    prompt_lens, completion_lens = [5, 3], [7, 4, 6, 2, 7, 5]
    rows = len(completion_lens)
    prompt_ids = torch.full((rows, max(prompt_lens)), PAD)
    prompt_mask = torch.zeros_like(prompt_ids)
    completion_ids = torch.full((rows, MAX_COMPLETION), PAD)
    completion_mask = torch.zeros_like(completion_ids)
    for i in range(rows):
        n = prompt_lens[i // G]
        prompt = torch.randint(5, vocab, (n,), generator=g) if i % G == 0 else prompt_ids[i - 1, -n:]
        prompt_ids[i, -n:], prompt_mask[i, -n:] = prompt, 1
        m = completion_lens[i]
        completion_ids[i, :m], completion_mask[i, :m] = torch.randint(5, vocab, (m,), generator=g), 1
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, -1.0])
    return prompt_ids, prompt_mask, completion_ids, completion_mask, rewards


def lorakit_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """lorakit's per-token log-probs of the completion tokens (rows, MAX_COMPLETION), chunked through the head."""
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    labels = torch.cat([torch.full_like(prompt_ids, -100), completion_ids.masked_fill(completion_mask == 0, -100)], 1)
    batch = {"input_ids": input_ids, "attention_mask": torch.cat([prompt_mask, completion_mask], 1), "labels": labels}
    logps, keep = token_log_probs_of_completions(model, batch, 4)
    p = prompt_ids.shape[1]
    assert torch.equal(keep[:, p - 1:], completion_mask.bool())
    return logps[:, p - 1:]


def trl_trainer(tmp_path, model, tokenizer, **settings):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, disable_tqdm=True,
                      activation_checkpointing=False,
                      per_device_train_batch_size=2 * G, num_generations=G, max_completion_length=MAX_COMPLETION,
                      temperature=1.0, **settings)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}]),
                          processing_class=copy.deepcopy(tokenizer))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what its training loop sets: one micro-batch per step
    return trainer


@pytest.mark.parametrize("variant, settings", [
    ("grpo", {}),
    ("grpo", {"epsilon": 0.1, "epsilon_high": 0.3}),
    ("dr_grpo", {}),
    ("dapo", {"epsilon": 0.2, "epsilon_high": 0.28}),
    ("grpo", {"beta": 0.05}),
    ("dapo", {"beta": 0.1}),
    ("dr_grpo", {"beta": 0.1, "use_bias_correction_kl": False}),
], ids=["grpo", "grpo-asymmetric", "dr_grpo", "dapo", "grpo-kl", "dapo-kl", "dr_grpo-plain-kl"])
def test_policy_loss_and_gradients_match_grpo_trainer(variant, settings, tmp_path, base, adapters, tokenizer):
    prompt_ids, prompt_mask, completion_ids, completion_mask, rewards = prompts_and_completions(tokenizer)
    advantages = group_advantages(rewards, G)
    ours = LoraModel(copy.deepcopy(base), None)
    ours.load_adapter(adapters["policy"], "default", is_trainable=True)
    ours.set_adapter("default")
    ours.train()
    logps = lorakit_logps(ours, prompt_ids, prompt_mask, completion_ids, completion_mask)
    noise = torch.randn(logps.shape, generator=torch.Generator().manual_seed(4)) * 0.5
    old = (logps.detach() + noise) * completion_mask  # ratios from ~0.5 to ~2: both clipping sides are hit
    beta = settings.get("beta", 0.0)
    with torch.no_grad():  # the reference: the base with the adapter disabled
        with ours.disable_adapters():
            ref = lorakit_logps(ours, prompt_ids, prompt_mask, completion_ids, completion_mask)
    tokens = completion_mask.sum()
    out = policy_loss(logps, old, advantages, completion_mask, variant=variant, eps_low=settings.get("epsilon", 0.2),
                      eps_high=settings.get("epsilon_high"), beta=beta, ref_logps=ref if beta else None,
                      kl_bias_correction=settings.get("use_bias_correction_kl", True),
                      max_completion_len=MAX_COMPLETION, tokens=float(tokens))
    out.loss.backward()
    assert float(out.clipped_low) > 0 and float(out.clipped_high) > 0

    theirs = peft_model(base, adapters["policy"])
    trainer = trl_trainer(tmp_path, theirs, tokenizer, loss_type=variant, **settings)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old,
              "num_items_in_batch": tokens}
    if beta:
        inputs["ref_per_token_logps"] = ref
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    assert float(out.loss.detach()) == pytest.approx(float(loss.detach()), rel=1e-5, abs=1e-7)
    assert_same_grads(ours, trainer.model)


def test_group_advantages_are_trls():
    """TRL's formula (trl.trainer.utils.nanstd: Bessel-corrected), groups of G, each scale."""
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0, -1.0, 3.0, 0.25])
    grouped = rewards.view(-1, G)
    mean = grouped.mean(1).repeat_interleave(G)
    group_std = nanstd(grouped, dim=1).repeat_interleave(G)
    torch.testing.assert_close(group_advantages(rewards, G), (rewards - mean) / (group_std + 1e-4))
    torch.testing.assert_close(group_advantages(rewards, G, "batch"), (rewards - mean) / (nanstd(rewards) + 1e-4))
    torch.testing.assert_close(group_advantages(rewards, G, "none"), rewards - mean)
    assert torch.all(group_advantages(rewards, G)[G:2 * G] == 0)  # equal rewards: no signal, not 0/0
    # a completion no reward function scored (NaN) is left out of its group's statistics and gets advantage 0
    unscored = rewards.clone()
    unscored[1] = float("nan")
    grouped = unscored.view(-1, G)
    mean = torch.nanmean(grouped, 1).repeat_interleave(G)
    expected = torch.nan_to_num((unscored - mean) / (nanstd(grouped, dim=1).repeat_interleave(G) + 1e-4), nan=0.0)
    torch.testing.assert_close(group_advantages(unscored, G), expected)
    assert group_advantages(unscored, G)[1] == 0 and group_advantages(unscored, G)[0] != 0
