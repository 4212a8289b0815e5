"""One request's life in the engine: limits, stop conditions, sampling, cancel, queue, validation, failures."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine_support import alone, build_lora, build_tok, greedy, prompts, token_ids
from tiny_models import build_model
from lorakit import AdapterError
from lorakit.infer import Engine, EngineClosed, InvalidRequest, LimitExceeded, QueueFull, SamplingParams


@pytest.fixture(scope="module")
def lora():
    return build_lora()


@pytest.fixture(scope="module")
def tok():
    return build_tok()


@pytest.fixture
def engine(lora, tok):
    with Engine(lora, tok, max_batch_size=4, max_queue=8, max_prompt_tokens=16, max_new_tokens=32) as e:
        yield e


def test_max_tokens_ends_with_length(engine):
    h = engine.submit(prompts(1)[0], "a", greedy(7))
    events = list(h)
    text, reason, usage = h.result()
    assert reason == "length" and events[-1].finish_reason == "length"
    assert all(e.finish_reason is None for e in events[:-1])
    assert usage.completion_tokens == 7 and usage.prompt_tokens == 5
    assert text == "".join(e.text for e in events)


def test_stop_string_cut_and_excluded(engine, tok):
    """The output ends right before the first occurrence of the stop string; finish_reason is "stop"."""
    p = prompts(1, seed=2)[0]
    full, _, _ = engine.submit(p, "b", greedy(24)).result()
    stop = full[8:10]
    assert stop.strip() and len(full) > 12
    text, reason, _ = engine.submit(p, "b", greedy(24, stop=["never-there", stop])).result()
    assert reason == "stop"
    assert text == full[: full.index(stop)]
    assert stop not in text


def test_streamed_text_never_shows_a_stop_string_prefix_that_completes(engine):
    """Held-back text: concatenated events equal the result, and no event carries part of the stop string."""
    p = prompts(1, seed=2)[0]
    full, _, _ = engine.submit(p, "b", greedy(24)).result()
    stop = full[8:12]
    events = list(engine.submit(p, "b", greedy(24, stop=[stop])))
    assert "".join(e.text for e in events) == full[: full.index(stop)]


def test_eos_stops_and_is_not_in_text(lora, tok):
    """A token that is EOS (here: in the model's generation_config) ends generation with "stop"."""
    p = prompts(1, seed=4)[0]
    with Engine(lora, tok) as engine:
        free = alone(engine, p, "c", greedy(12))
    eos = free[3]
    first = free.index(eos)
    lora.model.generation_config.eos_token_id = [eos]
    try:
        with Engine(lora, tok) as engine:
            h = engine.submit(p, "c", greedy(12))
            ids = token_ids(h)
            text, reason, usage = h.result()
    finally:
        lora.model.generation_config.eos_token_id = None
    assert reason == "stop"
    assert ids == free[: first + 1] and usage.completion_tokens == first + 1
    assert text == tok.decode(free[:first], skip_special_tokens=True)


def test_seeded_sampling_reproducible_in_any_batch(engine):
    p = prompts(1, seed=6)[0]
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    one = alone(engine, p, "a", params)
    crowd = [engine.submit(q, a, SamplingParams(max_tokens=12, temperature=1.0))
             for q, a in zip(prompts(3, seed=7), ["b", None, "a"])]
    two = token_ids(engine.submit(p, "a", params))
    for h in crowd:
        h.result()
    other = alone(engine, p, "a", SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=99))
    assert one == two
    assert other != one


def test_cancel_frees_the_slot(lora, tok):
    """With one slot, a cancelled long request lets the waiting one run; its last event says "cancelled"."""
    with Engine(lora, tok, max_batch_size=1, max_new_tokens=512) as engine:
        long = engine.submit(prompts(1)[0], "a", greedy(500))
        waiting = engine.submit(prompts(1, seed=1)[0], "b", greedy(5))
        stream = iter(long)
        next(stream)
        long.cancel()
        events = list(stream)
        assert events[-1].finish_reason == "cancelled"
        assert waiting.result(timeout=60)[1] == "length"
        assert long.usage.completion_tokens < 500
        assert engine.metrics()["requests_cancelled"] == 1


def test_cancel_while_waiting(lora, tok):
    engine = Engine(lora, tok)
    h = engine.submit(prompts(1)[0], "a", greedy(5))
    h.cancel()
    with engine:
        assert h.result(timeout=60)[1] == "cancelled"
        assert h.usage.completion_tokens == 0


def test_queue_full_raises(lora, tok):
    engine = Engine(lora, tok, max_queue=3)  # not started: nothing leaves the queue
    for p in prompts(3):
        engine.submit(p, None, greedy(2))
    with pytest.raises(QueueFull, match="max_queue=3"):
        engine.submit(prompts(1)[0], None, greedy(2))
    engine.close()


