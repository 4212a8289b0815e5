"""The running batch's KV cache: rows joined, dropped and trimmed between decode steps.

Layout invariant: every row is right-aligned. Row i's real tokens are the last `lengths[i]` columns of each
layer's keys/values (batch, kv_heads, seq, head_dim); the columns before them are padding, masked out and
zero-filled. Decode steps append one column for every row, which keeps the invariant, so a row's attention
mask is always [0 ... 0, 1 ... 1] and its next position id is simply lengths[i].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def cache_layers(cache: DynamicCache) -> list:
    """The layers holding tensors (a layer can stay empty, e.g. one that shares another layer's KV)."""
    return [layer for layer in cache.layers if getattr(layer, "is_initialized", False) and layer.keys.numel() > 0]


def zero_padding(cache: DynamicCache, mask: torch.Tensor) -> None:
    """Zero the cached keys/values where mask (batch, seq) is 0.

    A left-pad query attends to nothing, which can leave NaN/garbage in the next layer's KV at pad columns;
    masked or not, 0 * NaN is NaN in attention, so pad columns must hold finite values. Zeros also make a
    row's cache identical whatever batch it was prefilled in.
    """
    keep = mask.bool()[:, None, :, None]  # (batch, 1, seq, 1)
    for layer in cache_layers(cache):
        layer.keys = layer.keys.masked_fill(~keep, 0.0)
        layer.values = layer.values.masked_fill(~keep, 0.0)


def select_rows(cache: DynamicCache, index: torch.Tensor, *, drop_columns: int = 0) -> None:
    """Keep the rows `index` (in that order) of every layer, minus the first `drop_columns` columns."""
    for layer in cache_layers(cache):
        layer.keys = layer.keys.index_select(0, index)[:, :, drop_columns:, :]
        layer.values = layer.values.index_select(0, index)[:, :, drop_columns:, :]


class KVBatch:
    """The cache of the rows being decoded, plus each row's count of real (unpadded) tokens."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cache: DynamicCache | None = None
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)  # (batch,)

    @property
    def size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def seq_len(self) -> int:
        layers = cache_layers(self.cache) if self.cache is not None else []
        return layers[0].keys.shape[-2] if layers else 0

    def attention_mask(self, new_tokens: int = 1) -> torch.Tensor:
        """(batch, seq + new_tokens) mask for a step that appends `new_tokens` real tokens to every row."""
        seq = self.seq_len
        cols = torch.arange(seq, device=self.device)  # (seq,)
        past = cols[None, :] >= (seq - self.lengths)[:, None]  # (batch, seq): right-aligned real tokens
        new = torch.ones(self.size, new_tokens, dtype=torch.bool, device=self.device)
        return torch.cat([past, new], dim=1).long()

    def advance(self, new_tokens: int = 1) -> None:
        """Record that a forward appended `new_tokens` real tokens to every row."""
        self.lengths = self.lengths + new_tokens

    def join(self, cache: DynamicCache, lengths: torch.Tensor) -> None:
        """Append rows (a prefilled, right-aligned cache with real lengths (new_batch,)) to the batch.

        Both caches are padded on the left to the longer sequence, then concatenated on the batch dimension;
        zeros in the pad keep every row's result independent of its neighbours.
        """
        if self.cache is None or self.size == 0:
            self.cache, self.lengths = cache, lengths.to(self.device)
            return
        seq = max(self.seq_len, cache_layers(cache)[0].keys.shape[-2])
        for mine, theirs in zip(cache_layers(self.cache), cache_layers(cache), strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, seq), _left_pad(theirs.keys, seq)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, seq), _left_pad(theirs.values, seq)], dim=0)
        self.lengths = torch.cat([self.lengths, lengths.to(self.device)])

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order) and drop the leading columns that are padding in all of them."""
        if not rows:
            self.cache, self.lengths = None, self.lengths[:0]
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.lengths = self.lengths.index_select(0, index)
        # Columns before the longest row's real tokens are padding for every row: cut them.
        select_rows(self.cache, index, drop_columns=self.seq_len - int(self.lengths.max()))


def _left_pad(t: torch.Tensor, seq: int) -> torch.Tensor:
    """(batch, heads, s, head_dim) -> (batch, heads, seq, head_dim) with zeros in front."""
    return F.pad(t, (0, 0, seq - t.shape[-2], 0))
