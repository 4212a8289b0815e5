"""RL prompts: the prompt part of any chat format, rendered for generation, the record kept for the rewards; bad
records named with file:line or skipped and counted."""

from __future__ import annotations

import pytest

from lorakit.data import DataOptions
from lorakit.data.prompts import prepare_prompts
from lorakit.data.templates import resolve_template
from lorakit.errors import DataError
from data_helpers import tok_chat, write_jsonl  # noqa: F401  (fixtures)


def _generation_prompt(tokenizer, *messages) -> list[int]:
    return list(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, return_dict=True)["input_ids"])


def test_every_chat_format_gives_its_prompt_rendered_for_generation(tok_chat, write_jsonl):
    path = write_jsonl([
        {"prompt": "What is 2 plus 2?", "answer": "4"},
        {"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Say hi."}]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "Say hi."}]},
        {"instruction": "say hi", "input": "", "output": "hi there"},
    ])
    data = prepare_prompts(path, tok_chat, max_prompt_len=256)
    assert [p.location for p in data.records] == [f"{path}:{i}" for i in range(1, 6)]
    first = data.records[0]
    assert first.ids == _generation_prompt(tok_chat, {"role": "user", "content": "What is 2 plus 2?"})
    assert first.text == "What is 2 plus 2?" and first.record["answer"] == "4"  # the whole row goes to the rewards
    assert data.records[1].ids == _generation_prompt(tok_chat, {"role": "system", "content": "Be terse."},
                                                     {"role": "user", "content": "Say hi."})
    # a conversation's final assistant turn is its reference answer, not part of the prompt
    assert data.records[2].ids == data.records[3].ids == _generation_prompt(tok_chat, {"role": "user",
                                                                                        "content": "Say hi."})
    assert data.records[4].text == "say hi"
    assert resolve_template(tok_chat).name == data.summary.template


def test_bad_prompt_records_are_named_or_skipped_and_counted(tok_chat, write_jsonl):
    path = write_jsonl([
        {"prompt": "fine"},
        {"text": "raw text has no prompt part"},
        {"prompt": "   "},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "assistant", "content": "c"}]},
        {"prompt": "word " * 200},
    ])
    with pytest.raises(DataError) as err:
        prepare_prompts(path, tok_chat, max_prompt_len=64)
    message = str(err.value)
    for line, reason in ((2, "a text record has no prompt part"), (3, "'prompt' is empty"),
                         (4, "the prompt must end with a user turn"), (5, "over the 64 allowed")):
        assert f"{path}:{line}" in message and reason in message, (line, message)
    data = prepare_prompts(path, tok_chat, DataOptions(skip_bad_records=True, max_drop_fraction=0.9), max_prompt_len=64)
    assert len(data.records) == 1 and data.summary.dropped_total == 4
