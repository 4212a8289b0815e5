"""Reading safetensors checkpoints one tensor at a time, into ordinary memory.

Memory-mapping a shard (what `safe_open` does) leaves every page it touched counted in the process's
resident memory until the map is closed: loading a 13 GB 7B checkpoint that way peaks above 13 GB
even when each weight is quantized to 4 bits as soon as it is read. Reading each tensor with a plain
positioned read keeps only the tensor in hand plus the quantized model. The header is checked before
any data is trusted (lorakit.safetensors_header), as `safetensors` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from ..errors import CheckpointError
from ..safetensors_header import TensorEntry, read_header  # noqa: F401 (quant.load and tests import it from here)


def read_tensor(entry: TensorEntry, handle) -> torch.Tensor:
    """The tensor `entry` describes, read from the open file `handle` into a fresh CPU tensor."""
    buffer = bytearray(entry.nbytes)
    handle.seek(entry.start)
    if handle.readinto(buffer) != entry.nbytes:
        raise CheckpointError(f"{entry.file}: file ended inside tensor {entry.name!r}")
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    return torch.frombuffer(buffer, dtype=entry.dtype).reshape(entry.shape)


def iter_tensors(files: list[Path], entries: list[TensorEntry]) -> Iterator[tuple[TensorEntry, torch.Tensor]]:
    """(entry, tensor) for every entry, file by file in offset order; each tensor is the caller's to keep or drop."""
    by_file: dict[Path, list[TensorEntry]] = {}
    for entry in entries:
        by_file.setdefault(entry.file, []).append(entry)
    for path in files:
        with open(path, "rb") as handle:
            for entry in by_file.get(path, []):
                yield entry, read_tensor(entry, handle)
