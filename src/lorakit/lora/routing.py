"""Per-row adapter routing for mixed-adapter batches.

`LoraModel.forward(..., adapter_names=[...])` names one adapter per batch row. Rather than thread
that list through every transformers module, the model sets it in a context variable for the duration
of the call; each LoRA layer reads it and runs one grouped matmul per adapter present.
A ContextVar (not a global) keeps concurrent threads and asyncio tasks apart.
"""

from __future__ import annotations

import contextlib
import threading
from contextvars import ContextVar
from typing import Iterator

import torch

from ..errors import AdapterError

BASE = "__base__"
"""The adapter name that means "no adapter" for a row (PEFT uses the same name)."""


class RowRouting:
    """Which rows of the batch use which adapter, as index tensors grouped by adapter."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self._cache: dict[tuple[int, torch.device], list[tuple[str, torch.Tensor]]] = {}

    def groups(self, batch_size: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """(adapter, row indices) pairs for a batch of `batch_size` rows, base rows left out.

        generate() may expand each prompt into k rows (beams, num_return_sequences) with
        repeat_interleave; a batch that is a whole multiple of the names is expanded the same way.
        """
        key = (batch_size, device)
        if key not in self._cache:
            n = len(self.names)
            if batch_size % n != 0:
                raise AdapterError(
                    f"adapter_names has {n} entries but the batch has {batch_size} rows; "
                    "give exactly one adapter name per row"
                )
            repeat = batch_size // n
            rows: dict[str, list[int]] = {}
            for i, name in enumerate(self.names):
                rows.setdefault(name, []).extend(range(i * repeat, (i + 1) * repeat))
            self._cache[key] = [
                (name, torch.tensor(idx, dtype=torch.long, device=device))
                for name, idx in rows.items()
                if name != BASE
            ]
        return self._cache[key]


_current: ContextVar[RowRouting | None] = ContextVar("lorakit_row_routing", default=None)
# How many route_rows blocks are open, in any thread. At 0 no routing can be set, so current_routing()
# answers without the ContextVar, which torch.compile cannot trace (a graph break in every LoRA layer).
_open_blocks = 0
_open_lock = threading.Lock()


def current_routing() -> RowRouting | None:
    if _open_blocks == 0:
        return None
    return _current.get()


@contextlib.contextmanager
def unrouted() -> Iterator[None]:
    """Within the block no row routing applies, even inside a route_rows block (a forward of other rows)."""
    token = _current.set(None)
    try:
        yield
    finally:
        _current.reset(token)


@contextlib.contextmanager
def route_rows(names: list[str] | None) -> Iterator[None]:
    """Within the block, LoRA layers apply adapter names[i] to batch row i."""
    if names is None:
        yield
        return
    global _open_blocks
    token = _current.set(RowRouting(names))
    with _open_lock:
        _open_blocks += 1
    try:
        yield
    finally:
        with _open_lock:
            _open_blocks -= 1
        _current.reset(token)
