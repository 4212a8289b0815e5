"""The language-model loss without the full logits: project and score a chunk of tokens at a time.

A causal LM's forward ends with `logits = lm_head(hidden)`, a (batch, seq, vocab) tensor; with a 32k-152k
vocabulary it, its float32 copy and their gradients are the largest allocation of a LoRA training step.
Here the decoder runs alone, only the positions with a supervised target are projected, and each chunk of
`chunk_tokens` rows goes through lm_head and cross-entropy: for a frozen linear head (the usual case) the
gradient for the hidden states is computed in the same pass (_FrozenHeadLoss, no recomputation); a head that
trains (LoRA on lm_head, modules_to_save) runs each chunk inside torch.utils.checkpoint, and the backward
recomputes its logits.

This is only exact when the model's logits are lm_head(decoder(...)) and nothing else, so `split_head`
refuses models that post-process their logits (then the caller computes the full logits as usual).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.templates import IGNORE_INDEX
from ..lora import LoraModel
from ..lora.routing import unrouted

# Config attributes of transformers 5.x models whose forward changes the logits after (or the hidden states
# before) lm_head; any of them set (not None) on the config or its text config means the split is not exact.
LOGIT_POSTPROCESSING = (
    "final_logit_softcapping",  # Gemma 2/3/3n, VaultGemma, nanochat, PaliGemma: cap * tanh(logits / cap)
    "logits_soft_cap",  # RecurrentGemma: the same cap, another name
    "logit_scale",  # Cohere, Cohere2: logits * scale (MPT's config has the name too)
    "logits_scaling",  # Granite: logits / s; HyperCLOVA X: logits * s; MiniCPM3: hidden / s
    "lm_head_multiplier",  # Falcon-H1: logits * m
    "output_multiplier",  # logits * m
    "output_mult",  # muP-style remote-code models: logits * m
    "logits_mup_width_multiplier",  # hidden / m before lm_head
    "unpadded_vocab_size",  # logits cut to the real vocabulary after a padded lm_head
)

# hf model -> whether one probe forward reproduced its logits from the split (see _split_reproduces_logits).
_probed: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over supervised tokens and their count, shifted as transformers does:
    position t's logits predict labels[t + 1]. Computed in float32 whatever the model's dtype."""
    return token_loss_sums(logits, [labels])[0]


