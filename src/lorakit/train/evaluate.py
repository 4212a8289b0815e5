"""Evaluation: token-weighted mean cross-entropy over supervised tokens, and its perplexity."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from .chunked_loss import lm_loss_sum


@dataclass(frozen=True)
class EvalResult:
    loss: float
    """Mean cross-entropy per supervised token (nan when there were none)."""
    perplexity: float
    """exp(loss); inf when that overflows."""
    tokens: int
    """Supervised tokens scored."""
    parts: dict[str, float] = field(default_factory=dict)
    """The loss of each part scored on its own (multi-task: each task's), where an objective has parts."""
    fields: dict[str, float | None] = field(default_factory=dict)
    """More metrics of the evaluation (preference: eval_rewards/accuracies, ...), for metrics.jsonl and the log."""


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict:
    """The batch minus labels, on `device`; no KV cache (packed 4D masks require it, training never needs it)."""
    out = {k: v.to(device) for k, v in batch.items() if k != "labels" and isinstance(v, torch.Tensor)}
    out["use_cache"] = False
    return out


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def evaluate(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], *,
             loss_chunk_tokens: int | None = 1024) -> EvalResult:
    """Score `batches` (dicts from `lorakit.data.iter_batches`) under no_grad in eval mode; the model's
    previous mode is restored afterwards. The loss is summed over tokens and divided once, so batches of
    different sizes weigh by their supervised tokens, not equally. `loss_chunk_tokens` is
    TrainConfig.loss_chunk_tokens (same default): the logits are computed that many tokens at a time."""
    return eval_result(*loss_sums(model, batches, loss_chunk_tokens=loss_chunk_tokens))


def loss_sums(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], *,
              loss_chunk_tokens: int | None = 1024) -> tuple[float, int]:
    """(summed loss, supervised tokens) over `batches`, as evaluate computes them before dividing (processes
    that score shares of an evaluation add these up)."""
    was_training = model.training
    device = model_device(model)
    total, tokens = 0.0, 0
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                loss, count = lm_loss_sum(model, model_inputs(batch, device), batch["labels"], loss_chunk_tokens)
                total += float(loss)
                tokens += count
    finally:
        model.train(was_training)
    return total, tokens


def eval_result(total: float, tokens: int, *, parts: dict[str, float] | None = None) -> EvalResult:
    """The result for a summed loss `total` over `tokens` supervised tokens (NaN for none)."""
    parts = dict(parts or {})
    if tokens == 0:
        return EvalResult(loss=math.nan, perplexity=math.nan, tokens=0, parts=parts)
    loss = total / tokens
    try:
        perplexity = math.exp(loss)
    except OverflowError:
        perplexity = math.inf
    return EvalResult(loss=loss, perplexity=perplexity, tokens=tokens, parts=parts)
