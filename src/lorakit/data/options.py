"""DataOptions: every choice between a data file and the batches, typed, documented and validated once.

The run config's `data:` section (lorakit.config.DataConfig) is this class plus where the data is, so these
fields, their docstrings (`lorakit train --help` prints them) and their checks exist only here. Field
docstrings follow litgpt's `args.py`; a bad value raises ConfigError naming the field and what is allowed,
with all problems reported together.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ConfigError
from .formats import CANONICAL_KEYS, FORMATS
from .templates import BUILTIN_TEMPLATES


@dataclass(kw_only=True)
class DataOptions:
    """How records are read, validated, rendered, cut and batched."""

    format: Literal["auto", "alpaca", "messages", "sharegpt", "text"] = "auto"
    """Record format. `auto` detects it from the first record that fits one: a `messages` list (OpenAI
    role/content), a `conversations` list (ShareGPT from/value), `instruction`+`output` (alpaca), or
    `text` (raw text for continued pre-training). Set it explicitly when detection guesses wrong."""

    columns: Mapping[str, str] = field(default_factory=dict)
    """Canonical key -> key in your data, e.g. {"instruction": "question", "output": "answer"}. Mappable:
    instruction, input, output, system, history, messages, conversations, text, and inside turns role,
    content, from, value."""

    template: Literal["auto", "chatml", "llama3", "alpaca", "plain"] = "auto"
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
        # Only DataOptions' own fields: a subclass (the run config's section) checks the fields it adds.
        problems = [problem for f in dataclasses.fields(DataOptions)
                    for problem in self.field_problems(f.name, getattr(self, f.name))]
        if problems:
            raise ConfigError(problems, where="data options")

    @staticmethod
    def field_problems(name: str, value: Any) -> list[str]:
        """What is wrong with `value` for option `name`, each message starting with the field's name; empty when
        it is fine or `name` is not an option. The run config calls this per field (prefixing `data.`), so
        a YAML file and the Python API get the same checks and messages."""
        if name == "format" and value not in ("auto", *FORMATS):
            return [f"format: {value!r} is not one of auto, {', '.join(FORMATS)}"]
        if name == "template" and value not in ("auto", *BUILTIN_TEMPLATES):
            return [f"template: {value!r} is not one of auto, {', '.join(BUILTIN_TEMPLATES)}"]
        if name == "columns":
            return _column_problems(value)
        if name == "max_seq_len" and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
            return [f"max_seq_len: expected an integer >= 2, got {value!r}"]
        if name == "truncation" and value not in ("truncate", "drop"):
            return [f"truncation: {value!r} is not one of truncate, drop"]
        if name in ("train_on_prompt", "skip_bad_records") and not isinstance(value, bool):
            return [f"{name}: expected true or false, got {value!r}"]
        if name == "packing" and value is not None and not isinstance(value, bool):
            return [f"packing: expected true, false or null, got {value!r}"]
        if name == "max_drop_fraction" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                            or not math.isfinite(value) or not 0 <= value <= 1):
            return [f"max_drop_fraction: expected a number in [0, 1], got {value!r}"]
        return []

    def packing_for(self, fmt: str) -> bool:
        """Whether to pack data of format `fmt` (resolves packing=None)."""
        return fmt == "text" if self.packing is None else self.packing


def _column_problems(columns: Any) -> list[str]:
    if not isinstance(columns, Mapping):
        return [f"columns: expected a mapping of canonical key to column name, got {columns!r}"]
    problems = []
    for k, v in columns.items():
        if k not in CANONICAL_KEYS:
            close = difflib.get_close_matches(str(k), CANONICAL_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"columns: unknown key {k!r}{hint}; mappable: {', '.join(CANONICAL_KEYS)}")
        if not isinstance(v, str) or not v:
            problems.append(f"columns[{k!r}]: expected a non-empty column name, got {v!r}")
    return problems
