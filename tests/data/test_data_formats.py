"""Formats: detection, column mapping, normalisation, and per-record validation with reasons."""

from __future__ import annotations

import pytest

from lorakit.data import BadRecord, Turn, detect_format, normalise

S, U, A = "system", "user", "assistant"


@pytest.mark.parametrize("record, fmt", [
    ({"messages": []}, "messages"),
    ({"conversations": []}, "sharegpt"),
    ({"instruction": "i", "output": "o"}, "alpaca"),
    ({"text": "t"}, "text"),
    ({"messages": [], "text": "t"}, "messages"),
    ({"prompt": "p"}, None),
])
def test_detect_format_from_keys(record, fmt):
    assert detect_format(record) == fmt


def test_detect_format_uses_column_mapping():
    assert detect_format({"question": "q", "answer": "a"}, {"instruction": "question", "output": "answer"}) == "alpaca"
    assert detect_format({"dialog": []}, {"messages": "dialog"}) == "messages"


def test_alpaca_with_input_system_and_history_becomes_turns():
    rec = {"instruction": "Add", "input": "2 and 2", "output": "4", "system": "Be exact.",
           "history": [["hi", "hello"]]}
    assert normalise(rec, "alpaca") == (Turn(S, "Be exact."), Turn(U, "hi"), Turn(A, "hello"),
                                        Turn(U, "Add\n\n2 and 2"), Turn(A, "4"))


def test_alpaca_empty_input_is_left_out():
    assert normalise({"instruction": "Hi", "input": "", "output": "Hey"}, "alpaca") == (Turn(U, "Hi"), Turn(A, "Hey"))


def test_alpaca_column_mapping():
    rec = {"question": "Why?", "answer": "Because."}
    assert normalise(rec, "alpaca", {"instruction": "question", "output": "answer"}) == (
        Turn(U, "Why?"), Turn(A, "Because."))


def test_messages_openai_keys():
    rec = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                        {"role": "assistant", "content": "a", "name": "bot"}], "id": 7}
    assert normalise(rec, "messages") == (Turn(S, "s"), Turn(U, "u"), Turn(A, "a"))


def test_sharegpt_keys_and_tags():
    rec = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "u"},
                             {"from": "gpt", "value": "a"}]}
    assert normalise(rec, "sharegpt") == (Turn(S, "s"), Turn(U, "u"), Turn(A, "a"))


def test_messages_column_mapping_of_list_and_turn_keys():
    rec = {"dialog": [{"speaker": "user", "text": "u"}, {"speaker": "assistant", "text": "a"}]}
    cols = {"messages": "dialog", "role": "speaker", "content": "text"}
    assert normalise(rec, "messages", cols) == (Turn(U, "u"), Turn(A, "a"))


def test_chat_list_stored_as_json_string_in_a_column_is_decoded():
    rec = {"messages": '[{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]'}
    assert normalise(rec, "messages") == (Turn(U, "u"), Turn(A, "a"))


def test_text_format():
    assert normalise({"text": "raw text"}, "text") == "raw text"


def _m(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


@pytest.mark.parametrize("record, fmt, reason, words", [
    ({"instruction": "i"}, "alpaca", "missing_key", "missing key 'output'"),
    ({"instruction": "i", "output": "  \n"}, "alpaca", "empty_assistant", "empty or whitespace"),
    (_m((U, "u"), (A, "")), "messages", "empty_assistant", "turn 2 (assistant)"),
    (_m((U, "u"), ("asistant", "a")), "messages", "unknown_role", "did you mean 'assistant'"),
    (_m((U, "u"), (U, "again"), (A, "a")), "messages", "bad_role_order", "two user turns in a row"),
    (_m((A, "a"), (U, "u")), "messages", "bad_role_order", "starts with assistant"),
    (_m((U, "u"), (A, "a"), (S, "late")), "messages", "bad_role_order", "only the first turn may be system"),
    (_m((U, "u"), (A, "a"), (U, "dangling")), "messages", "bad_role_order", "ends with a user turn"),
    (_m((S, "only system")), "messages", "no_assistant_turn", "no user/assistant turns"),
    ({"messages": [{"role": "user", "content": None}]}, "messages", "content_not_string", "is null"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages", "content_not_string", "a list"),
    ({"messages": "nope"}, "messages", "bad_turns", "expected a list of turns"),
    ({"messages": [{"speaker": "user"}]}, "messages", "missing_key", "neither 'role' nor 'from'"),
    ({"conversations": [{"from": "humna", "value": "u"}]}, "sharegpt", "unknown_role", "did you mean 'human'"),
    ({"text": "   "}, "text", "empty_text", "empty or whitespace"),
    ({"text": 3}, "text", "content_not_string", "a number"),
    ({"instruction": "i", "output": "o", "history": [["one"]]}, "alpaca", "bad_history", "not a [user, assistant]"),
])
def test_invalid_record_raises_bad_record_with_reason(record, fmt, reason, words):
    with pytest.raises(BadRecord) as err:
        normalise(record, fmt)
    assert err.value.reason == reason
    assert words in str(err.value)
