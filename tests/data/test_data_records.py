"""Readers: JSON, JSONL, CSV, Parquet; bad input reported as file:line:col or file:row N."""

from __future__ import annotations

import json

import pytest
from data_helpers import tok, write_jsonl  # noqa: F401 (fixtures)

from lorakit.data import DataOptions, prepare, read_records
from lorakit.data.records import records_from_objects
from lorakit.errors import DataError


def _ok(records):
    return [(r.location, dict(r.data)) for r in records if r.problem is None]


def test_jsonl_malformed_line_reports_file_line_col(write_jsonl):
    bad = '{"text": "a",}'
    path = write_jsonl([{"text": "x"}, {"text": "y"}, bad, {"text": "z"}])
    col = pytest.raises(json.JSONDecodeError, json.loads, bad).value.colno
    records = list(read_records(path))
    assert [r.problem is None for r in records] == [True, True, False, True]
    assert records[2].problem.reason == "malformed_json"
    assert str(records[2].problem).startswith(f"{path}:3:{col}: Expecting property name")
    assert records[3].location == f"{path}:4"


def test_jsonl_bad_line_stops_prepare_with_location(write_jsonl, tok):
    path = write_jsonl([{"text": "hello world"}] * 36 + ["{not json"] + [{"text": "hello"}])
    with pytest.raises(DataError, match=rf"{path}:37:2: Expecting property name"):
        prepare(path, tok)


def test_jsonl_bom_crlf_and_blank_lines_are_accepted_with_true_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\r\n   \n{"text": "b"}\r\n{"text": "c"}')
    assert _ok(read_records(path)) == [(f"{path}:1", {"text": "a"}), (f"{path}:4", {"text": "b"}),
                                       (f"{path}:5", {"text": "c"})]


def test_jsonl_invalid_utf8_reports_byte_offset(tmp_path):
    path = tmp_path / "d.jsonl"
    first = b'{"text": "ok"}\n'
    path.write_bytes(first + b'{"text": "caf\xe9"}\n{"text": "fine"}\n')
    records = list(read_records(path))
    assert records[1].problem.reason == "invalid_utf8"
    offset = len(first) + len(b'{"text": "caf')
    assert f"{path}:2: invalid UTF-8 at byte offset {offset}" in str(records[1].problem)
    assert records[2].data == {"text": "fine"}


def test_jsonl_line_separator_inside_string_is_not_a_line_break(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert _ok(read_records(path)) == [(f"{path}:1", {"text": "a\u2028b"})]


def test_json_array_records_carry_the_line_they_start_on(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"},\n\n  {"text": "b"},\n  [1, 2]\n]\n', encoding="utf-8")
    records = list(read_records(path))
    assert [r.location for r in records] == [f"{path}:2", f"{path}:4", f"{path}:5"]
    assert records[2].problem.reason == "not_an_object"


def test_json_array_syntax_error_raises_with_line_and_col(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"text": "a"},\n {"text": "b" "c"}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:3:15: Expecting ',' delimiter"):
        list(read_records(path))


def test_json_file_with_json_lines_content_reads_as_jsonl(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert _ok(read_records(path)) == [(f"{path}:1", {"text": "a"}), (f"{path}:2", {"text": "b"})]


def test_json_single_pretty_printed_object_is_one_record(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('\n{\n  "text": "a"\n}\n', encoding="utf-8")
    assert _ok(read_records(path)) == [(f"{path}:2", {"text": "a"})]


def test_json_invalid_utf8_raises_with_line_and_offset(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n{"text": "\xff"}]')
    with pytest.raises(DataError, match=rf"{path}:2: invalid UTF-8 at byte offset 12"):
        list(read_records(path))


def test_csv_rows_with_bom_crlf_quoted_newlines_and_bad_row_numbers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b'\xef\xbb\xbfinstruction,output\r\nsay hi,"hi\r\nthere"\r\n\r\nbad,row,extra\r\nq,a\r\n')
    records = list(read_records(path))
    assert [r.location for r in records] == [f"{path}:row 1", f"{path}:row 2", f"{path}:row 3"]
    assert records[0].data == {"instruction": "say hi", "output": "hi\r\nthere"}
    assert records[1].problem.reason == "malformed_csv"
    assert "3 fields but the header has 2" in str(records[1].problem)
    assert records[2].data == {"instruction": "q", "output": "a"}


def test_parquet_rows_and_a_bad_row_named_by_number(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b", "c"], "output": ["x", None, "z"]}), path)
    records = list(read_records(path))
    assert [r.location for r in records] == [f"{path}:row {i}" for i in (1, 2, 3)]
    assert records[0].data == {"instruction": "a", "output": "x"}
    with pytest.raises(DataError, match=rf"{path}:row 2: 'output' is null, expected a string"):
        prepare(path, tok, DataOptions(template="chatml"))


def test_unreadable_parquet_raises(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        list(read_records(path))


def test_missing_file_and_unknown_suffix_raise(tmp_path):
    with pytest.raises(DataError, match="no such data file.*read_hub"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unknown data file type '.txt'"):
        read_records(tmp_path / "d.txt")


def test_in_memory_non_objects_are_bad_records():
    records = list(records_from_objects([{"text": "a"}, "oops"]))
    assert records[1].location == "records[1]" and records[1].problem.reason == "not_an_object"


def test_read_hub_goes_through_datasets_load_dataset(tmp_path):
    """The Hub path is `datasets.load_dataset`; its packaged `json` builder runs offline on a local file."""
    pytest.importorskip("datasets")
    from lorakit.data import read_hub

    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    records = list(read_hub("json", data_files=str(src), cache_dir=str(tmp_path / "cache")))
    assert [(r.location, r.data) for r in records] == [("json[train] row 1", {"text": "a"}),
                                                       ("json[train] row 2", {"text": "b"})]


def test_jsonl_nul_byte_is_a_malformed_line_with_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a\x00b"}\n{"text": "ok"}\n')
    records = list(read_records(path))
    assert records[0].problem.reason == "malformed_json"
    assert str(records[0].problem).startswith(f"{path}:1:12: Invalid control character")
    assert records[1].data == {"text": "ok"}
