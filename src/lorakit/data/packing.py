"""Packing: several examples share one row of at most max_seq_len tokens, so no compute goes to padding.

Packed examples must not see each other. Each row carries `position_ids` that restart at 0 for every
example (so rotary positions match the unpacked run) and a segment id per token from which
`block_causal_mask` builds a (batch, 1, seq, seq) block-diagonal causal mask.

Why an explicit 4D mask rather than relying on transformers' detection of packed rows from
`position_ids`: in transformers 5.x `create_causal_mask` only infers packing when `attention_mask is
None` *and* there is no KV cache, and `LlamaModel.forward` creates a cache whenever `use_cache` is true
(the config default), so a forward without `use_cache=False` silently attends across examples. A 4D
mask is returned as-is by `create_causal_mask` and works with both the eager (additive float) and SDPA
(bool or float) attention implementations. Flash-attention users, who cannot take a 4D mask, can ask
`collate_packed(..., mask="position_ids")` and must pass `use_cache=False`.

With each example's first label set to -100 (templates._mask_first), the token-weighted mean loss of a
packed batch equals that of the same examples unpacked.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import DataError
from .templates import IGNORE_INDEX


class HasTokens(Protocol):
    """Anything with token ids and labels of equal length (Example, Tokenized)."""

    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class PackedRow:
    """One row of packed examples. All lists have len(self) entries."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]  # restarts at 0 at each example
    segment_ids: list[int]  # 0, 0, ..., 1, 1, ...: which example of the row each token belongs to
    example_indices: tuple[int, ...]  # indices into the packed sequence, in row order

    def __len__(self) -> int:
        return len(self.input_ids)


def pack(examples: Sequence[HasTokens], max_seq_len: int) -> list[PackedRow]:
    """Pack examples into rows of at most `max_seq_len` tokens by best-fit decreasing.

    Deterministic (ties broken by index), so a resumed run recomputes the same rows. Best-fit decreasing
    fills rows to within a few percent for typical length distributions; example order is not kept,
    which is fine because rows are shuffled per epoch by the caller.
    """
    if max_seq_len < 1:
        raise DataError(f"max_seq_len must be >= 1 to pack, got {max_seq_len}")
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, bin index), sorted: bisect finds the tightest fit
    for i in order:
        n = len(examples[i].input_ids)
        if n > max_seq_len:
            raise DataError(f"example {i} has {n} tokens, more than max_seq_len={max_seq_len}; truncate or drop "
                            "it before packing")
        if n == 0:
            continue
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = max_seq_len, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return [_row(examples, members) for members in bins]


def _row(examples: Sequence[HasTokens], members: list[int]) -> PackedRow:
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    seg: list[int] = []
    for s, i in enumerate(members):
        ex = examples[i]
        n = len(ex.input_ids)
        ids += ex.input_ids
        # Token 0 of an example is never a target of its own example; in a packed row it would become
        # the target of the previous example's last token, so it must not carry a label.
        labels += [IGNORE_INDEX] + list(ex.labels[1:])
        pos += range(n)
        seg += [s] * n
    return PackedRow(ids, labels, pos, seg, tuple(members))


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(batch, seq) segment ids -> (batch, 1, seq, seq) mask letting token q see token k iff k <= q and
    both are in the same segment.

    `dtype=torch.bool`: True = attend (SDPA only). A float dtype: 0 = attend, dtype's min = blocked, the
    additive form both eager and SDPA attention accept. Every row attends at least to itself, so no
    softmax row is all -inf (padding gets a segment of its own in collate_packed).
    """
    b, s = segment_ids.shape
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()  # (seq, seq)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (batch, seq, seq)
    allowed = (same & causal)[:, None]  # (batch, 1, seq, seq)
    if dtype == torch.bool:
        return allowed
    mask = torch.zeros(b, 1, s, s, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def packing_efficiency(rows: Sequence[PackedRow], max_seq_len: int) -> float:
    """Fraction of row capacity holding real tokens (1.0 = no padding would be needed at max_seq_len)."""
    if not rows:
        return 0.0
    return sum(len(r) for r in rows) / (len(rows) * max_seq_len)