@pytest.mark.parametrize("prompt, adapter, params, match", [
    ([], "a", greedy(4), "empty"),
    (list(range(10, 27)), "a", greedy(4), "max_prompt_tokens=16"),
    ([1, 2, 500], "a", greedy(4), "vocabulary"),
    ([1, 2], "a", greedy(33), "max_new_tokens=32"),
    ([1, 2], "a", greedy(0), "max_tokens must be"),
    ([1, 2], "a", SamplingParams(temperature=-1.0), "temperature"),
    ([1, 2], "a", SamplingParams(top_p=0.0), "top_p"),
    ([1, 2], "a", SamplingParams(stop=[""]), "stop"),
], ids=["empty", "too_long", "out_of_vocab", "too_many_new", "zero_new", "temperature", "top_p", "empty_stop"])
def test_invalid_requests_rejected_at_submit(engine, prompt, adapter, params, match):
    with pytest.raises(InvalidRequest, match=match):
        engine.submit(prompt, adapter, params)


def test_a_refusal_over_a_limit_names_the_limit_for_other_layers(engine):
    """InvalidRequest.exceeded says which limits a request is over, so the HTTP layer can answer in its words."""
    with pytest.raises(InvalidRequest) as caught:
        engine.submit(list(range(10, 27)), "a", greedy(33))
    assert caught.value.exceeded == [LimitExceeded("prompt_too_long", 17, 16), LimitExceeded("too_many_tokens", 33, 32)]
    with pytest.raises(InvalidRequest) as caught:
        engine.submit([1, 2], "a", SamplingParams(top_p=0.0))
    assert caught.value.exceeded == []


def test_unknown_adapter_rejected(engine):
    with pytest.raises(AdapterError, match="unknown adapter 'zzz'.*a, b, c"):
        engine.submit([1, 2, 3], "zzz", greedy(2))


def test_metrics_count_requests_and_tokens(lora, tok):
    with Engine(lora, tok) as engine:
        for p, a in zip(prompts(4), ["a", "a", "b", None]):
            engine.submit(p, a, greedy(3)).result()
        m = engine.metrics()
    assert m["requests_total"] == 4 and m["requests_finished"] == 4
    assert m["tokens_generated"] == 12
    assert m["per_adapter"] == {"a": 2, "b": 1, "__base__": 1}
    assert m["queue_length"] == 0


def test_model_error_fails_its_requests_and_engine_keeps_serving(lora, tok, monkeypatch):
    """A forward that raises fails the requests in it (the handle re-raises); later requests are served."""
    real = type(lora).forward
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # a decode step of the first request
            raise RuntimeError("boom")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(lora), "forward", flaky)
    with Engine(lora, tok) as engine:
        bad = engine.submit(prompts(1)[0], "a", greedy(6))
        with pytest.raises(RuntimeError, match="boom"):
            list(bad)
        with pytest.raises(RuntimeError, match="boom"):
            bad.result()
        good = engine.submit(prompts(1)[0], "a", greedy(6))
        assert good.result(timeout=60)[1] == "length"
        assert engine.metrics()["requests_failed"] == 1


def test_close_cancels_pending_and_refuses_new(lora, tok):
    engine = Engine(lora, tok, max_batch_size=1, max_new_tokens=512)
    engine.start()
    running = engine.submit(prompts(1)[0], "a", greedy(500))
    queued = engine.submit(prompts(1)[0], "b", greedy(500))
    next(iter(running))
    engine.close()
    assert running.result(timeout=60)[1] == "cancelled"
    assert queued.result(timeout=60)[1] == "cancelled"
    with pytest.raises(EngineClosed):
        engine.submit([1, 2], None, greedy(2))


def test_aiter_yields_the_same_events(engine):
    p = prompts(1, seed=8)[0]
    blocking = list(engine.submit(p, "c", greedy(6)))

    async def consume():
        return [e async for e in engine.submit(p, "c", greedy(6)).aiter()]

    assert asyncio.run(consume()) == blocking


def test_plain_model_serves_base_only(tok):
    model = build_model("llama")
    model.generation_config.eos_token_id = None
    with Engine(model, tok) as engine:
        assert engine.adapters() == []
        assert len(token_ids(engine.submit([5, 6, 7], None, greedy(4)))) == 4
        with pytest.raises(AdapterError):
            engine.submit([5, 6, 7], "a", greedy(4))
        with pytest.raises(AdapterError, match="plain model"):
            engine.load_adapter("a", "/nowhere")
