"""The header of a .safetensors file, read and checked before any tensor data is trusted.

The format (huggingface/safetensors README, "Format"): 8 bytes of little-endian header length N, N bytes of
JSON `{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}`, then the data buffer, which
"needs to be entirely indexed, and cannot contain holes". The spec disallows duplicate keys "but not all
parsers may respect this" (Python's json keeps the last one silently, and safetensors' own loader accepts
them), and caps the header at 100 MB. Everything is checked here: a duplicate name, a header over the cap,
offsets outside the file or overlapping, a hole, a NaN in the JSON. The error class is the caller's
(CheckpointError for a base checkpoint, AdapterError for an adapter).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError, LorakitError

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


class _Duplicate(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def _no_constant(token: str):
    raise ValueError(f"{token} is not a number JSON allows")


def read_header(path: Path, *, error: type[LorakitError] = CheckpointError) -> list[TensorEntry]:
    """The tensors of one .safetensors file, in file order; `error` if the header is not sound."""
    def fail(reason: str) -> LorakitError:
        return error(f"{path}: not a valid safetensors file ({reason})")

    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise fail("shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", raw)
        if length > min(MAX_HEADER, size - 8):
            raise fail(f"header length {length} does not fit the file or safetensors' 100 MB limit")
        try:
            header = json.loads(handle.read(length), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
        except _Duplicate as dup:
            raise fail(f"its header names {dup.args[0]!r} twice; the format forbids duplicate names, and readers "
                       "disagree on which one counts") from None
        except (UnicodeDecodeError, ValueError) as err:
            raise fail(f"unreadable safetensors header: {err}") from None
    if not isinstance(header, dict):
        raise fail("the header is not a mapping")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise fail("__metadata__ must map names to strings")
    base = 8 + length
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(_whole(d) for d in info["shape"])
            begin, end = (_whole(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise fail(f"tensor {name!r} has a malformed header entry {info!r}") from None
        expected = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != expected or base + end > size:
            raise fail(f"tensor {name!r} (shape {list(shape)}, {info['dtype']}) has offsets {begin}..{end} that do "
                       "not match its size or lie outside the file")
        entries.append(TensorEntry(name, path, dtype, shape, base + begin, end - begin))
    entries.sort(key=lambda e: e.start)
    covered = base
    for entry in entries:
        if entry.start != covered:
            what = "overlaps the tensor before it" if entry.start < covered else "leaves a hole before it"
            raise fail(f"tensor {entry.name!r} {what}; the data must be covered exactly once")
        covered = entry.start + entry.nbytes
    if covered != size:
        raise fail(f"{size - covered} bytes after the last tensor belong to no tensor")
    return entries


def _whole(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(value)
    return value
