"""Evaluation: token-weighted mean cross-entropy over supervised tokens, and its perplexity."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..data.templates import IGNORE_INDEX


@dataclass(frozen=True)
class EvalResult:
    loss: float
    """Mean cross-entropy per supervised token (nan when there were none)."""
    perplexity: float
    """exp(loss); inf when that overflows."""
    tokens: int
    """Supervised tokens scored."""


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over supervised tokens and their count, shifted as transformers does:
    position t's logits predict labels[t + 1]. Computed in float32 whatever the model's dtype."""
    logits = logits[:, :-1, :].float()  # (batch, seq - 1, vocab)
    targets = labels[:, 1:].to(logits.device)  # (batch, seq - 1)
    count = int((targets != IGNORE_INDEX).sum())
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, count


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict:
    """The batch minus labels, on `device`; no KV cache (packed 4D masks require it, training never needs it)."""
    out = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    out["use_cache"] = False
    return out


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def evaluate(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> EvalResult:
    """Score `batches` (dicts from `lorakit.data.iter_batches`) under no_grad in eval mode; the model's
    previous mode is restored afterwards. The loss is summed over tokens and divided once, so batches of
    different sizes weigh by their supervised tokens, not equally."""
    was_training = model.training
    device = model_device(model)
    total, tokens = 0.0, 0
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                logits = model(**model_inputs(batch, device)).logits
                loss, count = token_loss_sum(logits, batch["labels"])
                total += float(loss)
                tokens += count
    finally:
        model.train(was_training)
    if tokens == 0:
        return EvalResult(loss=math.nan, perplexity=math.nan, tokens=0)
    loss = total / tokens
    try:
        perplexity = math.exp(loss)
    except OverflowError:
        perplexity = math.inf
    return EvalResult(loss=loss, perplexity=perplexity, tokens=tokens)
