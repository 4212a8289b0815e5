"""Per-request sampling settings, the limits a request must fit, and the token choice made from one row of logits.

The limits are defined and checked here only (RequestLimits.check). The engine (the library API) refuses a
request over its limits with an InvalidRequest carrying the `LimitExceeded` problems; the HTTP layer checks its
own limits with the same function before submitting, and answers a problem found by either with the same
400 (serve/errors.py, limit_error). Each words it for its audience: the engine names its arguments
(max_new_tokens, LimitExceeded.__str__), the HTTP layer the request's fields (max_tokens, max_completion_tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch


@dataclass(frozen=True)
class LimitExceeded:
    """One request over one limit."""

    kind: Literal["empty_prompt", "prompt_too_long", "too_many_tokens"]
    value: int
    """What the request asked for: its prompt tokens, or its max_tokens."""
    limit: int
    """The most allowed (the least, 1, for an empty prompt)."""

    def __str__(self) -> str:
        """In the library's words, naming the Engine argument that sets the limit."""
        if self.kind == "empty_prompt":
            return "the prompt is empty; give at least one token"
        if self.kind == "prompt_too_long":
            return f"the prompt has {self.value} tokens, more than max_prompt_tokens={self.limit}"
        return f"max_tokens={self.value} is more than this engine allows (max_new_tokens={self.limit})"


@dataclass(frozen=True)
class RequestLimits:
    max_prompt_tokens: int = 2048
    """Prompt tokens per request at most (after the chat template); longer prompts are refused (HTTP 400)."""
    max_tokens: int = 512
    """New tokens per request (`max_tokens`) at most; also the default for chat completions."""

    def check(self, prompt_tokens: int, max_tokens: object) -> list[LimitExceeded]:
        """The limits that a request of `prompt_tokens` prompt tokens asking for `max_tokens` new ones exceeds,
        prompt first; empty when it fits. A max_tokens that is not an integer is SamplingParams.problems' to report."""
        problems = []
        if prompt_tokens == 0:
            problems.append(LimitExceeded("empty_prompt", 0, 1))
        elif prompt_tokens > self.max_prompt_tokens:
            problems.append(LimitExceeded("prompt_too_long", prompt_tokens, self.max_prompt_tokens))
        if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > self.max_tokens:
            problems.append(LimitExceeded("too_many_tokens", max_tokens, self.max_tokens))
        return problems


MAX_TOP_LOGPROBS = 20  # OpenAI's cap on top_logprobs


@dataclass
class SamplingParams:
    max_tokens: int = 16
    """Most tokens to generate (EOS included); reaching it ends the request with finish_reason "length"."""
    temperature: float = 0.0
    """Softmax temperature; 0 means greedy (argmax), which is deterministic whatever the batch."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of most likely tokens whose probabilities add up to top_p."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: generation ends at the first one, which is not included in the output text."""
    seed: int | None = None
    """Seeds the request's own torch.Generator, so a seeded sampled request is reproducible in any batch."""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted once from the logit of every token already generated in this completion (-2 to 2)."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted from a token's logit once per time it was generated in this completion (-2 to 2)."""
    repetition_penalty: float = 1.0
    """transformers' and vLLM's: the logit of a token seen in the prompt or the completion is divided by it when
    positive, multiplied by it when negative (> 1 discourages repeats)."""
    grammar: str | None = None
    """An llguidance grammar the output must follow (infer.constraints: json_schema_grammar, lark_grammar); the
    request ends ("stop") when the grammar is complete."""
    logprobs: int | None = None
    """When set, each event also carries the model's own log-softmax (temperature 1, before penalties) of each
    chosen token and of the `logprobs` most likely tokens at that step (0 to MAX_TOP_LOGPROBS)."""

    def problems(self) -> list[str]:
        """Every invalid field, each named with what is allowed (empty when the params are usable); how many
        tokens a server allows is RequestLimits.check's part."""
        out = []
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            out.append(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature < float("inf"):
            out.append(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            out.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            out.append(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            out.append(f"seed must be an integer or None, got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not -2.0 <= value <= 2.0:
                out.append(f"{name} must be a number from -2 to 2, got {value!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or not 0.0 < self.repetition_penalty < float("inf"):
            out.append(f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty!r}")
        if self.grammar is not None and not isinstance(self.grammar, str):
            out.append(f"grammar must be a grammar string or None, got {type(self.grammar).__name__}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            out.append(f"logprobs must be None or an integer from 0 to {MAX_TOP_LOGPROBS}, got {self.logprobs!r}")
        return out

    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def apply_penalties(logits: torch.Tensor, prompt: list[int], completion: list[int], params: SamplingParams) \
        -> torch.Tensor:
    """One row of logits (vocab,) with the request's penalties applied: repetition over prompt and completion
    (transformers' RepetitionPenaltyLogitsProcessor's rule), presence and frequency over the completion (OpenAI's
    rule: logit - presence * [count > 0] - frequency * count)."""
    out = logits.clone()
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(completion)), dtype=torch.long, device=logits.device)
        if seen.numel():
            picked = out[seen]
            out[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if completion and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(completion, device=logits.device), minlength=logits.shape[-1])
        counts = counts[:logits.shape[-1]].to(out.dtype)
        out -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(out.dtype)
    return out


def model_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's own log-probability of `token` (log-softmax of the raw row (vocab,)) and the `top` most likely
    (token, log-probability) pairs, most likely first."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if top == 0:
        return float(logp[token]), []
    values, ids = torch.topk(logp, min(top, logp.shape[-1]))
    return float(logp[token]), [(int(i), float(v)) for i, v in zip(ids, values)]


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's own random stream (None for greedy): rows never share one, so batching cannot change draws."""
    if params.temperature == 0:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> tuple[int, float]:
    """The next token from one row of logits (vocab,): argmax at temperature 0, else temperature + top-p sampling;
    and its log-probability under the distribution it was drawn from (at temperature 1 when greedy), before top_p."""
    if params.temperature == 0:
        token = int(torch.argmax(logits))
        return token, float(torch.log_softmax(logits.float(), dim=-1)[token])
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # (vocab,)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)  # (vocab,), (vocab,)
        # Keep a token while the mass before it is still short of top_p: the most likely one always stays.
        keep = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) < params.top_p
        token = int(order[draw(sorted_probs * keep, generator)])
    else:
        token = draw(probs, generator)
    return token, float(torch.log(probs[token]))  # a drawn token's probability is far above float32's underflow


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """An index drawn with probability proportional to `weights` (vocab,), >= 0, by inverting their cumulative
    sum at one uniform number from `generator`: torch.multinomial draws a random number per vocabulary entry,
    17x slower at a 32k vocabulary, and the draw is a large share of a small model's decode step."""
    cdf = torch.cumsum(weights, dim=0, dtype=torch.float64)
    u = torch.rand(1, generator=generator, dtype=torch.float64, device=weights.device) * cdf[-1]
    index = int(torch.searchsorted(cdf, u, right=True))  # the first entry whose cumulative weight passes u
    if index == weights.shape[0]:  # u rounded up to the total: take the last entry with any weight
        index = int(torch.nonzero(weights)[-1])
    return index
