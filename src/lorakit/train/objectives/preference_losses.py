"""The preference losses as pure functions of sequence log-probabilities: the math, apart from models and data.

Each takes per-example tensors and returns per-example losses and rewards; the objective (preference.py) sums
them over a window and divides by its examples, so gradient accumulation and processes change nothing. The
conventions are TRL's (its trainers are the test oracle, tests/train/test_preference_oracle.py):
- dpo: logratio = log pi(y|x) - log ref(y|x), summed over completion tokens; rewards are beta x logratio.
- ipo: the same log-ratios divided by the completion's token count (TRL's per-token IPO).
- simpo and orpo: no reference; the mean log-probability per token; rewards are beta x that mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...config import PreferenceConfig


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
               ref_rejected: torch.Tensor | None, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
               config: PreferenceConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, chosen rewards, rejected rewards), each (pairs,), for loss_type sigmoid, robust, ipo, hinge or
    simpo. `chosen`/`rejected`: summed log-probabilities of the completions; `ref_*` the reference's (None for
    simpo); `*_tokens` the completions' token counts."""
    beta, smoothing = config.beta, config.label_smoothing
    if config.loss_type == "simpo":  # Meng et al. 2024, eq. 6: length-normalised, margin gamma
        chosen_mean, rejected_mean = chosen / chosen_tokens.clamp(min=1), rejected / rejected_tokens.clamp(min=1)
        margin = chosen_mean - rejected_mean - config.simpo_gamma / beta
        losses = -F.logsigmoid(beta * margin) * (1 - smoothing) - F.logsigmoid(-beta * margin) * smoothing
        return losses, beta * chosen_mean.detach(), beta * rejected_mean.detach()
    assert ref_chosen is not None and ref_rejected is not None
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if config.loss_type == "sigmoid":  # Rafailov et al. 2023, eq. 7; label smoothing: conservative DPO
        losses = -F.logsigmoid(beta * delta) * (1 - smoothing) - F.logsigmoid(-beta * delta) * smoothing
    elif config.loss_type == "robust":  # Chowdhury et al. 2024, eq. 5: unbiased under flipped labels
        losses = (-(1 - smoothing) * F.logsigmoid(beta * delta) + smoothing * F.logsigmoid(-beta * delta)) \
            / (1 - 2 * smoothing)
    elif config.loss_type == "hinge":  # SLiC (Zhao et al. 2023)
        losses = torch.relu(1 - beta * delta)
    elif config.loss_type == "ipo":  # Azar et al. 2023, eq. 17, on per-token mean log-ratios as TRL does
        mean_delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (mean_delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {config.loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_losses(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, config: PreferenceConfig) \
        -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term (Hong et al. 2024, eqs. 4 and 7) per pair, from the mean log-probability per token:
    (-lambda x log sigmoid(log odds ratio), chosen rewards, rejected rewards, log odds ratio). The objective adds
    the chosen completions' cross-entropy."""
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    losses = -config.orpo_lambda * F.logsigmoid(log_odds)
    return losses, config.orpo_lambda * chosen_mean.detach(), config.orpo_lambda * rejected_mean.detach(), log_odds.detach()


def kto_losses(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
               config: PreferenceConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 7) per example: (weighted losses, rewards). `kl` is the batch's estimate of
    the KL from the reference (detached, at least 0); desirable examples gain from a log-ratio above it,
    undesirable ones from one below."""
    ratio = logps - ref_logps
    gain = torch.where(desirable, ratio - kl, kl - ratio)
    weight = torch.where(desirable, config.desirable_weight, config.undesirable_weight)
    return weight * (1 - torch.sigmoid(config.beta * gain)), config.beta * ratio.detach()
