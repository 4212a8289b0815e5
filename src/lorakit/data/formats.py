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
Role = Literal["system", "user", "assistant", "tool"]
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT `from` tags (and the OpenAI names, which ShareGPT exports also use) to our roles. LLaMA-Factory's
# `function_call` turn is an assistant turn that calls tools, its `observation` the tools' results.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool"}
# Canonical key names that `columns` may remap: format keys, and the keys inside a turn.
CANONICAL_KEYS = ("instruction", "input", "output", "system", "history", "messages", "conversations", "text",
                  "role", "content", "from", "value", "tools")


@dataclass(frozen=True)
class ToolCall:
    """One function call an assistant turn makes: the function's name and its arguments (a JSON object)."""

    name: str
    arguments: Mapping[str, Any]
    id: str | None = None


@dataclass(frozen=True)
class Turn:
    """One message. `content` is the exact text; templates decide the markup around it. An assistant turn may
    carry `tool_calls` (its content may then be empty) and `reasoning` (rendered by templates that know
    reasoning_content, e.g. in think tags); a tool turn holds one tool's result, `name` and `tool_call_id`
    saying which call it answers when the data says so."""

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    reasoning: str = ""
    name: str | None = None
    tool_call_id: str | None = None

    @property
    def uses_tools(self) -> bool:
        """Whether the turn calls tools, is a tool's result, or carries reasoning: what only tool-aware templates
        render."""
        return bool(self.tool_calls or self.reasoning or self.role == "tool")


