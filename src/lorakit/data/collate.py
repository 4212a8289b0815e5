"""Batches: dynamic padding, packed-row collation, and a seeded length-grouped batch sampler.

Without packing, each batch is padded only to its longest example, and the sampler groups examples of
similar length so that padding stays small. The order is a pure function of (seed, epoch), so a resumed
run recomputes it instead of storing it (RELIABILITY.md A2: no duplicated or skipped samples on resume).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Literal

import torch

from ..errors import DataError
from .packing import HasTokens, PackedRow, block_causal_mask
from .templates import IGNORE_INDEX

PackedMask = Literal["float", "bool", "position_ids"]


def collate(examples: Sequence[HasTokens], pad_token_id: int, *, pad_to_multiple_of: int = 1) \
        -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids with `pad_token_id`, labels with -100, and an
    attention_mask of 1 for real tokens. All three are (batch, seq) int64."""
    if not examples:
        raise DataError("cannot collate an empty batch")
    longest = max(len(e.input_ids) for e in examples)
    seq = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(examples), seq), pad_token_id, dtype=torch.long)  # (batch, seq)
    labels = torch.full((len(examples), seq), IGNORE_INDEX, dtype=torch.long)  # (batch, seq)
    attn = torch.zeros((len(examples), seq), dtype=torch.long)  # (batch, seq)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        if len(e.labels) != n:
            raise DataError(f"example {row} of the batch has {n} input ids but {len(e.labels)} labels")
        ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
        attn[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}


def collate_packed(rows: Sequence[PackedRow], pad_token_id: int, *, mask: PackedMask = "float",
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Pad packed rows to the longest and add position_ids (restarting per example) and, unless
    `mask="position_ids"`, a (batch, 1, seq, seq) block-diagonal causal attention_mask.

    `mask="float"` (default) gives the additive form in `dtype` (use the model's dtype) that eager and
    SDPA attention both accept; `"bool"` is smaller but SDPA-only; `"position_ids"` leaves the mask out
    for flash-attention, which infers boundaries from position_ids (then call the model with
    `use_cache=False`, see packing.py).
    """
    if not rows:
        raise DataError("cannot collate an empty batch")
    seq = max(len(r) for r in rows)
    b = len(rows)
    ids = torch.full((b, seq), pad_token_id, dtype=torch.long)  # (batch, seq)
    labels = torch.full((b, seq), IGNORE_INDEX, dtype=torch.long)  # (batch, seq)
    pos = torch.zeros((b, seq), dtype=torch.long)  # (batch, seq)
    seg = torch.zeros((b, seq), dtype=torch.long)  # (batch, seq)
    for i, r in enumerate(rows):
        n = len(r)
        ids[i, :n] = torch.tensor(r.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(r.labels, dtype=torch.long)
        pos[i, :n] = torch.tensor(r.position_ids, dtype=torch.long)
        seg[i, :n] = torch.tensor(r.segment_ids, dtype=torch.long)
        # Padding is one more segment: it attends only to itself, so no softmax row is fully masked.
        pos[i, n:] = torch.arange(seq - n)
        seg[i, n:] = (max(r.segment_ids) + 1) if n else 0
    out = {"input_ids": ids, "labels": labels, "position_ids": pos}
    if mask == "position_ids":
        return out
    if mask not in ("float", "bool"):
        raise DataError(f"unknown packed mask kind {mask!r}; expected float, bool or position_ids")
    out["attention_mask"] = block_causal_mask(seg, torch.bool if mask == "bool" else dtype)  # (batch, 1, seq, seq)
    return out


class LengthGroupedBatchSampler:
    """Batches of indices with similar lengths, in an order fixed by (seed, epoch).

    Like transformers' LengthGroupedSampler: shuffle, cut into mega-batches of `batch_size *
    mega_batch_factor` examples, sort each by length and cut it into batches; the longest example is moved
    into the first mega-batch and its batch leads, so an out-of-memory shows up on step 1. Unlike it, the
    batches of each mega-batch come in random order, not longest to shortest: that order is a saw-tooth
    curriculum that ends every mega-batch on its shortest examples, and it cost validation loss
    (bench/quality.py). Mega-batches stay whole and in sequence, so with `mega_batch_factor` = the micro-batches
    of one optimizer step each step's examples are a random sample, only split into micro-batches by length
    (what training uses: see lorakit.train.loop). With `group_by_length=False` batches are plain shuffled slices
    (used for packed rows, which are already near max_seq_len). Usable as a torch DataLoader `batch_sampler`;
    call `set_epoch` each epoch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, drop_last: bool = False,
                 group_by_length: bool = True, mega_batch_factor: int = 50):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.group_by_length = group_by_length
        self.mega_batch_factor = max(1, mega_batch_factor)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order `__iter__` yields."""
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of `epoch`: a pure function of (lengths, batch_size, mega_batch_factor, seed, epoch)."""
        rng = random.Random(f"lorakit-batches:{self.seed}:{epoch}")  # str seeds hash with sha512: stable
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        if not self.group_by_length:
            out = [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
            return out[:len(self)]
        if order:
            longest = max(range(len(order)), key=lambda k: self.lengths[order[k]])
            order[0], order[longest] = order[longest], order[0]
        mega = self.batch_size * self.mega_batch_factor
        out = []
        for k in range(0, len(order), mega):
            group = sorted(order[k:k + mega], key=lambda j: -self.lengths[j])  # (mega,) longest first
            batches = [group[b:b + self.batch_size] for b in range(0, len(group), self.batch_size)]
            lead = [batches.pop(0)] if k == 0 else []  # the longest example's batch
            rng.shuffle(batches)
            out += lead + batches
        if self.drop_last and len(out) > len(self):  # the short batch (the last mega-batch's shortest)
            out.remove(next(b for b in out if len(b) < self.batch_size))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)
