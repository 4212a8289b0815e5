"""Continuous batching: a greedy request's tokens do not depend on what else is in the batch."""

from __future__ import annotations

import threading

import pytest
import torch

from engine_support import alone, build_lora, build_tok, greedy, prompts, token_ids
import lorakit.infer.engine as engine_module
from lorakit.errors import AdapterError
from lorakit.infer import Engine, InvalidRequest, QueueFull, SamplingParams

ROW_ADAPTERS = ["a", "b", None, "c", "a", None]


def test_greedy_alone_equals_mixed_batch_with_late_joiners():
    """Same token ids alone and in a mixed-adapter batch, including base rows and requests that join mid-way."""
    lora, tok = build_lora(), build_tok()
    ps = prompts(len(ROW_ADAPTERS))
    with Engine(lora, tok, max_batch_size=8) as engine:
        expected = [alone(engine, p, a, greedy(12)) for p, a in zip(ps, ROW_ADAPTERS)]
        first = [engine.submit(p, a, greedy(12)) for p, a in zip(ps[:3], ROW_ADAPTERS[:3])]
        stream = iter(first[0])
        for _ in range(4):  # the first three are decoding when the others arrive
            next(stream)
        late = [engine.submit(p, a, greedy(12)) for p, a in zip(ps[3:], ROW_ADAPTERS[3:])]
        got = [token_ids(h) for h in first + late]
    assert got == expected
    assert len({tuple(t) for t in expected}) == len(expected)  # the rows really differ


def test_rows_leaving_early_do_not_change_the_others():
    """Short requests finish and leave the batch (their cache rows dropped, columns trimmed) mid-generation."""
    lora, tok = build_lora(), build_tok()
    ps = prompts(4, seed=3)
    lengths = [3, 14, 1, 8]
    with Engine(lora, tok, max_batch_size=2) as engine:  # also forces queueing
        expected = [alone(engine, p, a, greedy(n)) for p, a, n in zip(ps, ["a", "b", "c", None], lengths)]
        handles = [engine.submit(p, a, greedy(n)) for p, a, n in zip(ps, ["a", "b", "c", None], lengths)]
        assert [token_ids(h) for h in handles] == expected


def test_first_token_logits_equal_in_padded_prefill(monkeypatch):
    """Prefill with left padding, masks and position ids gives the logits of the prompt alone, to the last bit
    or two: the padding itself contributes nothing, but the BLAS may take another kernel for a batch of rows
    than for one (MKL does on AMD EPYC: 1-ulp differences, ~6e-8 here; on Intel Xeons it gave equal bits).
    Greedy token ids are equal either way, which the tests above check.
    """
    lora, tok = build_lora(), build_tok()
    seen: dict[str, list[torch.Tensor]] = {}
    real = engine_module.Engine._sample

    def spy(self, req, logits):
        seen.setdefault(req.handle.id, []).append(logits.clone())
        return real(self, req, logits)

    monkeypatch.setattr(engine_module.Engine, "_sample", spy)
    ps = prompts(4, seed=5)
    adapters = ["a", "b", None, "c"]
    with Engine(lora, tok) as engine:
        solo = []
        for p, a in zip(ps, adapters):
            h = engine.submit(p, a, greedy(1))
            h.result()
            solo.append(h)
    batched_engine = Engine(lora, tok)  # queued before start(): all four are admitted and prefilled together
    batched = [batched_engine.submit(p, a, greedy(1)) for p, a in zip(ps, adapters)]
    with batched_engine:
        for h in batched:
            h.result()
    for s, b in zip(solo, batched):
        torch.testing.assert_close(seen[b.id][0], seen[s.id][0], rtol=0, atol=1e-6)  # padding leaking in moves them far more
        assert seen[b.id][0].argmax() == seen[s.id][0].argmax()


