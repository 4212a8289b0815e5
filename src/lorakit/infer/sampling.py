"""Per-request sampling settings and the token choice made from one row of logits."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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

    def problems(self, max_new_tokens: int) -> list[str]:
        """Every invalid field, each named with what is allowed (empty when the params are usable)."""
        out = []
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            out.append(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        elif self.max_tokens > max_new_tokens:
            out.append(f"max_tokens={self.max_tokens} is more than this engine allows (max_new_tokens={max_new_tokens})")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature < float("inf"):
            out.append(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            out.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            out.append(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            out.append(f"seed must be an integer or None, got {self.seed!r}")
        return out


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


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token from one row of logits (vocab,): argmax at temperature 0, else temperature + top-p sampling."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # (vocab,)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)  # (vocab,), (vocab,)
        # Keep a token while the mass before it is still short of top_p: the most likely one always stays.
        keep = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) < params.top_p
        sorted_probs = sorted_probs * keep
        pick = torch.multinomial(sorted_probs, 1, generator=generator)  # multinomial renormalises
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=generator))
