"""Per-row log-probabilities of a batch's completion tokens, without the (rows, seq, vocab) float32 logits.

Preference objectives score whole completions: log p(completion | prompt) = the sum of the log-probabilities of
its tokens. Only the positions whose next token is a completion token reach the head, `chunk` tokens at a time
(like chunked_loss.py for SFT): with a frozen linear head, the gradient for the hidden states is computed in the
same pass, per token (_FrozenHeadLogProbs), so backward only scales it by each token's upstream gradient; any
other head runs its chunks under checkpointing. Models whose logits are not lm_head(decoder) get the full logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.templates import IGNORE_INDEX
from ..lora import LoraModel
from ..lora.routing import route_rows
from .chunked_loss import split_head
from .evaluate import model_device, model_inputs


class _FrozenHeadLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight^T + bias)[target] per row of `hidden`, `chunk` rows at a time, for a frozen
    head. d logp_t / d hidden_t = (onehot(target_t) - softmax_t) @ weight, kept per row from the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):  # hidden (n, h), weight (vocab, h), targets (n,)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (n,)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # (n, h)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            t = targets[rows]
            log_probs = torch.log_softmax(F.linear(hidden[rows], weight, bias).float(), dim=-1)  # (c, vocab)
            out[rows] = log_probs.gather(1, t[:, None]).squeeze(1)
            if grad is not None:
                probs = log_probs.exp_().neg_()  # -softmax, in place
                probs[torch.arange(t.shape[0], device=t.device), t] += 1
                grad[rows] = probs.to(weight.dtype) @ weight  # (c, h)
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (n,)
        (grad,) = ctx.saved_tensors
        return grad * grad_out[:, None].to(grad.dtype), None, None, None, None


def _frozen_linear(head: nn.Module) -> bool:
    return (type(head) is nn.Linear and not head.weight.requires_grad
            and (head.bias is None or not head.bias.requires_grad))


def _chunk_log_probs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(head(hidden).float(), dim=-1)  # (chunk, vocab)
    return log_probs.gather(1, targets[:, None]).squeeze(1)


def token_log_probs(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) under `head`, float32 (n,), `chunk` rows of logits at a time."""
    if _frozen_linear(head) and hidden.shape[0] > 0:
        return _FrozenHeadLogProbs.apply(hidden, head.weight, head.bias, targets, chunk)
    parts = []
    for h, t in zip(hidden.split(chunk), targets.split(chunk)):
        parts.append(checkpoint(_chunk_log_probs, head, h, t, use_reentrant=False) if torch.is_grad_enabled()
                     else _chunk_log_probs(head, h, t))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def completion_log_probs(model: nn.Module, batch: dict, chunk_tokens: int | None, *, adapter: str | None = None,
                         input_prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's labelled tokens (rows,) float32, their count (rows,) int64).

    `batch` holds {prefix}input_ids, {prefix}attention_mask and {prefix}labels (IGNORE_INDEX where not scored);
    `adapter` routes every row through that adapter of a LoraModel (e.g. a frozen reference adapter) instead of
    the active ones."""
    per_token, keep = _scored_log_probs(model, batch, chunk_tokens, adapter, input_prefix, 1.0)
    rows = keep.shape[0]
    row_of = torch.arange(rows, device=keep.device)[:, None].expand_as(keep)[keep]  # (n,)
    sums = torch.zeros(rows, dtype=torch.float32, device=per_token.device).index_add(0, row_of, per_token)
    return sums, keep.sum(1)


def token_log_probs_of_completions(model: nn.Module, batch: dict, chunk_tokens: int | None, *,
                                   adapter: str | None = None, temperature: float = 1.0) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each labelled token, (rows, seq - 1) float32, 0 elsewhere; the mask of those positions).
    Position t holds log p(token t + 1 | tokens <= t), as completion_log_probs sums them; the distribution is
    softmax(logits / temperature), the one a sampler at that temperature drew from."""
    per_token, keep = _scored_log_probs(model, batch, chunk_tokens, adapter, "", temperature)
    out = torch.zeros(keep.shape, dtype=torch.float32, device=per_token.device)
    return out.masked_scatter(keep, per_token), keep


def _scored_log_probs(model: nn.Module, batch: dict, chunk_tokens: int | None, adapter: str | None,
                      input_prefix: str, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of the labelled tokens in row-major order (n,), which positions they are (rows, seq - 1))."""
    # position_ids when the batch has them: left-padded prompts (RL rollouts) start at position 0 as generated
    inputs = model_inputs({key: batch[f"{input_prefix}{key}"] for key in ("input_ids", "attention_mask", "position_ids")
                           if f"{input_prefix}{key}" in batch}, model_device(model))
    labels = batch[f"{input_prefix}labels"].to(inputs["input_ids"].device)
    rows = labels.shape[0]
    targets = labels[:, 1:]  # (rows, seq - 1): position t predicts token t + 1
    keep = targets != IGNORE_INDEX  # (rows, seq - 1)
    t = targets[keep]  # (n,)
    names = [adapter] * rows if adapter is not None else None
    split = split_head(model) if chunk_tokens is not None else None
    if split is not None and temperature != 1.0 and getattr(split[1], "bias", None) is not None:
        split = None  # logits / T = (hidden / T) W^T only without a bias: take the full logits
    if split is None:
        kwargs = {"adapter_names": names} if isinstance(model, LoraModel) and names else {}
        logits = model(**inputs, **kwargs).logits[:, :-1]  # (rows, seq - 1, vocab)
        scaled = logits[keep].float() / temperature
        per_token = torch.log_softmax(scaled, dim=-1).gather(1, t[:, None]).squeeze(1)  # (n,)
    else:
        decoder, head = split
        with route_rows(names):  # the LoraModel forward that would route rows is skipped here
            hidden = decoder(**inputs)[0]  # (rows, seq, hidden)
        scored = hidden[:, :-1][keep]
        per_token = token_log_probs(scored / temperature if temperature != 1.0 else scored, head, t, chunk_tokens)
    return per_token, keep