def test_different_adapters_give_different_outputs():
    lora, tok = build_lora(), build_tok()
    p = prompts(1, seed=9)[0]
    with Engine(lora, tok) as engine:
        outs = {a: alone(engine, p, a, greedy(12)) for a in ["a", "b", "c", None]}
    assert len({tuple(v) for v in outs.values()}) == 4


def test_concurrent_submitters_get_their_alone_outputs():
    """16 requests from 4 threads into a 4-row engine: all complete, each equal to its alone greedy output."""
    lora, tok = build_lora(), build_tok()
    ps = prompts(16, seed=11)
    adapters = ["a", "b", "c", None] * 4
    with Engine(lora, tok, max_batch_size=4, max_queue=16) as engine:
        expected = [alone(engine, p, a, greedy(8)) for p, a in zip(ps, adapters)]
        got: dict[int, list[int]] = {}

        def client(worker: int) -> None:
            for i in range(worker, 16, 4):
                got[i] = token_ids(engine.submit(ps[i], adapters[i], greedy(8)))

        threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
    assert [got[i] for i in range(16)] == expected


def test_requests_with_one_prompt_share_one_prefill_row_and_sample_as_they_would_alone():
    """submit_many of n seeded samples of one prompt (GRPO's group) prefills the prompt once per adapter; each
    sample's tokens and log-probs are those it draws when it runs by itself."""
    lora, tok = build_lora(), build_tok()
    p, q = prompts(2, seed=11)
    requests = [(p, "a", SamplingParams(max_tokens=8, temperature=1.0, seed=s)) for s in range(4)]
    requests += [(p, "b", SamplingParams(max_tokens=8, temperature=1.0, seed=9)),
                 (q, "a", SamplingParams(max_tokens=8, temperature=1.0, seed=0))]
    prefill_rows: list[int] = []

    def count_rows(module, args, kwargs):
        if kwargs["input_ids"].shape[1] > 1:  # a prefill (decode steps feed one token per row)
            prefill_rows.append(kwargs["input_ids"].shape[0])

    with Engine(lora, tok, max_batch_size=8) as engine:
        runs = [list(engine.submit(*r)) for r in requests]  # one at a time: each by itself
        expected = [[t for e in run for t in e.token_ids] for run in runs]
        alone_logprobs = [[x for e in run for x in e.logprobs] for run in runs]
        prefill_rows.clear()
        hook = lora.model.register_forward_pre_hook(count_rows, with_kwargs=True)
        try:
            handles = engine.submit_many(requests)
            events = [list(h) for h in handles]
        finally:
            hook.remove()
    assert prefill_rows == [3]  # p with a, p with b, q with a
    assert [[t for e in ev for t in e.token_ids] for ev in events] == expected
    for ev, logprobs in zip(events, alone_logprobs):
        torch.testing.assert_close(torch.tensor([x for e in ev for x in e.logprobs]), torch.tensor(logprobs),
                                   rtol=1e-4, atol=1e-5)
    assert len({tuple(t) for t in expected[:4]}) > 1  # the seeds really drew different samples


def test_submit_many_queues_all_or_none():
    lora, tok = build_lora(), build_tok()
    engine = Engine(lora, tok, max_queue=3)  # not started: nothing leaves the queue
    good = (prompts(1)[0], "a", greedy(2))
    with pytest.raises(InvalidRequest, match="max_tokens"):
        engine.submit_many([good, (prompts(1)[0], "a", greedy(0))])
    with pytest.raises(AdapterError, match="unknown adapter 'nope'"):
        engine.submit_many([good, (prompts(1)[0], "nope", greedy(2))])
    assert engine.metrics()["queue_length"] == 0
    engine.submit(*good)
    with pytest.raises(QueueFull, match="1 requests are already waiting and these 3 do not fit"):
        engine.submit_many([good] * 3)
    assert len(engine.submit_many([good] * 2)) == 2 and engine.metrics()["queue_length"] == 3
    engine.close()
