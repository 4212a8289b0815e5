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
    """The base, the resident adapters, then those in --adapter-dir that a request would load on first use."""
    models = served.client().models.list().data
    assert [m.id for m in models][:2] == ["tiny-llama", "alpha"] and models[1].loaded
    assert [(m.id, m.loaded, m.parent) for m in models if m.id == "beta"] == [("beta", False, "tiny-llama")]
    assert served.client().models.retrieve("alpha").id == "alpha"
    assert served.client().models.retrieve("beta").loaded is False


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


def _engine_run(served, prompt: str, adapter, **params):
    """The engine's own output for a chat prompt submitted alone with these SamplingParams: (text, events)."""
    from lorakit.infer import SamplingParams

    text = served.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=False)
    ids = served.tokenizer(text, add_special_tokens=False)["input_ids"]
    events = list(served.engine.submit(list(ids), adapter, SamplingParams(**params)))
    return "".join(e.text for e in events), events


def test_chat_logprobs_are_the_models_own_log_softmax(served):
    """logprobs / top_logprobs: each generated token's log-softmax and the k most likely tokens, as the engine's
    model computes them (the engine's own test compares those with a plain forward)."""
    out = served.client().chat.completions.create(model="alpha", messages=[{"role": "user", "content": PROMPTS[1]}],
                                                  max_tokens=8, logprobs=True, top_logprobs=3)
    text, events = _engine_run(served, PROMPTS[1], "alpha", max_tokens=8, logprobs=3)
    content = out.choices[0].logprobs.content
    assert out.choices[0].message.content == text
    assert [c.logprob for c in content] == pytest.approx([x for e in events for x in e.model_logprobs], abs=1e-6)
    assert [c.token for c in content] == [served.tokenizer.decode([t]) for e in events for t in e.token_ids]
    for c, alts in zip(content, [a for e in events for a in e.top_logprobs]):
        assert [t.token for t in c.top_logprobs] == [served.tokenizer.decode([t]) for t, _ in alts]
        assert c.top_logprobs[0].logprob >= c.logprob - 1e-6 and bytes(c.bytes) == c.token.encode()
    plain = served.client().chat.completions.create(model="alpha", max_tokens=4,
                                                    messages=[{"role": "user", "content": PROMPTS[1]}])
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_legacy_shape(served):
    out = served.client().completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=6, logprobs=2)
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text and len(lp.token_logprobs) == len(lp.tokens) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    assert all(len(alts) <= 2 and max(alts.values()) >= x - 1e-6 for alts, x in zip(lp.top_logprobs, lp.token_logprobs))


def test_n_choices_each_as_its_own_seeded_request(served):
    """n=3 with a seed: choice i is what one request with seed + i gives; streamed, the chunks carry each choice's
    index and add up to the same texts."""
    client = served.client()
    kw = dict(model="alpha", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=8, temperature=1.0,
              seed=11)
    out = client.chat.completions.create(n=3, **kw)
    assert [c.index for c in out.choices] == [0, 1, 2]
    runs = [_engine_run(served, PROMPTS[0], "alpha", max_tokens=8, temperature=1.0, seed=11 + i) for i in range(3)]
    alone = [text for text, _ in runs]
    assert [c.message.content for c in out.choices] == alone and len(set(alone)) > 1
    assert out.usage.completion_tokens == sum(len(e.token_ids) for _, events in runs for e in events)
    texts = {0: "", 1: "", 2: ""}
    finished = set()
    for chunk in client.chat.completions.create(n=3, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert list(texts.values()) == alone and finished == {0, 1, 2}


def test_penalties_reach_the_engine(served):
    """Greedy with penalties gives the engine's own output under the same penalties, and they change it."""
    kw = dict(max_tokens=12, presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.3)
    out = served.client().chat.completions.create(model="alpha", messages=[{"role": "user", "content": PROMPTS[3]}],
                                                  extra_body={"repetition_penalty": 1.3},
                                                  **{k: v for k, v in kw.items() if k != "repetition_penalty"})
    assert out.choices[0].message.content == _engine_run(served, PROMPTS[3], "alpha", **kw)[0]
    assert _engine_run(served, PROMPTS[3], "alpha", **kw)[0] != _engine_run(served, PROMPTS[3], "alpha", max_tokens=12)[0]


def _scrape(served) -> dict:
    """The Prometheus exposition, as {(sample name, labels as a sorted tuple): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(served.url + "/metrics", headers={"accept": "text/plain;version=0.0.4"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_prometheus_metrics_count_requests_tokens_and_latencies_per_model(served):
    """A scraper (Accept: text/plain) gets the Prometheus format; others keep the JSON summary. Three
    requests on alpha (one streamed, one with n=2) move alpha's counters and histograms by exactly their counts."""
    before = _scrape(served)
    client = served.client()
    outs = [client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=5),
            client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": PROMPTS[1]}],
                                           max_tokens=4, n=2)]
    streamed = list(client.completions.create(model="alpha", prompt=PROMPTS[2], max_tokens=3, stream=True,
                                              stream_options={"include_usage": True}))
    tokens = outs[0].usage.completion_tokens + outs[1].usage.completion_tokens + streamed[-1].usage.completion_tokens
    prompts = outs[0].usage.prompt_tokens + outs[1].usage.prompt_tokens + streamed[-1].usage.prompt_tokens
    after = _scrape(served)
    alpha = (("model", "alpha"),)

    def grew(name, labels=alpha):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert grew("lorakit_generation_tokens_total") == tokens
    assert grew("lorakit_prompt_tokens_total") == prompts  # the n=2 prompt counted once, as usage does
    choices = 4
    assert sum(after[k] - before.get(k, 0) for k in after if k[0] == "lorakit_requests_total"
               and ("model", "alpha") in k[1]) == choices
    assert grew("lorakit_time_to_first_token_seconds_count") == choices
    assert grew("lorakit_request_seconds_count") == choices
    assert grew("lorakit_time_per_output_token_seconds_count") == tokens - choices
    assert grew("lorakit_time_to_first_token_seconds_sum") > 0
    assert ("lorakit_queue_length", ()) in after and ("lorakit_requests_running", ()) in after
    assert "requests_total" in httpx.get(served.url + "/metrics").json()  # the JSON summary stays the default
