"""Shared builders for the engine tests: a tiny llama with three non-trivial adapters, a tokenizer, prompts."""

from __future__ import annotations

import torch

from data_helpers import build_tokenizer
from tiny_models import build_model, randomize_lora
from lorakit import LoraConfig, wrap
from lorakit.infer import Engine, SamplingParams

ADAPTERS = {
    "a": dict(target_modules=["q_proj", "v_proj"]),
    "b": dict(target_modules=["v_proj", "down_proj"], r=4),
    "c": dict(target_modules=["o_proj", "up_proj"], r=2, lora_alpha=8),
}


def build_lora(eos: bool = False):
    """fp32 tiny llama with adapters a, b, c whose B is random (a fresh B = 0 would make every adapter the base).

    eos=False removes the model's EOS id, so generations run to max_tokens unless a test asks otherwise.
    """
    lora = None
    for name, config in ADAPTERS.items():
        if lora is None:
            lora = wrap(build_model("llama"), LoraConfig(**config), adapter_name=name)
        else:
            lora.add_adapter(name, LoraConfig(**config))
    randomize_lora(lora, scale=0.3)
    if not eos:
        lora.model.generation_config.eos_token_id = None
    return lora.eval()


def build_tok(eos: bool = False):
    tok = build_tokenizer()
    if not eos:
        tok.eos_token = None  # the tokenizer's "</s>" (id 6) is inside the tiny model's vocabulary
    return tok


def prompts(n: int, seed: int = 0, lengths=(5, 9, 3, 7, 4, 11, 6, 2)) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 96, (lengths[i % len(lengths)],), generator=gen).tolist() for i in range(n)]


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, **kw)


def token_ids(handle) -> list[int]:
    """Every token id a handle's events carried, in order."""
    return [t for event in handle for t in event.token_ids]


def alone(engine: Engine, prompt: list[int], adapter: str | None, params: SamplingParams) -> list[int]:
    """Run one request by itself (nothing else in the engine) and return its token ids."""
    return token_ids(engine.submit(prompt, adapter, params))
