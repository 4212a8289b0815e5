"""Reward functions for GRPO: each built-in on right and wrong answers, the user's functions by import path, the
weighted sum, and a function that fails being reported with its record instead of stopping the run."""

from __future__ import annotations

import math

import pytest

from lorakit.errors import ConfigError
from lorakit.train.rewards import (RewardSet, exact_match, json_schema, json_valid, length_penalty, load_function,
                                   numeric_equal, regex_match)

RECORD = {"prompt": "What is 6 times 7?", "answer": "42"}


def call(function, completion, record=RECORD):
    return function(prompt=record.get("prompt", ""), completion=completion, record=record)


def test_exact_match_compares_stripped_text_with_the_column():
    assert call(exact_match(), " 42\n") == 1.0
    assert call(exact_match(), "42.") == 0.0
    assert call(exact_match("label"), "yes", {"label": "yes"}) == 1.0


def test_regex_match_searches_the_completion():
    assert call(regex_match(r"\banswer: \d+"), "so the answer: 42") == 1.0
    assert call(regex_match(r"^\d+$"), "about 42") == 0.0
    with pytest.raises(ConfigError, match="not a regular expression"):
        regex_match("(unclosed")


def test_json_valid_and_json_schema():
    schema = {"type": "object", "required": ["animal", "legs"],
              "properties": {"animal": {"type": "string"}, "legs": {"type": "integer"}}}
    assert call(json_valid(), ' {"animal": "fox"} ') == 1.0
    assert call(json_valid(), '{"animal": fox}') == 0.0
    assert call(json_schema(schema), '{"animal": "fox", "legs": 4}') == 1.0
    assert call(json_schema(schema), '{"animal": "fox", "legs": "four"}') == 0.0
    assert call(json_schema(schema), '{"animal": "fox"}') == 0.0
    assert call(json_schema(schema), "not json") == 0.0
    with pytest.raises(ConfigError, match="not a valid JSON schema"):
        json_schema({"type": "no-such-type"})


def test_json_schema_reads_a_schema_file(tmp_path):
    path = tmp_path / "schema.json"
    path.write_text('{"type": "array"}')
    assert call(json_schema(path), "[1, 2]") == 1.0 and call(json_schema(str(path)), "{}") == 0.0
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read a JSON schema"):
        json_schema(tmp_path / "bad.json")


def test_numeric_equal_takes_the_last_number():
    assert call(numeric_equal(), "6 x 7 = 42") == 1.0
    assert call(numeric_equal(), "42, no wait, 41") == 0.0
    assert call(numeric_equal(), "1,234", {"answer": "1234"}) == 1.0
    assert call(numeric_equal(), "no number") == 0.0
    assert call(numeric_equal(tolerance=0.01), "3.141", {"answer": 3.14}) == 1.0


def test_length_penalty_is_zero_up_to_the_cap_then_linear():
    assert call(length_penalty(10), "x" * 10) == 0.0
    assert call(length_penalty(10), "x" * 25) == -1.5
    with pytest.raises(ConfigError, match="at least 1"):
        length_penalty(0)


def test_user_functions_load_by_import_path_with_clear_errors(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def shouts(prompt, completion, record):\n    return float(completion.isupper())\nNOT_A_FUNCTION = 3\n")
    (tmp_path / "broken_rewards.py").write_text("raise RuntimeError('bad import')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert call(load_function("my_rewards:shouts"), "YES") == 1.0
    for path, message in [("my_rewards.shouts", "module:function"), ("no_such_module:f", "no module 'no_such_module'"),
                          ("my_rewards:missing", "has no 'missing' .*shouts"), ("my_rewards:NOT_A_FUNCTION", "not a function"),
                          ("broken_rewards:f", "RuntimeError: bad import")]:
        with pytest.raises(ConfigError, match=message):
            load_function(path)


def test_the_weighted_sum_and_a_failing_function_reported_with_its_record():
    def fails_on_long(prompt, completion, record):
        if len(completion) > 5:
            raise ValueError("too long to judge")
        return 1.0

    def returns_nan(prompt, completion, record):
        return math.nan

    rewards = RewardSet([("exact", exact_match(), 2.0), ("short", fails_on_long, 0.5)])
    scores = rewards.score(["p", "p"], ["42", "420000"], [RECORD, RECORD], ["data.jsonl:3", "data.jsonl:3"])
    assert scores.per_function["exact"] == [1.0, 0.0]
    assert scores.per_function["short"][0] == 1.0 and math.isnan(scores.per_function["short"][1])
    assert scores.total == [2.5, 0.0]  # the failed function is left out, not counted as 0 or NaN
    assert [e.line() for e in scores.errors] == ["reward short failed on data.jsonl:3: ValueError: too long to judge"]

    no_column = RewardSet([("exact", exact_match("answer"), 1.0)]).score(["p"], ["42"], [{"question": "?"}], ["d.csv:2"])
    assert "needs column 'answer'" in no_column.errors[0].line() and "it has: question" in no_column.errors[0].line()

    only_nan = RewardSet([("nan", returns_nan, 1.0)]).score(["p"], ["x"], [RECORD], ["data.jsonl:9"])
    assert math.isnan(only_nan.total[0]) and "a reward must be a finite number" in only_nan.errors[0].message
