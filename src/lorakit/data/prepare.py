"""prepare(): a data file (or records) + tokenizer + DataOptions -> tokenized examples and a summary.

One pass per record: read, detect/validate the format, render and tokenize, apply the length policy.
Problems are collected with their location and reason, then the run either fails (strict, the default)
or continues with the bad records counted. Either way it fails when more than max_drop_fraction of the
records were lost, and when nothing is left (RELIABILITY.md §5: never "succeed" on no data).
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import torch

from ..errors import DataError
from .collate import LengthGroupedBatchSampler, PackedMask, collate, collate_packed
from .budget import tokenize_within_budget
from .formats import Normalised, Tools, chat_tools, describe_keys, detect_format, normalise
from .options import DataOptions
from .packing import PackedRow, pack
from .records import BadRecord, Record, read_records, records_from_objects
from .templates import IGNORE_INDEX, ChatTemplate, Tokenized, resolve_template, tokenize_conversation, tokenize_text

T = TypeVar("T")
MAX_LISTED = 20  # problems quoted in full in an error; the rest are counted by reason
# Reasons that are a property of the data's shape (an error in strict mode), as opposed to policy drops.
POLICY_REASONS = ("too_long",)


@dataclass(frozen=True)
class Example:
    """One tokenized training example, with the place it came from (for errors and debugging)."""

    input_ids: list[int]
    labels: list[int]
    source: str


@dataclass
class DataSummary:
    """What happened to the records: the numbers behind the one-line summary."""

    source: str
    format: str = "unknown"
    template: str = "-"
    records_read: int = 0
    kept: int = 0
    truncated: int = 0
    cut_replies: int = 0  # chat examples truncated inside their only reply: trained on a reply that never ends
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> count (bad records and policy drops)
    supervised_tokens: int = 0
    total_tokens: int = 0
    problems: list[str] = field(default_factory=list)  # the first MAX_LISTED, as "location: reason"

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def line(self) -> str:
        """One human line, e.g. for the training log's header."""
        drops = ", ".join(f"{r}: {n}" for r, n in sorted(self.dropped.items())) or "none"
        line = (f"{self.source}: {self.records_read} records read, {self.kept} kept ({self.truncated} truncated), "
                f"{self.dropped_total} dropped ({drops}); {self.total_tokens} tokens, {self.supervised_tokens} "
                f"supervised; format={self.format} template={self.template}")
        if self.cut_replies:
            line += (f"\nwarning: {self.cut_replies} example(s) cut inside a reply by truncation train a reply with no "
                     "end-of-turn token (the model learns not to stop); raise data.max_seq_len or set truncation: "
                     "drop (`lorakit data inspect` shows them)")
        return line


@dataclass
class PreparedData:
    """Tokenized examples ready for batching, and how they were made."""

    examples: list[Example]
    summary: DataSummary
    packing: bool
    max_seq_len: int
    pad_token_id: int


Source = str | os.PathLike[str] | Iterable[Mapping[str, Any] | Record]


def prepare(source: Source, tokenizer: Any, options: DataOptions | None = None, *, name: str | None = None) \
        -> PreparedData:
    """Read, validate, render and tokenize every record of `source` (a local file path, or records in
    memory / from `read_hub`). Raises DataError naming file, line and reason for bad data. `name` labels
    the summary (default: the path, or "records")."""
    opts = options or DataOptions()
    summary = DataSummary(source=source_name(source, name))
    fmt = None if opts.format == "auto" else opts.format
    template: ChatTemplate | None = None

    def example(record: Mapping[str, Any], location: str) -> Example | None:
        nonlocal fmt, template
        if fmt is None:
            fmt = detect_format(record, opts.columns)
            if fmt is None:
                raise BadRecord("unknown_format", f"fits no format: keys {sorted(map(str, record))[:8]}; "
                                                  f"expected {describe_keys(opts.columns)}")
        if fmt != "text" and template is None:
            template = resolve_template(tokenizer, opts.template)  # DataError: stops at once, not per record
        item = normalise(record, fmt, opts.columns)
        tools = () if isinstance(item, str) else chat_tools(record, item, opts.columns)
        tok, cut = _tokenize(item, tools, tokenizer, template, opts)
        return _apply_length_policy(tok, location, opts, summary, chat=not isinstance(item, str), cut=cut)

    examples = each_record(source, opts, summary, example)
    summary.format = fmt or "unknown"
    summary.template = "-" if fmt == "text" or template is None else template.name
    return PreparedData(examples, summary, opts.packing_for(summary.format), opts.max_seq_len, pad_id(tokenizer))


