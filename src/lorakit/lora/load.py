"""Adapter files onto models: load_adapter (onto a plain model or a LoraModel) and validate_adapter (every
check load_adapter makes, with nothing loaded: `lorakit check`).

These build a LoraModel, so they sit above model.py; io.py, which model.py uses for save_adapter and
load_adapter, reads and writes the files and knows a LoraModel only by what it reads of it.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..safetensors_header import TensorEntry
from .config import LoraConfig
from .io import (DEFAULT_NAME, check_file_values, check_header_against_model, config_for_model,
                 drop_absent_modules_to_save, fill_adapter, read_adapter_config, read_checked_header)
from .model import LoraModel


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = DEFAULT_NAME, *, is_trainable: bool = False):
    """Load an adapter directory onto a plain model (returns a new LoraModel) or a LoraModel (adds to it)."""
    if isinstance(model, LoraModel):
        return model.load_adapter(path, adapter_name, is_trainable=is_trainable)
    directory = Path(path)
    config = config_for_model(model, directory, is_trainable=is_trainable)
    grads = {id(p): p.requires_grad for p in model.parameters()}
    lora_model = LoraModel(model, config, adapter_name, _init=False)
    try:
        fill_adapter(lora_model, adapter_name, directory)
    except Exception:
        lora_model.unwrap()  # the model goes back as it came: no wrappers, its own requires_grad flags
        for p in model.parameters():
            p.requires_grad_(grads.get(id(p), p.requires_grad))
        raise
    return lora_model


def validate_adapter(path: str | Path, base: nn.Module | None = None) -> tuple[LoraConfig, dict[str, TensorEntry]]:
    """Every check load_adapter makes, with nothing loaded: the config, the safetensors header, each tensor's
    name and dtype, its shape against `base` (when given) and its values (read one at a time). `base` is the
    model the adapter is for, best built on the meta device; it gets wrapped, so pass one to throw away.
    Returns the config and the header's entries. Safetensors only: a pickled adapter_model.bin is refused,
    not unpickled."""
    directory = Path(path)
    config = read_adapter_config(directory)
    source, entries = read_checked_header(directory)
    if base is not None:
        config = drop_absent_modules_to_save(base, config, directory)
        lora_model = LoraModel(base, config.replace(inference_mode=True), DEFAULT_NAME, _init=False)
        check_header_against_model(lora_model, DEFAULT_NAME, source, entries)
    check_file_values(source, entries)
    return config, entries
