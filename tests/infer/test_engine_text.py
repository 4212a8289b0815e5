"""Incremental detokenization: stop strings cut the text, and text that may start one is held back."""

from __future__ import annotations

from lorakit.infer.text import TextStream


class CharTokenizer:
    """Token i is chr(i): lets a test write the completion as text."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def feed(stream: TextStream, text: str) -> tuple[list[str], bool]:
    out, ids = [], []
    for ch in text:
        ids.append(ord(ch))
        piece, stopped = stream.add(ids)
        out.append(piece)
        if stopped:
            return out, True
    out.append(stream.flush())
    return out, False


def test_stop_string_cut_and_never_emitted_in_part():
    out, stopped = feed(TextStream(CharTokenizer(), ["END"]), "abcENxyEND tail")
    assert stopped and "".join(out) == "abcENxy"
    assert all("E" not in piece for piece in out[:5])  # "E", "EN" were held back until they could not be "END"


def test_earliest_of_several_stops_wins():
    out, stopped = feed(TextStream(CharTokenizer(), ["zz", "b"]), "aazzb")
    assert stopped and "".join(out) == "aa"


def test_held_text_flushed_when_no_stop_comes():
    out, stopped = feed(TextStream(CharTokenizer(), ["xyz"]), "abxy")
    assert not stopped and "".join(out) == "abxy" and out[-1] == "xy"


def test_incomplete_character_waits():
    stream = TextStream(CharTokenizer(), [])
    assert stream.add([ord("a"), 0xFFFD]) == ("a", False)  # decode's marker of a split UTF-8 character
    assert stream.add([ord("a"), ord("é")]) == ("é", False)
