"""Merged checkpoints: base + adapter -> a plain transformers model directory.

The result loads with `AutoModelForCausalLM.from_pretrained` alone: sharded safetensors with an index,
config, generation config and the tokenizer files. Written to a temporary sibling directory and renamed
into place, so an interrupted export never leaves a half-written model where the real one should be.
"""

from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_directory
from ..base_model import LoadedModel
from ..errors import LorakitError
from ..lora import load_adapter


def merge_to_directory(loaded: LoadedModel, adapter_dir: str | Path, out_dir: str | Path, *,
                       max_shard_size: str = "2GB", overwrite: bool = False) -> Path:
    """Load `adapter_dir` onto the loaded base, fold it into the weights, save a plain model to `out_dir`."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise LorakitError(f"{out} already exists; choose another --out or pass --overwrite")
    lora = load_adapter(loaded.model, adapter_dir)
    lora.eval()
    merged = lora.merge_and_unload(safe_merge=True)
    with atomic_directory(out) as staging:
        merged.save_pretrained(staging, max_shard_size=max_shard_size, safe_serialization=True)
        loaded.tokenizer.save_pretrained(staging)
    return out