Conversation = tuple[Turn, ...]
Normalised = Union[Conversation, str]
Tools = tuple[Mapping[str, Any], ...]  # OpenAI-style tool specs: {"type": "function", "function": {name, ...}}


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
    assistant. An assistant turn that calls tools is followed by one or more tool turns (the results), then by
    the assistant again; tool turns come only there. No empty assistant turn unless it calls a tool (it would
    teach the model to say nothing)."""
    body = list(turns)
    offset = 1 if body and body[0].role == "system" else 0
    body = body[offset:]
    expected = "user"
    for i, t in enumerate(body):
        n = i + 1 + offset  # 1-based index in the original list
        if t.role == "system":
            raise BadRecord("bad_role_order", f"turn {n} is a system turn; only the first turn may be system")
        previous = body[i - 1] if i else None
        if t.role == "tool":
            if previous is None or not (previous.tool_calls or previous.role == "tool"):
                raise BadRecord("bad_role_order", f"turn {n} is a tool result, but the turn before it calls no tool; "
                                                  "tool turns follow an assistant turn with tool_calls")
            continue
        if previous is not None and previous.tool_calls and t.role != "tool":
            raise BadRecord("bad_role_order", f"assistant turn {n - 1} calls a tool, but turn {n} ({t.role}) is not "
                                              "its result; put a tool turn after each call")
        if previous is not None and previous.role == "tool":
            if t.role != "assistant":
                raise BadRecord("bad_role_order", f"turn {n} is a {t.role} turn right after a tool result; the "
                                                  "assistant answers the results first")
            expected = "assistant"  # after the results, the assistant goes on
        if t.role != expected:
            what = ("starts with assistant" if i == 0 else f"two {t.role} turns in a row (turns {n - 1} and {n})")
            raise BadRecord("bad_role_order", f"bad role order: {what}; expected user and assistant alternating, "
                                              "starting with user")
        if t.role == "assistant" and not t.content.strip() and not t.tool_calls:
            raise BadRecord("empty_assistant", f"turn {n} (assistant) is empty or whitespace")
        expected = "assistant" if t.role == "user" else "user"
    if not body:
        raise BadRecord("no_assistant_turn", "the conversation has no user/assistant turns")
    if body[-1].role != "assistant":
        last = "a tool result" if body[-1].role == "tool" else "a user turn"
        raise BadRecord("bad_role_order", f"the conversation ends with {last}; the last turn must be assistant")


def chat_tools(record: Mapping[str, Any], turns: Sequence[Turn], columns: Mapping[str, str] | None = None) -> Tools:
    """The record's tool list (`tools`: OpenAI specs, or bare {name, parameters} objects, or a JSON string of
    either list), each as {"type": "function", "function": {...}}; and every tool call in `turns` must name one
    of them, since a model trained to call a tool it was not shown learns to invent tools."""
    key = column_names(columns)["tools"]
    raw = maybe_json(record.get(key))
    tools: list[Mapping[str, Any]] = []
    if raw is not None:
        if not isinstance(raw, list):
            raise BadRecord("bad_tools", f"{key!r} is {_kind(raw)}, expected a list of tool specs")
        for n, spec in enumerate(raw, start=1):
            function = spec.get("function", spec) if isinstance(spec, Mapping) else None
            if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
                raise BadRecord("bad_tools", f"{key!r} item {n} is not a tool spec: expected {{\"type\": \"function\", "
                                             "\"function\": {\"name\": ..., \"parameters\": {...}}}")
            tools.append({"type": "function", "function": dict(function)})
    names = [t["function"]["name"] for t in tools]
    for n, turn in enumerate(turns, start=1):
        for call in turn.tool_calls:
            if call.name not in names:
                listed = f"its tools are {', '.join(map(repr, names))}" if names else f"the record has no {key!r} list"
                raise BadRecord("unknown_tool", f"turn {n} calls tool {call.name!r}, which is not in the record's "
                                                f"tool list ({listed})")
    return tuple(tools)


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
    """A list of turns; each turn may use OpenAI keys (role/content, tool_calls, reasoning_content, tool_call_id)
    or ShareGPT keys (from/value, with LLaMA-Factory's function_call and observation turns)."""
    if key not in record:
        present = ", ".join(repr(k) for k in list(record)[:8])
        raise BadRecord("missing_key", f"missing key {key!r} (keys present: {present or 'none'})")
    raw = maybe_json(record[key])
    if not isinstance(raw, list):
        raise BadRecord("bad_turns", f"{key!r} is {_kind(raw)}, expected a list of turns")
    return tuple(_turn(item, key, n, col) for n, item in enumerate(raw, start=1))


def _turn(item: Any, key: str, n: int, col: Mapping[str, str]) -> Turn:
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
    where = f" in {key!r} turn {n}"
    role = names[tag]
    if tag == "function_call":  # ShareGPT: the value is the call (or a list of calls) as JSON
        value = _required_str(item, content_key, where)
        try:
            calls = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRecord("bad_tool_call", f"function_call{where} is not valid JSON (column {e.colno}: {e.msg})") \
                from None
        calls = calls if isinstance(calls, list) else [calls]
        return Turn("assistant", "", tuple(_tool_call(c, f"{where} call {i}") for i, c in enumerate(calls, 1)))
    raw_calls = item.get("tool_calls")
    if raw_calls is not None and role != "assistant":
        raise BadRecord("bad_tool_call", f"{key!r} turn {n} is a {role} turn with tool_calls; only assistant turns "
                                         "call tools")
    if raw_calls is not None and not isinstance(raw_calls, list):
        raise BadRecord("bad_tool_call", f"tool_calls{where} is {_kind(raw_calls)}, expected a list")
    calls = tuple(_tool_call(c, f"{where} call {i}") for i, c in enumerate(raw_calls or [], 1))
    content = item.get(content_key)
    if content is None and calls:
        content = ""  # OpenAI: an assistant message that only calls tools has content null (or none)
    if role == "tool" and isinstance(content, (Mapping, list)):
        content = json.dumps(content, ensure_ascii=False)  # a structured result, as the tool returned it
    if content is None and content_key not in item:
        raise BadRecord("missing_key", f"missing key {content_key!r}{where} (keys present: "
                                       f"{', '.join(repr(k) for k in list(item)[:8])})")
    if not isinstance(content, str):
        raise BadRecord("content_not_string", f"{content_key!r}{where} is {_kind(content)}, expected a string")
    reasoning = item.get("reasoning_content", item.get("reasoning"))
    if reasoning is not None and (role != "assistant" or not isinstance(reasoning, str)):
        raise BadRecord("bad_reasoning", f"reasoning{where} must be a string on an assistant turn")
    extra = {k: item[k] for k in ("name", "tool_call_id") if role == "tool" and isinstance(item.get(k), str)}
    return Turn(role, content, calls, reasoning or "", **extra)  # type: ignore[arg-type]


def _tool_call(raw: Any, where: str) -> ToolCall:
    """One call, OpenAI style ({"type": "function", "function": {"name", "arguments"}, "id"}) or bare ({"name",
    "arguments"}); arguments a JSON object or a string holding one."""
    function = raw.get("function", raw) if isinstance(raw, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
        raise BadRecord("bad_tool_call", f"tool call{where} has no function name: expected {{\"function\": "
                                         "{\"name\": ..., \"arguments\": {...}}}")
    arguments = function.get("arguments", function.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise BadRecord("bad_tool_arguments", f"the arguments of tool call {function['name']!r}{where} are not "
                                                  f"valid JSON (column {e.colno}: {e.msg})") from None
    if not isinstance(arguments, Mapping):
        raise BadRecord("bad_tool_arguments", f"the arguments of tool call {function['name']!r}{where} are "
                                              f"{_kind(arguments)}, expected a JSON object")
    call_id = raw.get("id") if isinstance(raw.get("id"), str) else None
    return ToolCall(function["name"], dict(arguments), call_id)
