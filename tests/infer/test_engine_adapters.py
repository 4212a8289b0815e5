"""Adapters loaded and unloaded while the engine is generating."""

from __future__ import annotations

import pytest

from engine_support import alone, build_lora, build_tok, greedy, prompts, token_ids
from lorakit import AdapterError
from lorakit.infer import Engine


def test_hot_load_and_unload_while_a_request_runs(tmp_path):
    lora, tok = build_lora(), build_tok()
    p, q = prompts(2, seed=21)
    with Engine(lora, tok, max_new_tokens=256) as engine:
        expected_a = alone(engine, p, "a", greedy(120))  # long enough to outlast the checks below
        expected_b = alone(engine, q, "b", greedy(10))
        lora.save_adapter(tmp_path, ["b"])  # a non-default name is written to tmp_path/b
        running = engine.submit(p, "a", greedy(120))
        stream = iter(running)
        first = next(stream).token_ids

        engine.load_adapter("b2", tmp_path / "b")
        assert "b2" in engine.adapters()
        assert alone(engine, q, "b2", greedy(10)) == expected_b  # same weights as b: same greedy output

        engine.unload_adapter("c")
        assert "c" not in engine.adapters()
        with pytest.raises(AdapterError, match="unknown adapter 'c'"):
            engine.submit(q, "c", greedy(2))

        with pytest.raises(AdapterError, match="in use by requests"):
            engine.unload_adapter("a")
        rest = [t for e in stream for t in e.token_ids]
        assert first + rest == expected_a  # the running request never noticed

        engine.unload_adapter("a")  # free once its request is done
        assert "a" not in engine.adapters()


def test_load_errors_reach_the_caller_and_engine_goes_on(tmp_path):
    lora, tok = build_lora(), build_tok()
    with Engine(lora, tok) as engine:
        with pytest.raises(Exception):
            engine.load_adapter("x", tmp_path / "missing")
        with pytest.raises(AdapterError):
            engine.unload_adapter("missing")
        assert len(token_ids(engine.submit(prompts(1)[0], "a", greedy(3)))) == 3
