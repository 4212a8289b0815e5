"""Reading safetensors checkpoints one tensor at a time, into ordinary memory.

Memory-mapping a shard (what `safe_open` does) leaves every page it touched counted in the process's
resident memory until the map is closed: loading a 13 GB 7B checkpoint that way peaks above 13 GB
even when each weight is quantized to 4 bits as soon as it is read. Reading each tensor with a plain
positioned read keeps only the tensor in hand plus the quantized model. The header is checked before
any data is trusted (offsets inside the file, sizes matching shapes, no overlaps), as `safetensors` does.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> list[TensorEntry]:
    """The tensors of one .safetensors file, in file order; CheckpointError if the header is not sound."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", raw)
        if length > min(MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: header length {length} does not fit the file; the file is damaged or not safetensors")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: unreadable safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a mapping")
    base = 8 + length
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        expected = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != expected or base + end > size:
            raise CheckpointError(f"{path}: tensor {name!r} (shape {list(shape)}, {info['dtype']}) has offsets "
                                  f"{begin}..{end} that do not match its size or lie outside the file")
        entries.append(TensorEntry(name, path, dtype, shape, base + begin, end - begin))
    entries.sort(key=lambda e: e.start)
    for before, after in zip(entries, entries[1:]):
        if after.start < before.start + before.nbytes:
            raise CheckpointError(f"{path}: tensors {before.name!r} and {after.name!r} overlap in the file")
    return entries


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
