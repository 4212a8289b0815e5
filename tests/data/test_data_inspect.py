"""`lorakit data inspect`: examples rendered with the trained tokens marked, counts, and a warning for a reply
that truncation cut before its end-of-turn token."""

from __future__ import annotations

import json

import pytest

from data_helpers import save_chat_llama
from lorakit.cli import main


@pytest.fixture
def config(tmp_path):
    model = save_chat_llama(tmp_path / "model")
    with open(tmp_path / "train.jsonl", "w") as f:
        for a, b in ((3, 4), (5, 1)):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                             {"role": "assistant", "content": f"It is {a + b}."}]}) + "\n")
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {{name_or_path: {model}}}\ndata: {{train: {tmp_path / 'train.jsonl'}, max_seq_len: 64}}\n")
    return path


def test_inspect_marks_exactly_the_assistant_reply_and_its_end_of_turn(config, capsys):
    assert main(["data", "inspect", str(config), "-n", "1", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "== example 1" in out and "== example 2" not in out  # -n 1 renders one, checks both
    body = out.split("== example 1", 1)[1].split("\n", 1)[1]
    # the reply and its end-of-turn token train, nothing of the prompt does
    assert body.startswith("<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n[[It is 7.<|im_end|>]]\n")
    assert body.count("[[") == 1
    assert "no warnings in 2 examples" in out


def test_inspect_warns_about_a_reply_cut_by_truncation(config, capsys):
    # the prompt is 21 tokens: 24 keeps 3 of the reply's 7, cut before its end-of-turn token
    assert main(["data", "inspect", str(config), "--set", "data.max_seq_len=24", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "not EOS or an end-of-turn token: the reply was cut by truncation" in out
    assert "2 of 2 examples have warnings" in out


def test_inspect_colours_on_request_and_explains_a_missing_validation_split(config, capsys):
    assert main(["data", "inspect", str(config), "--color", "always"]) == 0
    assert "\033[32mIt is 7." in capsys.readouterr().out
    assert main(["data", "inspect", str(config), "--split", "validation"]) != 0
    assert "data.validation: not set" in capsys.readouterr().err
