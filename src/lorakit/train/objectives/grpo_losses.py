"""GRPO's math, on tensors only: group-relative advantages and the clipped policy loss of each variant.

Names and conventions follow TRL's GRPOTrainer (1.16), the oracle the tests compare with:
- advantages: each completion's reward minus its group's mean (G completions of one prompt), divided by the
  group's standard deviation (Bessel-corrected) + 1e-4 with scale "group", by the whole batch's with "batch", by
  nothing with "none" (Dr. GRPO's recommendation);
- the per-token ratio r = exp(logp - old_logp) is clipped to [1 - eps_low, 1 + eps_high] (DAPO's asymmetric
  clipping when they differ), and the token's loss is -min(r A, clip(r) A), plus beta times the k3 estimate of the
  KL to the reference, exp(ref - logp) - (ref - logp) - 1, when beta > 0; by default that estimate is multiplied
  by r (DeepSeek-V3.2's correction, TRL's default: the unbiased reverse-KL gradient; r is 1 in value on-policy
  but not in gradient);
- how token losses become the loss (the variants differ only here):
    grpo     the mean over each completion's tokens, then over completions (long completions weigh less per token)
    dr_grpo  the sum over all tokens / (completions x max_completion_len): no length bias
    dapo     the sum over all tokens / the tokens of the whole generation batch (`tokens`): token-level
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Variant = Literal["grpo", "dr_grpo", "dapo"]
VARIANTS = ("grpo", "dr_grpo", "dapo")
STD_EPSILON = 1e-4  # TRL's: a group whose rewards are all equal gets advantages 0, not 0/0


def group_advantages(rewards: torch.Tensor, group_size: int, scale: Literal["group", "batch", "none"] = "group") \
        -> torch.Tensor:
    """Advantages of `rewards` (N,), laid out as N / group_size groups of consecutive completions. A NaN reward (a
    completion no reward function could score) is left out of the means and deviations, as TRL leaves it out, and
    its advantage is 0; so is every advantage of a group with fewer than two scored completions under "group"."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return torch.nan_to_num(centred, nan=0.0)
    if scale == "group":
        std = nanstd(grouped, dim=1).repeat_interleave(group_size)
    elif scale == "batch":
        std = nanstd(rewards[None], dim=1).expand_as(rewards)
    else:
        raise ValueError(f"scale must be group, batch or none, not {scale!r}")
    return torch.nan_to_num(centred / (std + STD_EPSILON), nan=0.0)


def nanstd(values: torch.Tensor, dim: int) -> torch.Tensor:
    """The Bessel-corrected standard deviation along `dim` ignoring NaNs; NaN where fewer than two values."""
    count = (~torch.isnan(values)).sum(dim)
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim) * count / (count - 1)
    return torch.where(count > 1, variance.sqrt(), torch.full_like(variance, float("nan")))


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # scalar, with the graph of `logps`
    clipped_low: torch.Tensor  # fraction of scored tokens whose ratio fell below 1 - eps_low with A < 0
    clipped_high: torch.Tensor  # ... above 1 + eps_high with A > 0
    kl: torch.Tensor | None  # mean k3 KL to the reference over scored tokens (None when beta is 0)


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                variant: Variant = "grpo", eps_low: float = 0.2, eps_high: float | None = None, beta: float = 0.0,
                ref_logps: torch.Tensor | None = None, kl_bias_correction: bool = True,
                max_completion_len: int | None = None, tokens: float | None = None) -> PolicyLoss:
    """The GRPO loss of completions (B, T): `logps` the policy's per-token log-probs (with grad), `old_logps` those
    of the policy that sampled them, `advantages` (B,), `mask` (B, T) 1 on completion tokens. dr_grpo needs
    `max_completion_len`; dapo `tokens` (the whole generation batch's completion tokens, default this batch's)."""
    mask = mask.to(logps.dtype)
    eps_high = eps_low if eps_high is None else eps_high
    advantages = advantages[:, None]
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps, the reference's per-token log-probs")
        delta = ref_logps - logps
        per_token_kl = torch.exp(delta) - delta - 1
        if kl_bias_correction:
            per_token_kl = per_token_kl * ratio
        per_token = per_token + beta * per_token_kl
        kl = (per_token_kl * mask).sum().detach() / mask.sum().clamp(min=1)
    if variant == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif variant == "dr_grpo":
        if max_completion_len is None:
            raise ValueError("dr_grpo divides by completions x max_completion_len: pass max_completion_len")
        loss = (per_token * mask).sum() / (per_token.shape[0] * max_completion_len)
    elif variant == "dapo":
        loss = (per_token * mask).sum() / (mask.sum() if tokens is None else torch.tensor(float(tokens))).clamp(min=1)
    else:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
    scored = mask.sum().clamp(min=1)
    with torch.no_grad():
        low = ((ratio < 1 - eps_low) & (advantages < 0)).to(mask.dtype)
        high = ((ratio > 1 + eps_high) & (advantages > 0)).to(mask.dtype)
    return PolicyLoss(loss, (low * mask).sum() / scored, (high * mask).sum() / scored, kl)
