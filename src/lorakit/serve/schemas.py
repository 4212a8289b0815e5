"""Request bodies, with OpenAI's field names and meanings. Unknown fields are refused rather than ignored
(an allowlist: nothing a client sends reaches the chat template or the engine unless named here), and
every bound is checked here so a bad request is a 400 naming its field, never a 500.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import APIError

MAX_STOP = 4  # OpenAI's own cap
MAX_STOP_CHARS = 64
MAX_MESSAGES = 1024
MAX_TOOLS = 128  # OpenAI's own cap on tools per request
MAX_N = 16  # choices per request
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
# JSON's "\ud800" escape decodes to a lone surrogate: not Unicode text, so a tokenizer (or the UTF-8 encoder of
# an error message that quotes it) fails on it. json.loads joins valid pairs, so any surrogate left is lone.
SURROGATE = re.compile("[\ud800-\udfff]")


class _Request(BaseModel):
    # strict: "5" is not a number and 1 is not true; forbid: a misspelt field is an error, not a silent default
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False
    """Send one more chunk before [DONE] with `usage` and no choices."""


class _Sampling(_Request):
    model: str = Field(min_length=1, max_length=256)
    """A served model id: the base model's name or a loaded adapter's (GET /v1/models)."""
    max_tokens: int | None = Field(default=None, ge=1)
    """New tokens to generate at most; the server's --max-tokens caps it."""
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    """0 picks the most likely token (greedy)."""
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: Union[str, list[str], None] = None
    """Up to 4 strings; generation ends before the first that appears."""
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    """Choices per request (sampled independently; all the same when greedy). With a seed, choice i uses seed + i."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    """Accepted for compatibility, ignored."""
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    """Subtracted once from the logit of each token already in the completion."""
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    """Subtracted from a token's logit once per time it is already in the completion."""
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0, allow_inf_nan=False)
    """vLLM's extension (transformers' rule): logits of tokens in the prompt or completion divided by it when
    positive, multiplied when negative; 1 is off."""

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
        return stops

    def stop_list(self) -> list[str]:
        return list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str
    echo: Literal[False] = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    """Log-probabilities of the chosen tokens and of this many most likely ones at each step (OpenAI's cap, 5)."""
    suffix: None = None

    def top_logprob_count(self) -> int | None:
        return self.logprobs


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str = Field(min_length=1, max_length=64)
    arguments: str
    """A JSON object, as a string (OpenAI's shape)."""

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments):
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError as err:
            raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(value, dict):
            raise ValueError("must be a JSON object")
        return arguments


class ToolCall(_Request):
    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    """Required but on an assistant message that calls tools."""
    name: str | None = Field(default=None, max_length=64)
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOLS)
    """An assistant message's calls, sent back with their results in the next request."""
    tool_call_id: str | None = Field(default=None, max_length=128)
    """A tool message: the call it answers."""

    @model_validator(mode="after")
    def _shape(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only on an assistant message with tool_calls)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates take it: arguments as objects (Qwen's writes them with tojson)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": json.loads(c.function.arguments)}} for c in self.tool_calls]
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if self.name:
            out["name"] = self.name
        return out


class FunctionSpec(_Request):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = Field(default=None, max_length=4096)
    parameters: dict[str, Any] | None = None
    """A JSON Schema of the arguments object."""
    strict: bool | None = None


class ToolSpec(_Request):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Request):
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Request):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = Field(default=None, max_length=4096)
    json_schema: dict[str, Any] = Field(alias="schema")
    """The JSON Schema the reply must validate against."""
    strict: bool | None = None
    """Accepted: the schema is always enforced."""


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only then")
        return self

    def required_schema(self) -> dict[str, Any] | None:
        """The schema the reply must follow; None for plain text."""
        if self.type == "json_object":
            return {"type": "object"}
        return self.json_schema.json_schema if self.json_schema is not None else None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """The newer name of max_tokens; max_tokens wins when both are given."""
    logprobs: bool | None = None
    """Return the model's log-probability of each generated token."""
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    """With logprobs: also this many most likely tokens at each step."""
    tools: list[ToolSpec] | None = Field(default=None, max_length=MAX_TOOLS)
    """Functions the model may call; rendered into the prompt by the model's chat template."""
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    """auto (the default with tools): the model decides; none: no tools this time; required: the reply is one or
    more calls; a named function: the reply is one call of it. required and named are enforced by constrained
    decoding, the arguments valid against the function's parameters schema."""
    parallel_tool_calls: bool | None = None
    """Accepted; the model's template decides how many calls a reply may hold."""
    response_format: ResponseFormat | None = None
    """json_object: the reply is a JSON object; json_schema: a JSON value valid against the schema. Enforced by
    constrained decoding, so the reply always parses."""

    def top_logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        forced = self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)
        if forced and not self.tools:
            raise ValueError("tool_choice: 'required' or a named function needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in {
                t.function.name for t in self.tools or []}:
            raise ValueError(f"tool_choice: the function {self.tool_choice.function.name!r} is not in tools")
        if forced and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format: give either a forced tool_choice or a response format, not both")
        names = [t.function.name for t in self.tools or []]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"tools: the function name {repeated[0]!r} is given twice")
        return self


class AdapterLoadRequest(_Request):
    name: str = Field(pattern=NAME_PATTERN)
    """The adapter's model id in requests: letters, digits, '_', '-'; 64 characters at most."""
    path: str | None = Field(default=None, min_length=1, max_length=512)
    """A relative path inside --adapter-dir; default: the name."""


def _no_constants(value: str):
    raise ValueError(f"{value} is not valid JSON")


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """JSON bytes -> `model`, or an APIError 400 that names the offending field."""
    try:
        data = json.loads(raw, parse_constant=_no_constants)  # NaN / Infinity are not JSON
    except (ValueError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise APIError(400, f"The request body is not valid JSON: {reason}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    _refuse_surrogates(data)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown field; this server does not support it"
        problem = f"{param}: {message}" if param else message
        more = len(err.errors()) - 1
        if more:
            problem += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise APIError(400, problem, param=param, code="invalid_value") from None


def _refuse_surrogates(data: dict) -> None:
    """400 naming the first string (field value or field name, at any depth) that holds a lone surrogate."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if SURROGATE.search(value):
                raise APIError(400, f"{path}: the string holds a lone UTF-16 surrogate (such as \\ud800 without its "
                                    "pair), which is not valid Unicode text", param=path, code="invalid_value")
        elif isinstance(value, dict):
            for key in value:
                if SURROGATE.search(key):
                    where = f"a field name in {path}" if path else "a field name"
                    raise APIError(400, f"{where} holds a lone UTF-16 surrogate, which is not valid Unicode text",
                                   param=path or None, code="invalid_value")
            stack.extend((f"{path}.{k}" if path else k, v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}", v) for i, v in reversed(list(enumerate(value))))
