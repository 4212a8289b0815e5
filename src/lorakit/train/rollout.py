"""One GRPO rollout: G completions per prompt from lorakit's engine, on the weights being trained, scored by the
reward functions, laid out as the tensors grpo_losses.policy_loss takes.

The engine generates with the very model object the trainer updates (the adapter being trained, routed per row),
so there is no weight copy and no sync after a step. Every completion has its own seed, derived from the step's
seed, the prompt's index and the completion's index: the same step draws the same completions when it is run again
(exact resume), and continuous batching cannot change a draw (each request has its own random stream).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..data.prompts import PromptRecord
from ..infer import Engine, SamplingParams
from .objectives.grpo_losses import group_advantages
from .rewards import RewardError, RewardSet


@dataclass
class RolloutBatch:
    prompt_ids: torch.Tensor  # (B, P) left-padded, B = prompts x G, a prompt's G completions consecutive
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, C) right-padded
    completion_mask: torch.Tensor  # (B, C)
    old_logps: torch.Tensor  # (B, C) the sampler's log-probs of the completion tokens, 0 on padding
    rewards: torch.Tensor  # (B,) weighted sum of the reward functions (NaN where all failed)
    advantages: torch.Tensor  # (B,) group-relative; 0 where the reward is NaN
    completions: list[str]
    finish_reasons: list[str]  # "stop" (EOS), "length" (cut at max_tokens), per completion
    per_function: dict[str, list[float]]
    errors: list[RewardError] = field(default_factory=list)


def completion_seed(step_seed: int, prompt_index: int, completion_index: int, group_size: int) -> int:
    return (step_seed * 1_000_003 + prompt_index * group_size + completion_index) % (2 ** 63)


def roll_out(engine: Engine, prompts: Sequence[PromptRecord], adapter: str | None, group_size: int,
             params: SamplingParams, rewards: RewardSet, *, step_seed: int, pad_id: int,
             scale_rewards: str = "group") -> RolloutBatch:
    """Sample `group_size` completions of each prompt at once (the engine batches them), score and lay them out."""
    # Submitted at once: a prompt's group is admitted together and its prompt prefilled once
    handles = engine.submit_many([
        (prompt.ids, adapter, dataclasses.replace(params, seed=completion_seed(step_seed, i, j, group_size)))
        for i, prompt in enumerate(prompts) for j in range(group_size)])
    tokens, logps, texts, reasons = [], [], [], []
    for handle in handles:
        events = list(handle)
        tokens.append([t for e in events for t in e.token_ids])
        logps.append([x for e in events for x in e.logprobs])
        texts.append("".join(e.text for e in events))
        reasons.append(events[-1].finish_reason if events else "cancelled")
    rows = [p for p in prompts for _ in range(group_size)]
    scores = rewards.score([p.text for p in rows], texts, [p.record for p in rows], [p.location for p in rows])
    reward = torch.tensor(scores.total, dtype=torch.float32)
    advantages = group_advantages(reward, group_size, scale_rewards)  # type: ignore[arg-type]

    width_p, width_c = max(len(p.ids) for p in rows), max(max(map(len, tokens)), 1)
    prompt_ids = torch.full((len(rows), width_p), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    completion_ids = torch.full((len(rows), width_c), pad_id, dtype=torch.long)
    completion_mask = torch.zeros_like(completion_ids)
    old = torch.zeros((len(rows), width_c), dtype=torch.float32)
    for i, (p, c, lp) in enumerate(zip(rows, tokens, logps)):
        prompt_ids[i, width_p - len(p.ids):], prompt_mask[i, width_p - len(p.ids):] = torch.tensor(p.ids), 1
        if c:
            completion_ids[i, :len(c)], completion_mask[i, :len(c)] = torch.tensor(c), 1
            old[i, :len(c)] = torch.tensor(lp)
    return RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, old, reward, advantages, texts,
                        reasons, scores.per_function, scores.errors)



def training_batch(rollout: RolloutBatch) -> dict[str, torch.Tensor]:
    """The rollout as one training forward takes it: prompt then completion per row, labels on the completion
    tokens only, positions counted from each row's first prompt token (as the engine generated them)."""
    mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
    labels = torch.cat([torch.full_like(rollout.prompt_ids, -100),
                        rollout.completion_ids.masked_fill(rollout.completion_mask == 0, -100)], 1)
    return {"input_ids": torch.cat([rollout.prompt_ids, rollout.completion_ids], 1), "attention_mask": mask,
            "position_ids": (mask.cumsum(1) - 1).clamp(min=0), "labels": labels}


# ---- a rollout in a checkpoint (GRPO reuses one over num_iterations steps: a resume mid-way needs it back) ----
FINISH_REASONS = ("stop", "length", "cancelled")
_TENSOR_FIELDS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "old_logps", "rewards", "advantages")


def rollout_tensors(rollout: RolloutBatch, prefix: str) -> dict[str, torch.Tensor]:
    """The rollout as named tensors (safetensors holds only tensors): texts as UTF-8 bytes with their lengths,
    finish reasons as codes, each reward function's values under its name. Its reward errors were logged when
    it was scored and are not kept."""
    out = {f"{prefix}{name}": getattr(rollout, name) for name in _TENSOR_FIELDS}
    encoded = [text.encode("utf-8") for text in rollout.completions]
    out[f"{prefix}text_bytes"] = torch.tensor(list(b"".join(encoded)), dtype=torch.uint8)
    out[f"{prefix}text_lengths"] = torch.tensor([len(b) for b in encoded], dtype=torch.long)
    out[f"{prefix}finish_reasons"] = torch.tensor([FINISH_REASONS.index(r) for r in rollout.finish_reasons])
    for name, values in rollout.per_function.items():
        out[f"{prefix}reward.{name}"] = torch.tensor(values, dtype=torch.float64)
    return out


def rollout_from_tensors(tensors: dict[str, torch.Tensor], prefix: str, reward_names: Sequence[str]) -> RolloutBatch:
    """rollout_tensors' inverse (bit for bit: the resumed steps train on the very same rollout)."""
    data, texts, offset = bytes(tensors[f"{prefix}text_bytes"].tolist()), [], 0
    for length in tensors[f"{prefix}text_lengths"].tolist():
        texts.append(data[offset:offset + length].decode("utf-8"))
        offset += length
    return RolloutBatch(**{name: tensors[f"{prefix}{name}"] for name in _TENSOR_FIELDS}, completions=texts,
                        finish_reasons=[FINISH_REASONS[i] for i in tensors[f"{prefix}finish_reasons"].tolist()],
                        per_function={name: tensors[f"{prefix}reward.{name}"].tolist() for name in reward_names})
