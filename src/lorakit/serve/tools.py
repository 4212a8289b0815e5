"""Tool calls in chat completions: which syntax the model writes them in, and reading them out of its text.

A model writes a call in the syntax its chat template taught it; the template says which (`syntax_of`):
- `hermes`: Qwen2.5 / Qwen3 / Hermes, `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block
  per call, after any text;
- `llama3_json`: Llama 3.1 / 3.2, the whole reply one JSON object `{"name": ..., "parameters": {...}}`.
What parses is returned as OpenAI `tool_calls` (arguments as a JSON string) with finish_reason `tool_calls`; what
does not (broken JSON, a tool the request did not offer) stays text, as the model wrote it, so nothing is lost.
`ToolStream` does the same on a stream: text before a call is sent as it comes, the call itself once it is whole.
`call_grammar` is the grammar of a reply that is only calls (tool_choice required, or a named function), in the
same syntax, for constrained decoding: the arguments valid against each function's parameters schema.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
HERMES_BLOCK = re.compile(re.escape(HERMES_OPEN) + r"(.*?)(?:" + re.escape(HERMES_CLOSE) + r"|\Z)", re.DOTALL)


def syntax_of(chat_template: str | None) -> str | None:
    """The tool-call syntax a chat template renders calls in, or None when it renders none."""
    if not chat_template:
        return None
    if HERMES_OPEN in chat_template:
        return "hermes"
    if '"parameters": ' in chat_template and "ipython" in chat_template:
        return "llama3_json"
    return None


# The separators of json.dumps, which templates' tojson writes: the calls a model was trained on look like this.
JSON_STYLE = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


def call_grammar(syntax: str, tool_specs: list[dict], only: str | None = None) -> str:
    """A Lark grammar (llguidance's, `%json` inline) of a reply made of calls of the offered tools (`only`: one call
    of that one), each `{"name": ..., "arguments" | "parameters": ...}` with arguments valid against its schema."""
    key = "parameters" if syntax == "llama3_json" else "arguments"
    calls = [{"type": "object", "properties": {"name": {"const": spec["function"]["name"]},
                                               key: spec["function"].get("parameters") or {"type": "object"}},
              "required": ["name", key], "additionalProperties": False}
             for spec in tool_specs if only is None or spec["function"]["name"] == only]
    schema = json.dumps({"anyOf": calls, "x-guidance": JSON_STYLE} if len(calls) > 1 else
                        {**calls[0], "x-guidance": JSON_STYLE})
    if syntax == "llama3_json":
        return f"start: %json {schema}\n"
    repeat = "" if only else ' ("\\n" block)*'
    return (f'start: block{repeat}\nblock: "{HERMES_OPEN}\\n" call "\\n{HERMES_CLOSE}"\n'
            f"call: %json {schema}\n")


@dataclass(frozen=True)
class Parsed:
    content: str | None  # the text outside the calls; None when there is none
    tool_calls: list[dict]


def parse(text: str, syntax: str, tool_names: Iterable[str]) -> Parsed:
    """The calls in a whole reply, as OpenAI `tool_calls`; the reply unchanged as content when none parses."""
    names = set(tool_names)
    if syntax == "hermes" and HERMES_OPEN in text:
        calls = [_call(block.group(1), names, "arguments") for block in HERMES_BLOCK.finditer(text)]
        if calls and all(calls):
            before = text[:text.index(HERMES_OPEN)].strip()
            return Parsed(before or None, calls)  # type: ignore[arg-type]
    elif syntax == "llama3_json" and text.lstrip().startswith("{"):
        call = _call(text, names, "parameters")
        if call:
            return Parsed(None, [call])
    return Parsed(text, [])


def _call(raw: str, names: set[str], key: str) -> dict | None:
    try:
        obj = json.loads(raw.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    arguments = obj.get(key, obj.get("arguments", {}))
    if not isinstance(arguments, dict):
        return None
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}


class ToolStream:
    """Stream text while it cannot be part of a call; hold what may be one, and read it at the end.

    hermes: everything before `<tool_call>` is text (a tail that could be the start of the marker is held back);
    from the marker on, the rest is held. llama3_json: a reply whose first non-blank character is `{` is held
    whole. `finish()` parses what was held: calls, or the held text when it is not a call after all.
    """

    def __init__(self, syntax: str, tool_names: Iterable[str]):
        self.syntax, self.names = syntax, list(tool_names)
        self.text, self.sent, self.holding = "", 0, False

    def feed(self, delta: str) -> str:
        """The part of the reply so far that is safe to send as text now."""
        self.text += delta
        if self.holding:
            return ""
        if self.syntax == "llama3_json":
            start = self.text.lstrip()
            if not start:
                return ""
            self.holding = start.startswith("{") and self.sent == 0
            return "" if self.holding else self._send(len(self.text))
        at = self.text.find(HERMES_OPEN, self.sent)
        if at >= 0:
            self.holding = True
            return self._send(at)
        keep = next((k for k in range(len(HERMES_OPEN) - 1, 0, -1) if self.text.endswith(HERMES_OPEN[:k])), 0)
        return self._send(len(self.text) - keep)

    def finish(self) -> tuple[str, list[dict]]:
        """(the text still to send, the calls) once the reply is complete."""
        held = self.text[self.sent:]
        if not self.holding:
            return held, []
        parsed = parse(held, self.syntax, self.names)  # held starts at the call: no text before it
        return ("", parsed.tool_calls) if parsed.tool_calls else (held, [])

    def _send(self, upto: int) -> str:
        out, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        return out