def source_name(source: Source, name: str | None = None) -> str:
    """What messages call `source`: `name`, else the path, else "records"."""
    return name or (str(source) if isinstance(source, (str, os.PathLike)) else "records")


def each_record(source: Source, opts: DataOptions, summary: DataSummary,
                make: Callable[[Mapping[str, Any], str], T | None]) -> list[T]:
    """`make(record, location)` for every record of `source`, counted in `summary`. A BadRecord (raised by make,
    or met while reading) is dropped and counted; unless opts.skip_bad_records, the bad records then stop the
    run together (up to MAX_LISTED of them, each with file:line). make returning None: dropped by a length
    policy (make counted it). Fails too when nothing is left or more than max_drop_fraction was lost."""
    records = read_records(source) if isinstance(source, (str, os.PathLike)) else \
        records_from_objects(source, name=summary.source)
    out: list[T] = []
    strict_failures = 0
    for rec in records:
        summary.records_read += 1
        try:
            if rec.problem is not None:
                raise rec.problem
            assert rec.data is not None
            example = make(rec.data, rec.location)
        except BadRecord as e:
            drop(summary, e.reason, str(e if e.location else e.at(rec.location)))
            if not opts.skip_bad_records:
                strict_failures += 1
                if strict_failures >= MAX_LISTED:
                    break
            continue
        if example is not None:
            out.append(example)
    if strict_failures:
        raise DataError(strict_message(summary, stopped=strict_failures >= MAX_LISTED))
    check_losses(summary, opts)
    summary.kept = len(out)
    return out


