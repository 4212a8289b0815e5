"""DataOptions: every choice between a data file and the batches, typed and validated once.

Field docstrings follow litgpt's `args.py`; a bad value raises ConfigError naming the field and what is
allowed, with all problems reported together.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError
from .formats import CANONICAL_KEYS, FORMATS
from .templates import BUILTIN_TEMPLATES

FormatName = Literal["auto", "alpaca", "messages", "sharegpt", "text"]
TemplateName = Literal["auto", "chatml", "llama3", "alpaca", "plain"]


@dataclass(kw_only=True)
class DataOptions:
    """How records are read, validated, rendered, cut and batched."""

    format: FormatName = "auto"
    """Record format. `auto` detects it from the first record that fits one: a `messages` list (OpenAI
    role/content), a `conversations` list (ShareGPT from/value), `instruction`+`output` (alpaca), or
    `text` (raw text for continued pre-training). Set it explicitly when detection guesses wrong."""

    columns: Mapping[str, str] = field(default_factory=dict)
    """Canonical key -> key in your data, e.g. {"instruction": "question", "output": "answer"}. Mappable:
    instruction, input, output, system, history, messages, conversations, text, and inside turns role,
    content, from, value."""

    template: TemplateName = "auto"
    """Chat template. `auto` uses the tokenizer's own `chat_template` (an error if it has none); otherwise
    a built-in: chatml, llama3, alpaca, or plain (no markup, for base models). Ignored for text data."""

    max_seq_len: int = 2048
    """Longest example in tokens (and the row length when packing)."""

    truncation: Literal["truncate", "drop"] = "truncate"
    """What to do with a longer example: `truncate` cuts it (at the end of the last assistant turn that
    fits, so kept turns keep their end-of-turn token; else at max_seq_len), `drop` removes it. Both are
    counted in the summary; dropped examples count toward max_drop_fraction."""

    train_on_prompt: bool = False
    """False: loss only on assistant turns (content and end-of-turn token). True: loss on every token."""

    packing: bool | None = None
    """Pack several examples per row (positions restart, no cross-example attention). None means on for
    text data and off for chat data."""

    skip_bad_records: bool = False
    """False: any malformed or invalid record stops preparation with its file:line and reason. True: such
    records are skipped and counted by reason (still bounded by max_drop_fraction)."""

    max_drop_fraction: float = 0.01
    """Largest fraction of records that may be skipped or dropped (bad, too long, nothing to learn) before
    preparation fails, naming the reasons. Guards against silently losing a third of a dataset."""

    def __post_init__(self) -> None:
        problems = []
        if self.format not in ("auto", *FORMATS):
            problems.append(f"format: {self.format!r} is not one of auto, {', '.join(FORMATS)}")
        if self.template not in ("auto", *BUILTIN_TEMPLATES):
            problems.append(f"template: {self.template!r} is not one of auto, {', '.join(BUILTIN_TEMPLATES)}")
        if not isinstance(self.columns, Mapping):
            problems.append(f"columns: expected a mapping of canonical key to column name, got {self.columns!r}")
        else:
            for k, v in self.columns.items():
                if k not in CANONICAL_KEYS:
                    close = difflib.get_close_matches(str(k), CANONICAL_KEYS, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    problems.append(f"columns: unknown key {k!r}{hint}; mappable: {', '.join(CANONICAL_KEYS)}")
                if not isinstance(v, str) or not v:
                    problems.append(f"columns[{k!r}]: expected a non-empty column name, got {v!r}")
        if isinstance(self.max_seq_len, bool) or not isinstance(self.max_seq_len, int) or self.max_seq_len < 2:
            problems.append(f"max_seq_len: expected an integer >= 2, got {self.max_seq_len!r}")
        if self.truncation not in ("truncate", "drop"):
            problems.append(f"truncation: {self.truncation!r} is not one of truncate, drop")
        for name in ("train_on_prompt", "skip_bad_records"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}: expected true or false, got {getattr(self, name)!r}")
        if self.packing is not None and not isinstance(self.packing, bool):
            problems.append(f"packing: expected true, false or null, got {self.packing!r}")
        f = self.max_drop_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or not 0 <= f <= 1:
            problems.append(f"max_drop_fraction: expected a number in [0, 1], got {f!r}")
        if problems:
            raise ConfigError(problems, where="data options")

    def packing_for(self, fmt: str) -> bool:
        """Whether to pack data of format `fmt` (resolves packing=None)."""
        return fmt == "text" if self.packing is None else self.packing
