"""Continuous batching: a greedy request's tokens do not depend on what else is in the batch."""

from __future__ import annotations

import threading

import torch

from engine_support import alone, build_lora, build_tok, greedy, prompts, token_ids
import lorakit.infer.engine as engine_module
from lorakit.infer import Engine

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
