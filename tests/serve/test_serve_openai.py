"""The official openai client, unchanged, against `lorakit serve`'s app: every answer equals the engine's own
greedy output for the same prompt and adapter, streamed or not, with the right usage counts."""

from __future__ import annotations

import httpx
import pytest
from serve_helpers import PROMPTS, greedy, served, sse_events, tiny_dirs  # noqa: F401  (fixtures)

MODELS = [None, "alpha"]  # the base model and a startup adapter


def _model(served, adapter):
    return adapter or "tiny-llama"


def test_models_list_shows_base_and_adapters(served):
    ids = [m.id for m in served.client().models.list().data]
    assert ids == ["tiny-llama", "alpha"]
    assert served.client().models.retrieve("alpha").id == "alpha"


@pytest.mark.parametrize("adapter", MODELS, ids=["base", "alpha"])
def test_completion_equals_engine_greedy_output(served, adapter):
    client = served.client()
    for prompt in PROMPTS:
        text, finish, usage = greedy(served.engine, served.tokenizer, prompt, adapter, 12)
        out = client.completions.create(model=_model(served, adapter), prompt=prompt, max_tokens=12, temperature=0)
        assert out.choices[0].text == text
        assert out.choices[0].finish_reason == finish
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)
        assert out.usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert out.model == _model(served, adapter)


def test_adapter_changes_the_output(served):
    """Sanity check of the fixture: a random adapter must not echo the base, or the equality tests prove little."""
    base = [greedy(served.engine, served.tokenizer, p, None, 12)[0] for p in PROMPTS]
    alpha = [greedy(served.engine, served.tokenizer, p, "alpha", 12)[0] for p in PROMPTS]
    assert base != alpha


@pytest.mark.parametrize("adapter", MODELS, ids=["base", "alpha"])
def test_streamed_completion_concatenates_to_greedy_output(served, adapter):
    text, finish, usage = greedy(served.engine, served.tokenizer, PROMPTS[0], adapter, 12)
    stream = served.client().completions.create(model=_model(served, adapter), prompt=PROMPTS[0], max_tokens=12,
                                                stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [finish]
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens


@pytest.mark.parametrize("adapter", MODELS, ids=["base", "alpha"])
def test_chat_completion_uses_chat_template(served, adapter):
    text, finish, usage = greedy(served.engine, served.tokenizer, PROMPTS[1], adapter, 10, chat=True)
    out = served.client().chat.completions.create(model=_model(served, adapter), max_tokens=10,
                                                  messages=[{"role": "user", "content": PROMPTS[1]}])
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == text
    assert out.choices[0].finish_reason == finish
    assert out.usage.prompt_tokens == usage.prompt_tokens
    assert out.usage.completion_tokens == usage.completion_tokens


def test_streamed_chat_completion(served):
    text, finish, _ = greedy(served.engine, served.tokenizer, PROMPTS[2], "alpha", 10, chat=True)
    stream = served.client().chat.completions.create(model="alpha", max_tokens=10, stream=True,
                                                     messages=[{"role": "user", "content": PROMPTS[2]}])
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish


def test_stream_is_sse_ending_with_done(served):
    with httpx.stream("POST", served.url + "/v1/completions", timeout=30,
                      json={"model": "tiny-llama", "prompt": PROMPTS[0], "max_tokens": 5, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "text_completion" for e in events[:-1])


def test_sampling_fields_and_stop_reach_the_engine(served):
    """A stop string cuts the text before it; seeded sampling is reproducible."""
    full, _, _ = greedy(served.engine, served.tokenizer, PROMPTS[0], None, 12)
    stop = full[3:6] if len(full) >= 6 else None
    client = served.client()
    if stop:
        out = client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=12, stop=[stop])
        assert out.choices[0].text == full[: full.index(stop)]
        assert out.choices[0].finish_reason == "stop"
    a, b = (client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=8, temperature=1.0,
                                      top_p=0.9, seed=7).choices[0].text for _ in range(2))
    assert a == b


def test_health_and_metrics(served):
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}
    m = httpx.get(served.url + "/metrics").json()
    for key in ("requests_total", "tokens_generated", "queue_length", "per_adapter", "server", "http_status"):
        assert key in m
    assert m["http_status"].get("200", 0) > 0
