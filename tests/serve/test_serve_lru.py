"""Adapters loaded on first use from --adapter-dir, at most --max-loras resident, the least recently used evicted,
never one that a request is using: sequentially and under a concurrent seeded mix of requests, every answer is the
one its adapter gives (nothing lost, nothing mixed up)."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serve_helpers import PROMPTS, greedy, run_server, save_adapters, save_tiny_base

NAMES = ["a0", "a1", "a2", "a3"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lru")
    base = save_tiny_base(tmp / "tiny-llama")
    root = tmp / "adapters"
    root.mkdir()
    save_adapters(base, root, {name: 10 + i for i, name in enumerate(NAMES)})
    return base, root


@pytest.fixture(scope="module")
def expected(dirs):
    """Each adapter's greedy answer to each prompt, from an engine holding all four (no eviction involved)."""
    from lorakit.serve.server import ServeOptions, build

    base, root = dirs
    engine, _ = build(ServeOptions(model=str(base), adapters={n: str(root / n) for n in NAMES}, dtype="float32",
                                   device="cpu"), log_fn=lambda _: None)
    try:
        answers = {(n, p): greedy(engine, engine.tokenizer, p, n, 6)[0] for n in NAMES for p in PROMPTS}
    finally:
        engine.close()
    assert len({answers[(n, PROMPTS[0])] for n in NAMES}) > 1  # the adapters differ, or the test proves little
    return answers


@pytest.fixture(scope="module")
def lru(dirs):
    from lorakit.serve.server import ServeOptions, build

    base, root = dirs
    engine, app = build(ServeOptions(model=str(base), adapter_dir=str(root), dtype="float32", device="cpu",
                                     max_batch_size=4, max_queue=64, max_loras=2), log_fn=lambda _: None)
    try:
        with run_server(app) as url:
            yield url, engine
    finally:
        engine.close()


def _complete(url: str, name: str, prompt: str) -> str:
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=30, timeout=60) as client:
        return client.completions.create(model=name, prompt=prompt, max_tokens=6).choices[0].text


def _counts(url: str) -> dict:
    return httpx.get(url + "/metrics").json()["server"]


def test_first_use_loads_and_the_least_recently_used_is_evicted(lru, expected):
    url, engine = lru
    for adapter in engine.adapters():  # start from an empty engine whatever ran before
        assert httpx.delete(f"{url}/v1/adapters/{adapter}").status_code == 200
    before = _counts(url)
    for name in ["a0", "a1", "a0", "a2"]:  # a1 is then the least recently used
        assert _complete(url, name, PROMPTS[1]) == expected[(name, PROMPTS[1])]
    assert sorted(engine.adapters()) == ["a0", "a2"]
    after = _counts(url)
    assert after.get("adapters_loaded_on_first_use", 0) - before.get("adapters_loaded_on_first_use", 0) == 3
    assert after.get("adapters_evicted", 0) - before.get("adapters_evicted", 0) == 1
    listed = {m["id"]: m.get("loaded") for m in httpx.get(url + "/v1/models").json()["data"]}
    assert listed == {"tiny-llama": None, "a0": True, "a2": True, "a1": False, "a3": False}


def test_a_concurrent_mix_gets_every_answer_right_within_the_limit(lru, expected):
    """32 requests, a seeded random mix over 4 adapters, 8 at a time through 2 resident slots: a request that
    finds both slots busy gets 429 and the client retries; every answer is its own adapter's, and no more than 2
    adapters are ever resident."""
    url, engine = lru
    rng = random.Random(0)
    jobs = [(rng.choice(NAMES), rng.choice(PROMPTS)) for _ in range(32)]
    evicted = _counts(url).get("adapters_evicted", 0)
    most, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            most[0] = max(most[0], len(engine.adapters()))
            done.wait(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda job: _complete(url, *job), jobs))
    finally:
        done.set()
        watcher.join()
    wrong = [(n, p, a) for (n, p), a in zip(jobs, answers) if a != expected[(n, p)]]
    assert not wrong
    assert most[0] <= 2 and len(engine.adapters()) <= 2
    assert _counts(url).get("adapters_evicted", 0) - evicted >= 2  # the mix went through the LRU


def test_names_outside_the_directory_are_not_found(lru):
    url, _ = lru
    for name in ["a9", "../a0", "a0/../a1", "tiny-llama-x"]:
        r = httpx.post(url + "/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 1})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", (name, r.text)
