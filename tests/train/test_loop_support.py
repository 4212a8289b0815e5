"""Shared builders for the training-loop tests (test_loop_*.py): a tiny Llama with LoRA, toy data, configs.

Named test_loop_* so it sits with the loop tests; it holds no tests itself. Importable in a subprocess too
(the exact-resume test kills one mid-run).
"""

from __future__ import annotations

import random

import torch

from lorakit import LoraConfig, wrap
from lorakit.config import TrainConfig
from lorakit.data import DataSummary, Example, PreparedData
from tiny_models import VOCAB, build_model, randomize_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def lora_model(*, seed: int = 0, dropout: float = 0.0, randomize: bool = True, r: int = 4, targets=TARGETS):
    """Tiny Llama (seeded) with a LoRA adapter whose B is non-zero (a fresh B = 0 hides bugs)."""
    torch.manual_seed(seed)
    model = wrap(build_model("llama", seed=seed), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                              lora_dropout=dropout))
    if randomize:
        randomize_lora(model, seed=seed + 1, scale=0.05)
    return model


def toy_data(n: int = 16, lengths=(12,), seed: int = 0, prompt: int = 0) -> PreparedData:
    """Counting sequences (next token = this token + 1 mod VOCAB): learnable by a tiny model. `lengths` cycles
    over the examples; the first `prompt` labels of each (at least one) are -100."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        length = lengths[i % len(lengths)]
        start = rng.randrange(1, VOCAB)
        ids = [1 + (start + k) % (VOCAB - 1) for k in range(length)]
        labels = [-100] * max(1, prompt) + ids[max(1, prompt):]
        examples.append(Example(input_ids=ids, labels=labels, source=f"toy:{i}"))
    summary = DataSummary(source="toy", records_read=n, kept=n)
    return PreparedData(examples=examples, summary=summary, packing=False, max_seq_len=max(lengths), pad_token_id=0)


def config(**overrides) -> TrainConfig:
    base = dict(max_steps=10, batch_size=2, grad_accum=1, lr=1e-2, lr_schedule="constant", max_grad_norm=None,
                seed=0, log_every=1000)
    base.update(overrides)
    return TrainConfig(**base)


def quiet(_line: str) -> None:
    pass


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


def base_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}