def pad_id(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad_token nor an eos_token to pad batches with")
    return pad


def _tokenize(item: Normalised, tools: Tools, tokenizer: Any, template: ChatTemplate | None, opts: DataOptions) \
        -> tuple[Tokenized, bool]:
    """(the record tokenized, whether its text was cut to the budget first: see budget.py)."""
    if isinstance(item, str):
        return tokenize_within_budget(item, opts.max_seq_len, lambda text: tokenize_text(text, tokenizer))
    assert template is not None
    return tokenize_within_budget(
        item, opts.max_seq_len, lambda turns: tokenize_conversation(turns, tokenizer, template, tools=tools,
                                                                    train_on_prompt=opts.train_on_prompt),
        template.literal_strings)


def _apply_length_policy(tok: Tokenized, location: str, opts: DataOptions, summary: DataSummary, *,
                         chat: bool, cut: bool = False) -> Example | None:
    """Truncate or drop an over-long example (None when dropped); count chat examples cut inside their reply (a
    cut document is normal for text data). Raises BadRecord for an example left with nothing to learn.
    `cut`: the text was cut before tokenizing, so the whole record has more tokens than `tok`."""
    ids, labels = tok.input_ids, tok.labels
    cut_reply = False
    if len(ids) > opts.max_seq_len:
        if opts.truncation == "drop":
            more = "+" if cut else ""
            drop(summary, "too_long", f"{location}: {len(ids)}{more} tokens > max_seq_len={opts.max_seq_len}")
            return None
        # Cut after the last assistant turn that fits whole, so every kept turn ends with its end-of-turn
        # token; if none fits, a plain cut (the partial reply is trained without an end-of-turn token).
        whole = [e for e in tok.assistant_ends if e <= opts.max_seq_len]
        cut = max(whole, default=opts.max_seq_len)
        ids, labels = ids[:cut], labels[:cut]
        summary.truncated += 1
        cut_reply = chat and not whole
    supervised = sum(1 for x in labels if x != IGNORE_INDEX)
    if supervised == 0:
        after = f" (after truncation to {opts.max_seq_len})" if len(ids) < len(tok.input_ids) else ""
        raise BadRecord("no_supervised_tokens", f"no supervised token left{after}: it would teach nothing; raise "
                                                "max_seq_len, or set truncation: drop")
    summary.cut_replies += cut_reply
    summary.supervised_tokens += supervised
    summary.total_tokens += len(ids)
    return Example(list(ids), list(labels), location)


def drop(summary: DataSummary, reason: str, message: str) -> None:
    summary.dropped[reason] += 1
    if len(summary.problems) < MAX_LISTED:
        summary.problems.append(message)


def strict_message(summary: DataSummary, *, stopped: bool) -> str:
    bad = {r: n for r, n in summary.dropped.items() if r not in POLICY_REASONS}
    counts = ", ".join(f"{r}: {n}" for r, n in sorted(bad.items()))
    total = sum(bad.values())
    head = f"{summary.source}: {total} bad record{'s' if total != 1 else ''} ({counts})"
    if stopped:
        head += f"; stopped after {MAX_LISTED}"
    listed = "\n".join(f"  {p}" for p in summary.problems)
    return f"{head}:\n{listed}\nfix them, or set skip_bad_records to skip and count them"


def check_losses(summary: DataSummary, opts: DataOptions) -> None:
    """Fail when nothing is left or too much was lost; both name the reasons."""
    reasons = ", ".join(f"{r}: {n}" for r, n in sorted(summary.dropped.items()))
    kept = summary.records_read - summary.dropped_total
    if kept <= 0:
        what = "no records" if summary.records_read == 0 else f"all {summary.records_read} records dropped ({reasons})"
        raise DataError(f"{summary.source}: no valid samples: {what}" +
                        ("".join(f"\n  {p}" for p in summary.problems)))
    fraction = summary.dropped_total / summary.records_read
    if fraction > opts.max_drop_fraction:
        raise DataError(f"{summary.source}: {summary.dropped_total} of {summary.records_read} records dropped "
                        f"({fraction:.1%} > max_drop_fraction={opts.max_drop_fraction:g}): {reasons}"
                        + "".join(f"\n  {p}" for p in summary.problems)
                        + "\nfix the data, or raise max_drop_fraction if this loss is intended")


def split_validation(examples: Sequence[T], fraction: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """Split off `fraction` of the examples (at least one) as a validation set, fixed by `seed`: SFT examples,
    preference pairs or GRPO prompts alike.

    Both parts keep the original order; the choice depends only on (len(examples), fraction, seed).
    """
    if not 0 < fraction < 1:
        raise DataError(f"validation fraction must be in (0, 1), got {fraction}")
    n = len(examples)
    k = max(1, round(n * fraction))
    if n < 2 or k >= n:
        raise DataError(f"cannot split {fraction:g} of {n} examples for validation and keep any for training")
    chosen = set(random.Random(f"lorakit-split:{seed}").sample(range(n), k))
    train = [e for i, e in enumerate(examples) if i not in chosen]
    val = [e for i, e in enumerate(examples) if i in chosen]
    return train, val


def packed_rows(data: PreparedData) -> list[PackedRow]:
    """The packed rows of `data` (deterministic; compute once per run)."""
    return pack(data.examples, data.max_seq_len)


def iter_batches(data: PreparedData, batch_size: int, *, seed: int = 0, epoch: int = 0,
                 rows: Sequence[PackedRow] | None = None, mask: PackedMask = "float",
                 dtype: torch.dtype = torch.float32, drop_last: bool = False,
                 group: int = 50) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of one epoch, ready for `model(**batch)`; order fixed by (seed, epoch).

    Packed: rows (pass `rows=packed_rows(data)` to avoid re-packing each epoch) in shuffled batches, with
    position_ids and a block-diagonal mask. Unpacked: dynamically padded batches, grouped by length within each
    run of `group` batches (LengthGroupedBatchSampler's mega_batch_factor). Training passes the micro-batches of
    one optimizer step, so every step is a random sample of examples (1: plain random batches).
    """
    if data.packing:
        rows = packed_rows(data) if rows is None else rows
        sampler = LengthGroupedBatchSampler([len(r) for r in rows], batch_size, seed=seed, drop_last=drop_last,
                                            group_by_length=False)
        for idx in sampler.batches(epoch):
            yield collate_packed([rows[i] for i in idx], data.pad_token_id, mask=mask, dtype=dtype)
    else:
        sampler = LengthGroupedBatchSampler([len(e.input_ids) for e in data.examples], batch_size, seed=seed,
                                            drop_last=drop_last, mega_batch_factor=group)
        for idx in sampler.batches(epoch):
            yield collate([data.examples[i] for i in idx], data.pad_token_id)

