"""Supervised fine-tuning: next-token cross-entropy on the supervised tokens (labels != -100), packed or padded.

A window's loss is the token-weighted mean over ALL its supervised tokens: each micro-batch's summed loss is
divided by the window's count, so the accumulated gradient is that of the mean over the window, however the
tokens fall into micro-batches (and processes). The loss is taken loss_chunk_tokens at a time where the model
allows (chunked_loss.py), so the full (tokens, vocab) logits never exist at once.
"""

from __future__ import annotations

import itertools
from typing import Iterator, Sequence

import torch
from torch import nn

from ...config import TrainConfig
from ...data import LengthGroupedBatchSampler, PreparedData, iter_batches, packed_rows
from ...data.templates import IGNORE_INDEX
from ...errors import DataError
from ..chunked_loss import lm_loss_sum
from ..evaluate import EvalResult, eval_result, loss_sums, model_device, model_inputs
from ..runtime import Runtime
from .base import BatchLoss, Normaliser, WindowMetrics, batch_tokens, clip_together
from ..fingerprint import examples_fingerprint


def supervised_tokens(batch: dict) -> int:
    """Supervised positions of a batch once labels are shifted (the first token is never a target)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class LanguageModeling:
    """The supervised fine-tuning objective over one PreparedData (and its validation data, if any)."""

    compile_obstacle = None
    sum_keys = ("loss", "tokens")

    def __init__(self, data: PreparedData, config: TrainConfig, *, eval_data: PreparedData | None = None,
                 dtype: torch.dtype = torch.float32):
        """`dtype`: the model's; packed batches carry an additive attention mask that must match it."""
        if not data.examples:
            raise DataError("no training examples left after preparation")
        self.data, self.eval_data, self.config, self.dtype = data, eval_data, config, dtype
        self.rows = packed_rows(data) if data.packing else None  # packed once per run, not per epoch
        self.eval_rows = packed_rows(eval_data) if eval_data is not None and eval_data.packing else None
        self.examples = len(data.examples)
        self.evaluates = eval_data is not None

    def describe(self) -> list[str]:
        return []

    def batches_per_epoch(self) -> int:
        lengths = [len(r) for r in self.rows] if self.rows is not None else [len(e.input_ids) for e in self.data.examples]
        return len(LengthGroupedBatchSampler(lengths, self.config.batch_size))

    def batches(self, epoch: int, start: int, group: int) -> Iterator[dict]:
        every = iter_batches(self.data, self.config.batch_size, seed=self.config.seed, epoch=epoch, rows=self.rows,
                             dtype=self.dtype, group=group)
        return itertools.islice(every, start, None)

    def normaliser(self, window: Sequence[dict]) -> Normaliser:
        return {"tokens": sum(supervised_tokens(b) for b in window)}

    def loss(self, model: nn.Module, batch: dict, normaliser: Normaliser, *, compiled: bool = False) -> BatchLoss:
        total, _ = lm_loss_sum(model, model_inputs(batch, model_device(model)), batch["labels"],
                               self.config.loss_chunk_tokens, compiled=compiled)
        return BatchLoss(total / normaliser["tokens"], {"loss": float(total.detach()), "tokens": batch_tokens(batch)})

    def window_metrics(self, sums: dict[str, float], normaliser: Normaliser) -> WindowMetrics:
        return WindowMetrics(loss=sums["loss"] / normaliser["tokens"], tokens=int(sums["tokens"]))

    def clip(self, params: dict[str, nn.Parameter], max_norm: float | None) -> tuple[float, dict]:
        return clip_together(params, max_norm), {}

    def evaluate(self, model: nn.Module, runtime: Runtime) -> EvalResult:
        """Mean loss per supervised token of the validation data; under torchrun each process scores its share."""
        batches = iter_batches(self.eval_data, self.config.batch_size, seed=self.config.seed, epoch=0,
                               rows=self.eval_rows, dtype=self.dtype)
        mine, fillers = runtime.split(batches)
        total, tokens = loss_sums(model, mine, loss_chunk_tokens=self.config.loss_chunk_tokens)
        with torch.no_grad():  # fsdp: as many forwards as the busiest process
            for batch in fillers:
                lm_loss_sum(model, model_inputs(batch, model_device(model)), batch["labels"],
                            self.config.loss_chunk_tokens)
        total, tokens = runtime.sum([total, tokens])
        return eval_result(total, int(tokens))

    def fingerprint(self) -> dict:
        return {**examples_fingerprint([(None, self.data)]), "data.examples": len(self.data.examples),
                "data.packing": self.data.packing}
