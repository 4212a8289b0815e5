"""Reading raw records from local files (JSON, JSONL, CSV, Parquet) and, for users with internet, the Hub.

A record is one dict plus the place it came from (`file:line` or `file:row N`), so that every later
complaint about it can name that place. A line that cannot be parsed at all is not an exception here:
it is yielded as a `Record` carrying a `BadRecord`, because whether it stops the run or is skipped and
counted is the caller's decision (`DataOptions.skip_bad_records`). Only problems that make the rest of
the file unreadable (a broken JSON array, undecodable CSV, an unreadable Parquet file) raise at once.

We parse with the standard library instead of `datasets.load_dataset("json")` because the latter reports
`JSON parse error ... in row 0` where the row is a block index (huggingface/datasets#6315); we report
`file:line:col`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError

SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class BadRecord(DataError):
    """One record is unusable. `reason` is a short code that summaries count by (e.g. `missing_key`)."""

    def __init__(self, reason: str, message: str, location: str | None = None):
        self.reason = reason
        self.detail = message
        self.location = location
        super().__init__(f"{location}: {message}" if location else message)

    def at(self, location: str) -> BadRecord:
        """The same problem, placed at `location` (the reader knows where; the validator knows what)."""
        return BadRecord(self.reason, self.detail, location)


@dataclass(frozen=True)
class Record:
    """One raw record: `data` is the parsed object, or None when `problem` says why it could not be parsed."""

    location: str
    data: Mapping[str, Any] | None
    problem: BadRecord | None = None


def read_records(path: str | os.PathLike[str], *, kind: str | None = None) -> Iterator[Record]:
    """Yield the records of a local file; `kind` (json|jsonl|csv|parquet) overrides the file suffix."""
    p = Path(path)
    if not p.is_file():
        hint = " (for a Hub dataset by name use lorakit.data.read_hub)" if not p.exists() else ""
        raise DataError(f"{p}: no such data file{hint}")
    kind = kind or SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise DataError(f"{p}: unknown data file type {p.suffix!r}; expected one of {', '.join(SUFFIXES)}")
    if kind == "jsonl":
        return _read_jsonl(p)
    if kind == "json":
        return _read_json(p)
    if kind == "csv":
        return _read_csv(p)
    if kind == "parquet":
        return _read_parquet(p)
    raise DataError(f"{p}: unknown data file kind {kind!r}; expected json, jsonl, csv or parquet")


def records_from_objects(objects: Iterable[Any], *, name: str = "records") -> Iterator[Record]:
    """Records from in-memory objects (tests, or data built in code); locations read `name[i]`."""
    for i, obj in enumerate(objects):
        if isinstance(obj, Record):
            yield obj
        else:
            yield _as_record(f"{name}[{i}]", obj)


def read_hub(name: str, *, split: str = "train", **load_kwargs: Any) -> Iterator[Record]:
    """Records of a Hub dataset through `datasets.load_dataset` (needs internet and `pip install datasets`).

    `datasets` caches the download; rows are plain dicts, so the same validation applies. Locations read
    `name[split] row N` (1-based).
    """
    try:
        import datasets
    except ImportError as e:  # an optional dependency: only this code path needs it
        raise DataError("reading a Hub dataset needs the `datasets` package: pip install datasets") from e
    try:
        ds = datasets.load_dataset(name, split=split, **load_kwargs)
    except Exception as e:  # noqa: BLE001 - any failure here is "the dataset is unusable", said with its cause
        raise DataError(f"cannot load dataset {name!r} (split {split!r}): {e}") from e
    for i, row in enumerate(ds, start=1):
        yield _as_record(f"{name}[{split}] row {i}", row)


def _as_record(location: str, obj: Any) -> Record:
    if isinstance(obj, Mapping):
        return Record(location, obj)
    return Record(location, None, BadRecord("not_an_object", f"expected a JSON object, got {_kind(obj)}", location))


def _kind(obj: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(obj), "a number" if isinstance(obj, (int, float)) else type(obj).__name__
    )


def _decode_line(path: Path, raw: bytes, lineno: int, offset: int) -> str | BadRecord:
    """Decode one line as UTF-8; a bad byte is reported with its absolute byte offset in the file."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        at = offset + e.start
        return BadRecord("invalid_utf8", f"invalid UTF-8 at byte offset {at} (byte 0x{raw[e.start]:02x})",
                         f"{path}:{lineno}")


