"""Shared pieces of the checkpoint tests: a tiny trainable model with its optimizer, and file mutators."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from lorakit.train.checkpoint import MANIFEST

VOCAB = 96


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A tiny seeded Llama (as tests/tiny_models.py builds), with the sizes the resume tests rely on."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)).eval()


def linear_setup(seed: int = 0, *, reverse: bool = False):
    """A Linear layer, AdamW over {weight, bias} (listed in reverse if asked) and its named parameters."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    params = dict(model.named_parameters())
    order = list(params.values())[::-1] if reverse else list(params.values())
    optimizer = torch.optim.AdamW(order, lr=0.1, weight_decay=0.01)
    return model, params, optimizer


def linear_step(model, optimizer) -> None:
    model(torch.randn(2, 4)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def snapshot(params) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


def flip_bit(file: Path, offset_from_end: int = 1) -> None:
    fd = os.open(file, os.O_RDWR)
    try:
        position = os.fstat(fd).st_size - offset_from_end
        byte = os.pread(fd, 1, position)
        os.pwrite(fd, bytes([byte[0] ^ 0x01]), position)
    finally:
        os.close(fd)


def edit_manifest(checkpoint: Path, **changes) -> None:
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest.update(changes)
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


def replace_file_and_rehash(checkpoint: Path, name: str, data: bytes) -> None:
    """Swap a file for `data` and fix the manifest to match: an attacker who controls the whole directory."""
    (checkpoint / name).write_bytes(data)
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))
