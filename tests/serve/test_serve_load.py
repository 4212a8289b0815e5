"""Bounded load on loopback: concurrent requests each get their alone-greedy answer, complete; a client that
disconnects mid-stream frees its engine slot."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
from serve_helpers import PROMPTS, Gate, greedy, served, tiny_dirs, wait_for  # noqa: F401


def test_32_requests_from_8_threads_match_their_alone_output(served):
    jobs = [(PROMPTS[i % len(PROMPTS)], [None, "alpha"][i % 2], i % 3 == 0) for i in range(32)]
    expected = {(p, a): greedy(served.engine, served.tokenizer, p, a, 16)[0] for p, a, _ in jobs}

    def run(job):
        prompt, adapter, stream = job
        client = served.client()
        model = adapter or "tiny-llama"
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(
                model=model, prompt=prompt, max_tokens=16, stream=True) if c.choices)
        out = client.completions.create(model=model, prompt=prompt, max_tokens=16)
        assert out.choices[0].finish_reason in ("stop", "length")
        return out.choices[0].text

    with ThreadPoolExecutor(max_workers=8) as pool:
        texts = list(pool.map(run, jobs, timeout=300))
    assert texts == [expected[(p, a)] for p, a, _ in jobs]
    m = httpx.get(served.url + "/metrics").json()
    assert m["server"]["in_flight"] == 0 and m["queue_length"] == 0


def test_stream_disconnect_cancels_and_frees_the_slot(served):
    # ~20 engine steps a second, so the stream is still running when the client leaves
    gate = Gate(served.engine.model, delay=0.05)
    try:
        before = served.engine.metrics()["requests_cancelled"]
        finished_before = served.engine.metrics()["requests_finished"]
        tokens_before = served.engine.metrics()["tokens_generated"]
        with httpx.stream("POST", served.url + "/v1/chat/completions", timeout=30,
                          json={"model": "alpha", "max_tokens": 32, "stream": True,
                                "messages": [{"role": "user", "content": "hello"}]}) as r:
            # Hold the line iterator: a discarded one is finalized at once, and its finalizer closes the
            # connection, which would disconnect before the engine has begun (a race this test once lost).
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
            wait_for(lambda: served.engine.metrics()["tokens_generated"] > tokens_before)  # decoding has begun
        # leaving the block closes the connection mid-stream

        def freed():
            m = httpx.get(served.url + "/metrics").json()
            return (m["server"]["in_flight"] == 0 and m["requests_running"] == 0 and m["queue_length"] == 0
                    and m["requests_cancelled"] > before)

        wait_for(freed, timeout=5)
        assert served.engine.metrics()["requests_finished"] == finished_before  # it was cut short, not finished
    finally:
        gate.remove()
