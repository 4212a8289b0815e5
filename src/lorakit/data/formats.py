"""Record formats (alpaca, messages, sharegpt, text): detection, column mapping, validation, normalisation.

Every format is normalised to one of two internal shapes, so templates and everything after them deal
with exactly two cases: a `Conversation` (turns with role system/user/assistant) or a plain `str` (raw
text for continued pre-training).

Validation is strict and says why, because the alternative is silent loss: LLaMA-Factory drops rows
that break role alternation with one log line each, and one user lost 35% of a dataset that way. Each
problem raises `BadRecord` with a reason code; the caller stops the run or skips and counts.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

from .records import BadRecord

FORMATS = ("alpaca", "messages", "sharegpt", "text")
Role = Literal["system", "user", "assistant"]
ROLES = ("system", "user", "assistant")
# ShareGPT `from` tags (and the OpenAI names, which ShareGPT exports also use) to our roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
# Canonical key names that `columns` may remap: format keys, and the keys inside a turn.
CANONICAL_KEYS = ("instruction", "input", "output", "system", "history", "messages", "conversations", "text",
                  "role", "content", "from", "value")


@dataclass(frozen=True)
class Turn:
    """One message. `content` is the exact text; templates decide the markup around it."""

    role: Role
    content: str


Conversation = tuple[Turn, ...]
Normalised = Union[Conversation, str]


def detect_format(record: Mapping[str, Any], columns: Mapping[str, str] | None = None) -> str | None:
    """The format a record looks like from its keys (after column mapping), or None if it fits none.

    Order matters only for records with several telling keys: a chat list wins over alpaca over text.
    """
    keys = set(record)
    col = column_names(columns)
    if col["messages"] in keys:
        return "messages"
    if col["conversations"] in keys:
        return "sharegpt"
    if col["instruction"] in keys and col["output"] in keys:
        return "alpaca"
    if col["text"] in keys:
        return "text"
    return None


def describe_keys(columns: Mapping[str, str] | None = None) -> str:
    """What detection looks for, for error messages."""
    col = column_names(columns)
    return (f"'{col['messages']}' (messages), '{col['conversations']}' (sharegpt), "
            f"'{col['instruction']}'+'{col['output']}' (alpaca) or '{col['text']}' (text)")


def normalise(record: Mapping[str, Any], fmt: str, columns: Mapping[str, str] | None = None) -> Normalised:
    """Validate `record` as format `fmt` and return a Conversation (chat formats) or str (text)."""
    col = column_names(columns)
    if fmt == "text":
        text = _required_str(record, col["text"])
        if not text.strip():
            raise BadRecord("empty_text", f"'{col['text']}' is empty or whitespace")
        return text
    if fmt == "alpaca":
        turns = _alpaca(record, col)
    elif fmt in ("messages", "sharegpt"):
        key = col["messages"] if fmt == "messages" else col["conversations"]
        turns = turn_list(record, key, col)
    else:
        raise BadRecord("unknown_format", f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    check_conversation(turns)
    return turns


def check_conversation(turns: Sequence[Turn]) -> None:
    """Role order: optional system first, then user/assistant alternating, starting with user, ending with
    assistant; no empty or whitespace-only assistant turn (it would teach the model to say nothing)."""
    body = list(turns)
    if body and body[0].role == "system":
        body = body[1:]
    for i, t in enumerate(body):
        n = i + 1 + (len(turns) - len(body))  # 1-based index in the original list
        if t.role == "system":
            raise BadRecord("bad_role_order", f"turn {n} is a system turn; only the first turn may be system")
        expected = "user" if i % 2 == 0 else "assistant"
        if t.role != expected:
            what = ("starts with assistant" if i == 0 else f"two {t.role} turns in a row (turns {n - 1} and {n})")
            raise BadRecord("bad_role_order", f"bad role order: {what}; expected user and assistant alternating, "
                                              "starting with user")
        if t.role == "assistant" and not t.content.strip():
            raise BadRecord("empty_assistant", f"turn {n} (assistant) is empty or whitespace")
    if not body:
        raise BadRecord("no_assistant_turn", "the conversation has no user/assistant turns")
    if body[-1].role != "assistant":
        raise BadRecord("bad_role_order", "the conversation ends with a user turn; the last turn must be assistant")


def column_names(columns: Mapping[str, str] | None) -> dict[str, str]:
    col = {k: k for k in CANONICAL_KEYS}
    for k, v in (columns or {}).items():
        if k not in col:
            close = difflib.get_close_matches(k, CANONICAL_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise BadRecord("bad_column_mapping",
                            f"columns maps unknown key {k!r}{hint}; mappable keys: {', '.join(CANONICAL_KEYS)}")
        col[k] = v
    return col


def _required_str(obj: Mapping[str, Any], key: str, where: str = "") -> str:
    if key not in obj:
        present = ", ".join(repr(k) for k in list(obj)[:8])
        raise BadRecord("missing_key", f"missing key {key!r}{where} (keys present: {present or 'none'})")
    value = obj[key]
    if not isinstance(value, str):
        raise BadRecord("content_not_string", f"{key!r}{where} is {_kind(value)}, expected a string")
    return value


def _optional_str(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRecord("content_not_string", f"{key!r} is {_kind(value)}, expected a string")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {list: "a list", dict: "an object", bool: "a boolean", str: "a string"}.get(type(value), "a number")


def maybe_json(value: Any) -> Any:
    """CSV and Parquet columns often hold a chat list as a JSON string; decode it when it looks like one."""
    if isinstance(value, str) and value.lstrip()[:1] == "[":
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRecord("malformed_json", f"JSON string in a column is malformed at column {e.colno}: {e.msg}") \
                from None
    return value


def _alpaca(record: Mapping[str, Any], col: Mapping[str, str]) -> Conversation:
    """instruction (+ input) -> user, output -> assistant; optional system; history as earlier pairs."""
    instruction = _required_str(record, col["instruction"])
    output = _required_str(record, col["output"])
    extra = _optional_str(record, col["input"])
    system = _optional_str(record, col["system"])
    turns: list[Turn] = [Turn("system", system)] if system else []
    history = maybe_json(record.get(col["history"]))
    if history is not None:
        if not isinstance(history, list):
            raise BadRecord("bad_history", f"{col['history']!r} is {_kind(history)}, expected [[user, assistant], ...]")
        for i, pair in enumerate(history, start=1):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise BadRecord("bad_history", f"{col['history']!r} item {i} is not a [user, assistant] pair")
            for role, text in zip(("user", "assistant"), pair):
                if not isinstance(text, str):
                    raise BadRecord("content_not_string", f"{col['history']!r} item {i} {role} is {_kind(text)}")
                turns.append(Turn(role, text))  # type: ignore[arg-type]
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    turns += [Turn("user", user), Turn("assistant", output)]
    return tuple(turns)


def turn_list(record: Mapping[str, Any], key: str, col: Mapping[str, str]) -> Conversation:
    """A list of turns; each turn may use OpenAI keys (role/content) or ShareGPT keys (from/value)."""
    if key not in record:
        present = ", ".join(repr(k) for k in list(record)[:8])
        raise BadRecord("missing_key", f"missing key {key!r} (keys present: {present or 'none'})")
    raw = maybe_json(record[key])
    if not isinstance(raw, list):
        raise BadRecord("bad_turns", f"{key!r} is {_kind(raw)}, expected a list of turns")
    turns = []
    for n, item in enumerate(raw, start=1):
        if not isinstance(item, Mapping):
            raise BadRecord("bad_turns", f"{key!r} turn {n} is {_kind(item)}, expected an object")
        if col["role"] in item:
            role_key, content_key, names = col["role"], col["content"], {r: r for r in ROLES}
        elif col["from"] in item:
            role_key, content_key, names = col["from"], col["value"], SHAREGPT_ROLES
        else:
            raise BadRecord("missing_key", f"{key!r} turn {n} has neither {col['role']!r} nor {col['from']!r} "
                                           f"(keys: {', '.join(map(repr, item)) or 'none'})")
        tag = item[role_key]
        if not isinstance(tag, str) or tag not in names:
            close = difflib.get_close_matches(str(tag), list(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise BadRecord("unknown_role", f"{key!r} turn {n} has unknown role {tag!r}{hint}; "
                                            f"expected one of {', '.join(names)}")
        content = _required_str(item, content_key, f" in {key!r} turn {n}")
        turns.append(Turn(names[tag], content))  # type: ignore[arg-type]
    return tuple(turns)
