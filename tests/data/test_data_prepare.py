"""prepare(): strict vs skip, drop accounting and max_drop_fraction, length policy, summary, validation split."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from data_helpers import chat, tok, tok_chat, write_jsonl  # noqa: F401 (fixtures)

from lorakit.data import IGNORE_INDEX, DataOptions, prepare, split_validation
from lorakit.errors import ConfigError, DataError

CHATML = DataOptions(template="chatml")


def _opts(**kw):
    return DataOptions(template="chatml", **kw)


def _good(n):
    return [chat(f"question {i}", f"answer {i}") for i in range(n)]


def test_strict_mode_fails_listing_every_bad_record_with_file_line_and_reason(write_jsonl, tok):
    lines = _good(3) + [{"messages": [{"role": "user", "content": "u"}, {"role": "asistant", "content": "a"}]}] \
        + _good(2) + [chat("u", "   ")] + ["{broken"]
    path = write_jsonl(lines)
    with pytest.raises(DataError) as err:
        prepare(path, tok, CHATML)
    msg = str(err.value)
    assert f"{path}: 3 bad records (empty_assistant: 1, malformed_json: 1, unknown_role: 1)" in msg
    assert f"{path}:4: 'messages' turn 2 has unknown role 'asistant' (did you mean 'assistant'?)" in msg
    assert f"{path}:7: turn 2 (assistant) is empty or whitespace" in msg
    assert f"{path}:8:2: Expecting property name" in msg
    assert "skip_bad_records" in msg


def test_skip_mode_skips_and_counts_bad_records_by_reason(write_jsonl, tok):
    path = write_jsonl(_good(200) + [chat("u", ""), chat("u", " "), "{x", {"messages": [{"role": "user"}]}])
    data = prepare(path, tok, _opts(skip_bad_records=True, max_drop_fraction=0.05))
    s = data.summary
    assert (s.records_read, s.kept, len(data.examples)) == (204, 200, 200)
    assert dict(s.dropped) == {"empty_assistant": 2, "malformed_json": 1, "missing_key": 1}
    assert s.line().startswith(f"{path}: 204 records read, 200 kept (0 truncated), 4 dropped "
                               "(empty_assistant: 2, malformed_json: 1, missing_key: 1);")
    assert s.supervised_tokens == sum(sum(x != IGNORE_INDEX for x in e.labels) for e in data.examples)


def test_max_drop_fraction_fails_naming_the_reasons(write_jsonl, tok):
    path = write_jsonl(_good(97) + [chat("u", "")] * 3)
    with pytest.raises(DataError, match=r"3 of 100 records dropped \(3.0% > max_drop_fraction=0.01\): "
                                        r"empty_assistant: 3"):
        prepare(path, tok, _opts(skip_bad_records=True))
    assert prepare(path, tok, _opts(skip_bad_records=True, max_drop_fraction=0.03)).summary.kept == 97


def test_all_records_bad_or_empty_file_means_no_valid_samples(write_jsonl, tmp_path, tok):
    path = write_jsonl([chat("u", "")] * 2)
    with pytest.raises(DataError, match="no valid samples: all 2 records dropped"):
        prepare(path, tok, _opts(skip_bad_records=True, max_drop_fraction=1.0))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no valid samples: no records"):
        prepare(empty, tok, CHATML)


def test_format_is_detected_from_the_first_valid_record(write_jsonl, tok):
    path = write_jsonl(["{bad", {"instruction": "say hi", "output": "hi"}, {"instruction": "q", "output": "a"}])
    data = prepare(path, tok, _opts(skip_bad_records=True, max_drop_fraction=0.5))
    assert (data.summary.format, data.summary.kept) == ("alpaca", 2)


def test_explicit_format_overrides_detection(tok):
    records = [{"text": "hello world", "instruction": "i", "output": "o"}]
    assert prepare(records, tok, _opts()).summary.format == "alpaca"
    assert prepare(records, tok, _opts(format="text")).summary.format == "text"


def test_record_fitting_no_format_names_the_expected_keys(tok):
    with pytest.raises(DataError, match=r"records\[0\]: fits no format: keys \['prompt'\]; expected 'messages'"):
        prepare([{"prompt": "p"}], tok, CHATML)


def test_column_mapping_through_prepare(tmp_path, tok):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nWhat is two plus two?,four\nsay hi,hi\n", encoding="utf-8")
    data = prepare(path, tok, _opts(columns={"instruction": "question", "output": "answer"}))
    assert (data.summary.format, data.summary.kept) == ("alpaca", 2)
    assert data.examples[0].source == f"{path}:row 1"


def test_tokenizer_template_is_used_for_auto(tok_chat):
    data = prepare(_good(2), tok_chat)
    assert data.summary.template == "tokenizer" and data.summary.kept == 2


def test_template_roundtrip_failure_stops_the_run(tok):
    from data_helpers import CHATML_JINJA, build_tokenizer

    bad = build_tokenizer(CHATML_JINJA.replace("{% if add_generation_prompt %}<|im_start|>assistant",
                                               "{% if add_generation_prompt %}<|im_start|>bot"))
    with pytest.raises(DataError, match=r"records\[0\]: template 'tokenizer' does not round-trip"):
        prepare(_good(1), bad)


def _long_conv():
    return chat("Hi", "Hello there", "What is two plus two? " * 3, "four is the answer " * 5)


def test_truncation_cuts_after_the_last_whole_assistant_turn(tok):
    full = prepare([_long_conv()], tok, CHATML).examples[0]
    n = len(full.input_ids)
    data = prepare([_long_conv()], tok, _opts(max_seq_len=n - 3))
    ex = data.examples[0]
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    first_end = full.labels.index(end_id) + 1
    assert ex.input_ids == full.input_ids[:first_end] and ex.labels == full.labels[:first_end]
    assert ex.labels[-1] == end_id  # the kept turn keeps its end-of-turn token
    assert (data.summary.truncated, data.summary.kept) == (1, 1)


def test_truncation_inside_the_only_reply_keeps_labels_aligned(tok):
    rec = chat("Hi", "four is the answer " * 10)
    full = prepare([rec], tok, CHATML).examples[0]
    data = prepare([rec], tok, _opts(max_seq_len=20))
    ex = data.examples[0]
    assert len(ex.input_ids) == len(ex.labels) == 20
    assert ex.labels == full.labels[:20] and ex.input_ids == full.input_ids[:20]
    assert data.summary.truncated == 1


def test_a_reply_cut_by_truncation_is_counted_and_warned_about(tok):
    """Only the cut inside the only reply counts: a cut after a whole turn keeps its end-of-turn token."""
    n = len(prepare([_long_conv()], tok, CHATML).examples[0].input_ids)
    after_whole_turn = prepare([_long_conv()], tok, _opts(max_seq_len=n - 3)).summary
    assert (after_whole_turn.truncated, after_whole_turn.cut_replies) == (1, 0)
    inside = prepare([chat("Hi", "four is the answer " * 10)], tok, _opts(max_seq_len=20)).summary
    assert (inside.truncated, inside.cut_replies) == (1, 1)
    assert "warning: 1 example(s) cut inside a reply" in inside.line()
    assert "warning" not in prepare(_good(2), tok, CHATML).summary.line()


def test_truncation_leaving_no_supervised_token_stops_naming_the_record(tok):
    records = _good(3) + [chat("What is two plus two? " * 10, "four")]
    with pytest.raises(DataError, match=r"records\[3\]: no supervised token left \(after truncation to 30\)"):
        prepare(records, tok, _opts(max_seq_len=30, max_drop_fraction=0.5))


def test_truncation_leaving_no_supervised_token_is_skipped_and_counted_when_told(tok):
    records = [chat("What is two plus two? " * 10, "four")] + _good(3)
    data = prepare(records, tok, _opts(max_seq_len=30, max_drop_fraction=0.5, skip_bad_records=True))
    assert data.summary.kept == 3 and dict(data.summary.dropped) == {"no_supervised_tokens": 1}
    assert "records[0]: no supervised token left (after truncation to 30)" in data.summary.problems[0]


def test_drop_policy_drops_and_counts_over_length(tok):
    data = prepare([_long_conv()] + _good(3), tok, _opts(max_seq_len=40, truncation="drop", max_drop_fraction=0.5))
    assert data.summary.kept == 3 and dict(data.summary.dropped) == {"too_long": 1}
    assert all(len(e.input_ids) <= 40 for e in data.examples)
    with pytest.raises(DataError, match="too_long: 1"):
        prepare([_long_conv()] + _good(3), tok, _opts(max_seq_len=40, truncation="drop"))


def test_text_data_is_packed_by_default_and_chat_is_not(tok):
    assert prepare([{"text": "hello world"}], tok).packing
    assert not prepare(_good(1), tok, CHATML).packing
    assert prepare(_good(1), tok, _opts(packing=True)).packing


def test_split_validation_is_seeded_disjoint_and_order_preserving(tok):
    examples = prepare(_good(20), tok, CHATML).examples
    train, val = split_validation(examples, 0.2, seed=7)
    assert len(val) == 4 and len(train) == 16
    assert split_validation(examples, 0.2, seed=7) == (train, val)
    assert split_validation(examples, 0.2, seed=8)[1] != val
    srcs = [e.source for e in examples]
    assert sorted(srcs.index(e.source) for e in train + val) == list(range(20))
    assert [e.source for e in val] == [s for s in srcs if s in {e.source for e in val}]
    with pytest.raises(DataError):
        split_validation(examples[:1], 0.5)


def test_data_options_report_every_bad_field_together():
    with pytest.raises(ConfigError) as err:
        DataOptions(format="jsonl", template="chatlm", max_seq_len=0, truncation="raise", max_drop_fraction=2,
                    columns={"instrution": "q"})  # type: ignore[arg-type]
    assert len(err.value.problems) == 6
    assert "did you mean 'instruction'" in str(err.value)


def test_data_package_never_imports_lora():
    """Dependencies point one way: lorakit.data must not import lorakit.lora."""
    root = Path(__file__).resolve().parents[2] / "src" / "lorakit" / "data"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                name = "." * node.level + (node.module or "")
                assert "lora" not in name.replace("lorakit", ""), f"{path.name} imports {name}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("lorakit.lora") for a in node.names), path.name
