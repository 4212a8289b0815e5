"""Tool calling through the server, with the official openai client: a round trip (the call, then the answer to its
result), streamed and not, on a tiny Llama trained here until it answers a tool conversation word for word; and the
parsing of both call syntaxes (Hermes <tool_call>, Llama 3.1 JSON) on their own, a stream cut anywhere included."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest
import torch
import trl
from data_helpers import build_tokenizer
from serve_helpers import run_server, served, tiny_dirs  # noqa: F401  (fixtures)

from lorakit.data import chat_tools, normalise, resolve_template, tokenize_conversation
from lorakit.serve import tools

TEMPLATES = Path(trl.__file__).parent / "chat_templates"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
QUESTION = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the weather in Paris?"}]
RESULT = '{"sky": "sunny", "celsius": 21}'
ANSWER = "It is sunny in Paris, 21 degrees."


# ---- parsing ---------------------------------------------------------------------------------------------
def test_hermes_calls_are_read_with_the_text_before_them():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    parsed = tools.parse(text, "hermes", ["get_weather"])
    assert parsed.content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls] == \
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in parsed.tool_calls)
    assert len({c["id"] for c in parsed.tool_calls}) == 2


def test_llama31_json_call_is_read():
    parsed = tools.parse('{"name": "get_weather", "parameters": {"city": "Paris"}}', "llama3_json", ["get_weather"])
    assert parsed.content is None and json.loads(parsed.tool_calls[0]["function"]["arguments"]) == {"city": "Paris"}


@pytest.mark.parametrize("syntax, text", [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),  # cut by max_tokens
    ("hermes", '<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>'),  # not offered
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": "Paris"}\n</tool_call>'),  # not an object
    ("llama3_json", '{"answer": 42}'),
    ("llama3_json", "The weather is fine."),
])
def test_what_is_not_a_whole_offered_call_stays_text(syntax, text):
    assert tools.parse(text, syntax, ["get_weather"]) == tools.Parsed(text, [])


@pytest.mark.parametrize("syntax, text", [
    ("hermes", 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
    ("hermes", "No call here, just <tool text and a < sign."),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    ("llama3_json", "Plain text {with braces}."),
])
def test_a_stream_cut_anywhere_gives_what_the_whole_text_gives(syntax, text):
    whole = tools.parse(text, syntax, ["get_weather"])
    for cut in range(1, len(text)):
        stream = tools.ToolStream(syntax, ["get_weather"])
        sent = stream.feed(text[:cut]) + stream.feed(text[cut:])
        rest, calls = stream.finish()
        assert [c["function"] for c in calls] == [c["function"] for c in whole.tool_calls]
        assert (sent + rest).strip() == (whole.content or "").strip()
        assert tools.HERMES_OPEN not in sent or not calls


# ---- the server ------------------------------------------------------------------------------------------
def _conversation(call_id: str = "call_1") -> dict:
    call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    return {"tools": [WEATHER], "messages": [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},
                                             {"role": "tool", "tool_call_id": call_id, "content": RESULT},
                                             {"role": "assistant", "content": ANSWER}]}


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    """A tiny Llama with Qwen2.5's template, trained (all weights) on one tool conversation until its greedy
    answers are that conversation's: first the call, then, given the result, the answer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer((TEMPLATES / "qwen2_5.jinja").read_text())
    tokenizer.eos_token = "<|im_end|>"  # as Qwen's
    record = _conversation()
    turns = normalise(record, "messages")
    example = tokenize_conversation(turns, tokenizer, resolve_template(tokenizer), tools=chat_tools(record, turns))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                         max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id))
    ids, labels = torch.tensor([example.input_ids]), torch.tensor([example.labels])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(400):
        loss = model(input_ids=ids, labels=labels).loss
        if loss.item() < 0.005:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.005, f"the tiny model did not learn the conversation (loss {loss.item():.4f})"
    directory = tmp_path_factory.mktemp("tool-llama")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tool_server(tool_model):
    from lorakit.serve.server import ServeOptions, build

    engine, app = build(ServeOptions(model=str(tool_model), dtype="float32", device="cpu", max_batch_size=4,
                                     max_queue=16, max_prompt_tokens=1024, max_tokens=96), log_fn=lambda _: None)
    try:
        with run_server(app) as url:
            yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    finally:
        engine.close()


def _model(client) -> str:
    return client.models.list().data[0].id