def token_loss_sums(logits: torch.Tensor, label_sets: list[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
    """token_loss_sum for each label tensor, sharing one float32 log-softmax of the logits (cross_entropy is
    log_softmax then nll_loss, so a single set gets exactly its value), not one copy of the logits per set."""
    log_probs = torch.log_softmax(logits[:, :-1, :].float(), dim=-1).flatten(0, 1)  # (batch * (seq - 1), vocab)
    out = []
    for labels in label_sets:
        targets = labels[:, 1:].to(logits.device).reshape(-1)  # (batch * (seq - 1),)
        loss = F.nll_loss(log_probs, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        out.append((loss, int((targets != IGNORE_INDEX).sum())))
    return out


def logits_postprocessed(config) -> bool:
    """Whether a transformers config (or its text config) names a change to the logits after lm_head."""
    configs = [config, config.get_text_config()] if hasattr(config, "get_text_config") else [config]
    return any(getattr(c, name, None) is not None for c in configs for name in LOGIT_POSTPROCESSING)


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, head) of a causal LM (a LoraModel or a bare transformers model): decoder(**inputs)[0] is the
    last hidden state (batch, seq, hidden) and head(hidden) the logits. None where that would not give the
    model's own logits: no output embeddings or decoder, or logits post-processed after lm_head."""
    hf = model.model if isinstance(model, LoraModel) else model
    get_head = getattr(hf, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    prefix = getattr(hf, "base_model_prefix", "")  # Llama, Qwen2, Mistral: "model"; GPT-2: "transformer"
    decoder = getattr(hf, prefix, None) if prefix else None
    if not isinstance(head, nn.Module) or not isinstance(decoder, nn.Module) or decoder is hf:
        return None
    if logits_postprocessed(getattr(hf, "config", None)):
        return None
    if hf not in _probed:
        _probed[hf] = _split_reproduces_logits(hf, decoder, head)
    return (decoder, head) if _probed[hf] else None


def _split_reproduces_logits(hf: nn.Module, decoder: nn.Module, head: nn.Module) -> bool:
    """Catch post-processing the attribute list misses: in one 2-token forward of the whole model, the head's
    input must be the decoder's output and the returned logits the head's output, bit for bit. Both sides
    come from the same forward, so nondeterministic kernels cannot fail it. Eval mode: no dropout, no RNG use."""
    seen: dict[str, torch.Tensor] = {}

    def on_decoder(_module, _args, out):
        seen["hidden"] = out[0]

    def on_head(_module, args, out):
        if args:
            seen["head_in"], seen["head_out"] = args[0], out

    modes = [(m, m.training) for m in hf.modules()]
    handles = [decoder.register_forward_hook(on_decoder), head.register_forward_hook(on_head)]
    hf.eval()
    try:
        with torch.no_grad(), unrouted():  # a one-row probe: a caller's per-row adapter names do not fit it
            ids = torch.tensor([[0, 1]], device=next(hf.parameters()).device)
            logits = hf(input_ids=ids, use_cache=False).logits  # (1, 2, vocab)
    except Exception:  # a model this call does not suit is one the split is not known to suit either
        return False
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes:
            m.training = training
    # .float(): a model that only upcasts its logits (older transformers did) is still exactly ours.
    return (len(seen) == 3 and torch.equal(seen["hidden"], seen["head_in"])
            and torch.equal(seen["head_out"].float(), logits.float()))


class _FrozenHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight^T (+ bias)` against `targets`, `chunk` rows at a time, for a
    frozen head: the gradient for `hidden` is computed in the forward, chunk by chunk, while each chunk's
    logits exist anyway, so the backward only scales it. Same matmuls as the plain path, no recomputation.

    d loss / d logits = softmax(logits) - onehot(target); d loss / d hidden = that @ weight.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, compiled):  # hidden (n, h), weight (vocab, h), targets (n,)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # (n, h)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            t = targets[rows]
            if grad is not None and compiled:
                loss, probs = compiled_scores()(F.linear(hidden[rows], weight, bias), t)
                total += loss
                grad[rows] = probs @ weight
                continue
            logits = F.linear(hidden[rows], weight, bias).float()  # (c, vocab), a fresh tensor either way
            # One fused log_softmax pass (15% faster here than logsumexp + a second exp), stable for any logits.
            log_probs = torch.log_softmax(logits, dim=-1)  # (c, vocab)
            total -= log_probs.gather(1, t[:, None]).sum()
            if grad is not None:
                probs = log_probs.exp_()  # softmax, in place
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1
                grad[rows] = probs.to(weight.dtype) @ weight  # (c, h)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None, None


def _scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, softmax - onehot(targets) in logits' dtype) of logits (c, vocab), targets (c,),
    in float32 inside. Written for torch.compile, which fuses it into passes over the 16-bit logits, where
    eager mode materializes a float32 copy, its log-softmax and the probabilities one after another."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)  # (c, 1)
    loss = (lse.squeeze(1) - x.gather(1, targets[:, None]).squeeze(1)).sum()
    probs = torch.exp(x - lse) - F.one_hot(targets, x.shape[1]).to(x.dtype)
    return loss, probs.to(logits.dtype)


_compiled_scores = None


def compiled_scores():
    """_scores compiled once per process (dynamic in the chunk length: the last chunk is shorter)."""
    global _compiled_scores
    if _compiled_scores is None:
        _compiled_scores = torch.compile(_scores, dynamic=True)
    return _compiled_scores


def _frozen_linear(head: nn.Module) -> bool:
    """A plain nn.Linear whose weight and bias take no gradient (not a LoRA wrapper, not quantized)."""
    return (type(head) is nn.Linear and not head.weight.requires_grad
            and (head.bias is None or not head.bias.requires_grad))


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (chunk, vocab)
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_token_loss_sum(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                           chunk_tokens: int, *, compiled: bool = False) -> tuple[torch.Tensor, int]:
    """token_loss_sum(head(hidden), labels), computed `chunk_tokens` supervised positions at a time.

    A frozen linear head takes _FrozenHeadLoss (`compiled`: its softmax part through torch.compile). Any
    other head, with grad enabled, runs each chunk under non-reentrant checkpointing, so only `hidden` is kept
    for backward and one chunk's logits exist at a time; under no_grad the chunks run plainly."""
    targets = labels[:, 1:].to(hidden.device)  # (batch, seq - 1): position t predicts labels[t + 1]
    keep = targets != IGNORE_INDEX  # (batch, seq - 1)
    # Only supervised positions reach the head: on chat data most positions are masked prompt tokens.
    h = hidden[:, :-1][keep]  # (count, hidden)
    t = targets[keep]  # (count,)
    if _frozen_linear(head) and h.shape[0] > 0:
        return _FrozenHeadLoss.apply(h, head.weight, head.bias, t, chunk_tokens, compiled), t.numel()
    recompute = torch.is_grad_enabled()
    total = None
    # With no supervised token the split is one empty chunk: a loss of 0 that still backpropagates (zero
    # gradients, as the plain path gives).
    for h_chunk, t_chunk in zip(h.split(chunk_tokens), t.split(chunk_tokens)):  # (<= chunk, hidden), (<= chunk,)
        if recompute:
            part = checkpoint(_chunk_loss, head, h_chunk, t_chunk, use_reentrant=False)
        else:
            part = _chunk_loss(head, h_chunk, t_chunk)
        total = part if total is None else total + part
    return total, t.numel()


def lm_loss_sum(model: nn.Module, inputs: dict, labels: torch.Tensor,
                chunk_tokens: int | None, *, compiled: bool = False) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over supervised tokens, their count) of `model` on `inputs` (model_inputs of a
    batch). Chunked when `chunk_tokens` is set and split_head accepts the model; else from the full logits.
    `compiled`: the chunked loss's softmax runs through torch.compile (see chunked_token_loss_sum)."""
    return lm_loss_sums(model, inputs, [labels], chunk_tokens, compiled=compiled)[0]


def lm_loss_sums(model: nn.Module, inputs: dict, label_sets: list[torch.Tensor],
                 chunk_tokens: int | None, *, compiled: bool = False) -> list[tuple[torch.Tensor, int]]:
    """lm_loss_sum for each of several label tensors over ONE forward of the decoder: a batch holding rows of
    several tasks passes `labels` masked to each task's rows (IGNORE_INDEX elsewhere) and gets each task's sum.
    Only supervised positions reach the head, so scoring the sets one by one costs what scoring them at once would."""
    split = split_head(model) if chunk_tokens is not None else None
    if split is None:
        logits = model(**inputs).logits  # (batch, seq, vocab)
        return token_loss_sums(logits, label_sets)
    decoder, head = split
    # Per-row adapter routing, where asked for, is set by the caller (route_rows): the LoraModel forward that
    # would set it is skipped here.
    hidden = decoder(**inputs)[0]  # (batch, seq, hidden)
    return [chunked_token_loss_sum(hidden, head, labels, chunk_tokens, compiled=compiled) for labels in label_sets]