def _read_jsonl(path: Path) -> Iterator[Record]:
    """One JSON object per line. Blank lines are skipped; CRLF and a leading BOM are accepted.

    Lines are split on b"\\n" only: `str.splitlines` would also split on U+2028, which is legal inside a
    JSON string.
    """
    offset = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start = offset
            offset += len(raw)
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw, start = raw[3:], start + 3
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            text = _decode_line(path, raw, lineno, start)
            if isinstance(text, BadRecord):
                yield Record(text.location or str(path), None, text)
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield Record(f"{path}:{lineno}", None,
                             BadRecord("malformed_json", e.msg, f"{path}:{lineno}:{e.colno}"))
                continue
            yield _as_record(f"{path}:{lineno}", obj)


def _read_text(path: Path) -> str:
    """The whole file as text; a BOM is dropped and invalid UTF-8 raises with line and byte offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # utf-8-sig offsets exclude the BOM; report offsets in the file as it is on disk.
        at = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data.count(b"\n", 0, at) + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 at byte offset {at} (byte 0x{data[at]:02x})") from None


def _read_json(path: Path) -> Iterator[Record]:
    """A JSON file: either one array of objects, or JSON-lines content under a .json name.

    The array is walked element by element with `raw_decode` so each record gets the line it starts on.
    """
    text = _read_text(path)
    start = len(text) - len(text.lstrip())
    if start == len(text):
        return
    if text[start] != "[":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            yield from _read_jsonl(path)  # JSON-lines content: per-line errors and locations
            return
        yield _as_record(f"{path}:{_line_of(text, start)}", obj)
        return
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, start + 1)
    index = 0
    try:
        if text[pos:pos + 1] == "]":
            pos = _skip_ws(text, pos + 1)
        else:
            while True:
                obj, end = decoder.raw_decode(text, pos)
                index += 1
                yield _as_record(f"{path}:{_line_of(text, pos)}", obj)
                pos = _skip_ws(text, end)
                if text[pos:pos + 1] == ",":
                    pos = _skip_ws(text, pos + 1)
                    continue
                if text[pos:pos + 1] == "]":
                    pos = _skip_ws(text, pos + 1)
                    break
                raise json.JSONDecodeError("Expecting ',' delimiter or ']'", text, pos)
        if pos != len(text):
            raise json.JSONDecodeError("Extra data after the array", text, pos)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: {e.msg} (in a JSON array, after {index} records; "
                        "the rest of the file cannot be read)") from None


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _read_csv(path: Path) -> Iterator[Record]:
    """A CSV file with a header row. Row N counts data rows from 1; the line is where the row ends
    (a quoted field may span lines). Cells are strings; empty rows are skipped."""
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise DataError(f"{path}:row 0 (header): {e}") from None
    if len(set(header)) != len(header):
        raise DataError(f"{path}: duplicate column names in the header: {header}")
    row_no = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            row_no += 1
            loc = f"{path}:row {row_no}"
            yield Record(loc, None, BadRecord("malformed_csv", f"{e} (line {reader.line_num})", loc))
            continue
        if not row:
            continue
        row_no += 1
        loc = f"{path}:row {row_no}"
        if len(row) != len(header):
            yield Record(loc, None, BadRecord(
                "malformed_csv", f"{len(row)} fields but the header has {len(header)} (line {reader.line_num})",
                loc))
            continue
        yield Record(loc, dict(zip(header, row)))


def _read_parquet(path: Path) -> Iterator[Record]:
    """A Parquet file, read in batches so memory stays bounded; row N counts from 1."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    row_no = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            row_no += 1
            yield _as_record(f"{path}:row {row_no}", row)
