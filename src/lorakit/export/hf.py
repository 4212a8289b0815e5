"""Merged checkpoints: base + adapter -> a plain transformers model directory.

The result loads with `AutoModelForCausalLM.from_pretrained` alone: sharded safetensors with an index,
config, generation config, the tokenizer files and lorakit_merge.json (what was merged, and the list of
files, by which --overwrite recognises the directory: export/outputs.py). Written to a temporary sibling
directory and renamed into place, so an interrupted export never leaves a half-written model where the real
one should be.

dtype: each merged weight is computed in float32 (LoraLayer.merge) and rounded once, to the dtype asked for;
by default the checkpoint's own, so a float32 base gives a float32 merge whatever the machine computes in.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..atomic import atomic_directory
from ..base_model import DTYPES, LoadedModel
from ..lora import load_adapter
from .outputs import check_out, write_marker


def merge_to_directory(loaded: LoadedModel, adapter_dir: str | Path, out_dir: str | Path, *,
                       max_shard_size: str = "2GB", overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Load `adapter_dir` onto the loaded base, fold it into the weights, save a plain model to `out_dir` (in
    `dtype`, default the loaded one). `overwrite` replaces only an earlier lorakit merge (export/outputs.py)."""
    out = Path(out_dir)
    base = getattr(getattr(loaded.model, "config", None), "_name_or_path", None) or None
    check_out(out, "hf", overwrite=overwrite, inputs=tuple(p for p in (adapter_dir, base) if p))
    lora = load_adapter(loaded.model, adapter_dir)
    lora.eval()
    merged = lora.merge_and_unload(safe_merge=True)
    if dtype is not None:
        merged.to(dtype)
    with atomic_directory(out) as staging:
        merged.save_pretrained(staging, max_shard_size=max_shard_size, safe_serialization=True)
        loaded.tokenizer.save_pretrained(staging)
        write_marker(staging, base=base, adapter=str(adapter_dir), dtype=str(merged.dtype).removeprefix("torch."))
        check_out(out, "hf", overwrite=overwrite)  # again: files may have appeared there during the merge
    return out


def merge_dtypes(source: str, requested: str) -> tuple[str, torch.dtype]:
    """(dtype to load the base in, dtype of the merged model) for --dtype `requested`; auto: the checkpoint's
    own. The base loads in the output dtype when it is stored so (no rounding at all), else in float32, so the
    merged weights are rounded once."""
    stored = checkpoint_dtype(source)
    out = stored if requested == "auto" else DTYPES[requested]
    load = out if out == stored else torch.float32
    return str(load).removeprefix("torch."), out


def checkpoint_dtype(source: str) -> torch.dtype:
    """The dtype a checkpoint stores its weights in: config.json's `dtype` (`torch_dtype` in older files), else
    the first floating tensor's of a local directory's safetensors, else float32. Only bfloat16, float16 and
    float32 count."""
    from transformers import AutoConfig

    from ..safetensors_header import read_header

    known = set(DTYPES.values())
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError):
        config = None
    for name in ("dtype", "torch_dtype"):
        value = getattr(config, name, None) if config is not None else None
        value = getattr(torch, value, None) if isinstance(value, str) else value
        if value in known:
            return value
    for file in sorted(Path(source).glob("*.safetensors"))[:1] if Path(source).is_dir() else []:
        for entry in read_header(file):
            if entry.dtype.is_floating_point:
                return entry.dtype if entry.dtype in known else torch.float32
    return torch.float32