def test_tool_call_round_trip(tool_server):
    client = tool_server
    first = client.chat.completions.create(model=_model(client), messages=QUESTION, tools=[WEATHER])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # the call goes back as the client library shapes it, with its result
    messages = [*QUESTION, choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": RESULT}]
    second = client.chat.completions.create(model=_model(client), messages=messages, tools=[WEATHER])
    assert second.choices[0].message.content == ANSWER and second.choices[0].finish_reason == "stop"
    assert not second.choices[0].message.tool_calls


def test_streamed_tool_call(tool_server):
    client = tool_server
    chunks = list(client.chat.completions.create(model=_model(client), messages=QUESTION, tools=[WEATHER],
                                                 stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == ""  # the call is not leaked as text
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == \
        [(0, "get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_") and calls[0].type == "function"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_leaves_the_tools_out(tool_server):
    """With tool_choice none the prompt has no tools, and no text is read as a call."""
    client = tool_server
    out = client.chat.completions.create(model=_model(client), messages=QUESTION, tools=[WEATHER], tool_choice="none",
                                         max_tokens=8)
    assert not out.choices[0].message.tool_calls and out.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("extra, says", [
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "'get_time' is not in tools"),
    ({"tool_choice": "required", "tools": None}, "'required' or a named function needs tools"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "not both"),
    ({"response_format": {"type": "json_schema"}}, "json_schema is required with type json_schema"),
    ({"tools": [WEATHER, WEATHER]}, "the function name 'get_weather' is given twice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"messages": [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris}"}}]}]},
     "arguments: not valid JSON"),
    ({"messages": [{"role": "user", "content": None}]}, "content is required"),
])
def test_bad_tool_requests_are_400_naming_the_field(tool_server, extra, says):
    client = tool_server
    body = {"model": _model(client), "messages": QUESTION, "tools": [WEATHER], **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{k: v for k, v in body.items() if v is not None})
    assert says in str(e.value), str(e.value)


def test_tools_on_a_model_without_tool_syntax_are_refused(served):
    with pytest.raises(openai.BadRequestError, match="has no tool-call syntax"):
        served.client().chat.completions.create(model="tiny-llama", messages=QUESTION, tools=[WEATHER])


# ---- constrained decoding: forced calls and structured output ------------------------------------------------
STRICT_WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}}, "required": ["city"],
    "additionalProperties": False}}}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_a_forced_tool_choice_makes_a_valid_call_where_the_model_would_answer(tool_server, choice):
    """After the tool's result the trained model answers in text; tool_choice required (or naming the function)
    holds it to a call whose arguments validate against the function's schema."""
    client = tool_server
    messages = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": RESULT}]
    free = client.chat.completions.create(model=_model(client), messages=messages, tools=[WEATHER])
    assert free.choices[0].message.content == ANSWER and not free.choices[0].message.tool_calls
    # forced, with a stricter schema for the arguments (an enum of cities)
    forced = client.chat.completions.create(model=_model(client), messages=messages, tools=[STRICT_WEATHER],
                                            tool_choice=choice)
    assert forced.choices[0].finish_reason == "tool_calls"
    (call,) = forced.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), STRICT_WEATHER["function"]["parameters"])


RECORD = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "tag": {"enum": ["a", "b"]}},
          "required": ["n", "tag"], "additionalProperties": False}  # at most 18 characters: within max_tokens 32


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_structured_output_always_parses_and_validates(served, stream):
    """A random tiny model writes no JSON by itself; with response_format json_schema every reply validates."""
    client = served.client()
    prompts = ["hello world, how are you", "What is two plus two?", "say hi"]
    fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": RECORD, "strict": True}}
    for i, prompt in enumerate(prompts):
        kw = dict(model="alpha", messages=[{"role": "user", "content": prompt}], max_tokens=32, temperature=1.0,
                  seed=i)
        free = client.chat.completions.create(**kw).choices[0].message.content
        with pytest.raises(ValueError):
            json.loads(free)
        if stream:
            chunks = list(client.chat.completions.create(response_format=fmt, stream=True, **kw))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = chunks[-1].choices[0].finish_reason
        else:
            out = client.chat.completions.create(response_format=fmt, **kw)
            text, finish = out.choices[0].message.content, out.choices[0].finish_reason
        jsonschema.validate(json.loads(text), RECORD)
        assert finish == "stop"
    # any JSON object: a random model may still be inside one when max_tokens ends it ("length")
    for seed in range(4):
        obj = client.chat.completions.create(response_format={"type": "json_object"}, max_tokens=32, seed=seed,
                                             temperature=1.0, model="alpha",
                                             messages=[{"role": "user", "content": prompts[0]}]).choices[0]
        assert obj.message.content.startswith("{")
        if obj.finish_reason == "stop":
            assert isinstance(json.loads(obj.message.content), dict)


def test_an_invalid_schema_is_400(served):
    fmt = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "objec"}}}
    with pytest.raises(openai.BadRequestError, match="objec"):
        served.client().chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                                response_format=fmt)
