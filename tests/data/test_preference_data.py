"""Preference data: TRL's pair and KTO formats rendered by the chat template, completions alone scored, lengths
cut as documented, and bad records reported with file:line or skipped and counted."""

from __future__ import annotations

import pytest

from lorakit.data import DataOptions
from lorakit.data.preference import Lengths, collate_preference, kl_partners, prepare_preference
from lorakit.data.templates import IGNORE_INDEX
from lorakit.errors import DataError
from data_helpers import tok_chat, write_jsonl  # noqa: F401  (fixtures)

OPTS = DataOptions(template="auto")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_string_pair_renders_prompt_as_user_turn_and_scores_only_completions(tok_chat):
    data = prepare_preference([{"prompt": "say hi", "chosen": "hi there", "rejected": "go away"}], tok_chat, OPTS)
    pair = data.examples[0]
    assert pair.prompt_ids == _ids(tok_chat, "<|im_start|>user\nsay hi<|im_end|>\n<|im_start|>assistant\n")
    # the completion runs to its end-of-turn token inclusive; the template's trailing newline is not scored
    assert pair.chosen_ids == _ids(tok_chat, "hi there<|im_end|>")
    assert pair.rejected_ids == _ids(tok_chat, "go away<|im_end|>")
    batch = collate_preference(data, [0])
    assert batch["input_ids"].shape[0] == 2  # chosen row, then rejected row
    scored = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert scored == pair.chosen_ids


def test_conversational_multi_turn_and_implicit_prompt_give_the_same_tokens(tok_chat):
    history = [{"role": "system", "content": "You are a terse helper."}, {"role": "user", "content": "hello"},
               {"role": "assistant", "content": "hi"}, {"role": "user", "content": "two plus two?"}]
    explicit = {"prompt": history, "chosen": [{"role": "assistant", "content": "four"}],
                "rejected": [{"role": "assistant", "content": "five"}]}
    implicit = {"chosen": history + [{"role": "assistant", "content": "four"}],
                "rejected": history + [{"role": "assistant", "content": "five"}]}
    a, b = (prepare_preference([r], tok_chat, OPTS).examples[0] for r in (explicit, implicit))
    assert (a.prompt_ids, a.chosen_ids, a.rejected_ids) == (b.prompt_ids, b.chosen_ids, b.rejected_ids)
    assert a.prompt_ids[-len(_ids(tok_chat, "<|im_start|>assistant\n")):] == _ids(tok_chat, "<|im_start|>assistant\n")


def test_long_prompt_keeps_its_end_and_completion_is_cut_to_the_room_left(tok_chat):
    record = {"prompt": "hello world, how are you today? " * 20, "chosen": "I am fine, thanks for asking.",
              "rejected": "The quick brown fox jumps over the lazy dog."}
    full = prepare_preference([record], tok_chat, OPTS).examples[0]
    cut = prepare_preference([record], tok_chat, OPTS, lengths=Lengths(2048, max_prompt_len=10)).examples[0]
    assert cut.prompt_ids == full.prompt_ids[-10:]  # left-truncated: the part next to the completion stays
    assert cut.chosen_ids == full.chosen_ids
    tight = prepare_preference([record], tok_chat, OPTS, lengths=Lengths(14, max_prompt_len=10))
    assert tight.examples[0].chosen_ids == full.chosen_ids[:4] and tight.summary.truncated == 1


@pytest.mark.parametrize("record, reason", [
    ({"prompt": "hi", "chosen": "same", "rejected": "same"}, "identical_completions"),
    ({"prompt": "hi", "chosen": "  ", "rejected": "no"}, "empty_completion"),
    ({"prompt": "hi", "chosen": "yes"}, "missing_key"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "bad_role_order"),
    ({"prompt": "hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "bad_completion"),
], ids=["identical", "empty", "missing", "prompt-not-user", "completion-not-assistant"])
def test_bad_pair_is_reported_with_its_line(tok_chat, write_jsonl, record, reason):
    good = {"prompt": "hi", "chosen": "hello", "rejected": "go away"}
    path = write_jsonl([good, record])
    with pytest.raises(DataError, match=f"{path.name}:2.*") as err:
        prepare_preference(path, tok_chat, OPTS)
    assert reason in str(err.value)
    skipped = prepare_preference(path, tok_chat, DataOptions(template="auto", skip_bad_records=True,
                                                             max_drop_fraction=0.5))
    assert len(skipped.examples) == 1 and skipped.summary.dropped[reason] == 1


def test_prompt_that_fills_the_budget_is_a_bad_record_and_identical_after_cut_too(tok_chat):
    long = {"prompt": "hello world " * 40, "chosen": "fine", "rejected": "no"}
    with pytest.raises(DataError, match="(?s)prompt_fills_budget.*max_prompt_len"):
        prepare_preference([long], tok_chat, DataOptions(template="auto", max_seq_len=32))
    same_start = {"prompt": "hi", "chosen": "hello world, how are you", "rejected": "hello world, thanks"}
    with pytest.raises(DataError, match="identical_after_truncation"):
        prepare_preference([same_start], tok_chat, OPTS, lengths=Lengths(2048, max_completion_len=2))


def test_kto_records_and_their_kl_partners(tok_chat):
    records = [{"prompt": "hi", "completion": "hello", "label": True},
               {"prompt": "two plus two?", "completion": "five", "label": "false"},
               {"prompt": "bye", "completion": "see you", "label": True}]
    data = prepare_preference(records, tok_chat, OPTS, paired=False)
    assert [e.desirable for e in data.examples] == [True, False, True]
    assert kl_partners(5, 2) == [1, 0, 3, 2, 4]  # the previous completion within blocks of batch_size
    batch = collate_preference(data, [0, 1], kl_partners(3, 2))
    assert batch["desirable"].tolist() == [True, False]
    kl_scored = batch["kl_labels"][0][batch["kl_labels"][0] != IGNORE_INDEX].tolist()
    assert kl_scored == data.examples[1].completion_ids  # prompt 0 with completion 1
    with pytest.raises(DataError, match="bad_label"):
        prepare_preference([{"prompt": "hi", "completion": "x", "label": 3}], tok_chat, OPTS, paired=False)


def test_a_huge_record_is_cut_before_tokenizing_to_the_same_tokens(tok_chat):
    """A prompt of 100k characters costs a bounded tokenization: the kept end and the completions equal those of
    the whole record (budget.py's rule, applied with the prompt keeping its end)."""
    import lorakit.data.preference as preference

    record = {"prompt": "hello world, how are you today? " * 3000 + "And three plus three?",
              "chosen": "Six. " * 3000, "rejected": "Seven. " * 3000}
    lengths = Lengths(64, max_prompt_len=24)
    seen: list[int] = []
    real = preference.tokenize_reply

    def spy(prompt, reply, *args):
        seen.append(sum(len(t.content) for t in prompt) + len(reply))
        return real(prompt, reply, *args)

    preference.tokenize_reply = spy
    try:
        cut = prepare_preference([record], tok_chat, OPTS, lengths=lengths).examples[0]
    finally:
        preference.tokenize_reply = real
    assert max(seen) < 10_000  # the budget for 64 tokens, not the record's 130k characters
    whole_prompt, whole_chosen = real(preference.prompt_turns(record["prompt"]), record["chosen"], tok_chat,
                                      preference.resolve_template(tok_chat, "auto"))
    assert cut.prompt_ids == whole_prompt[-24:] and cut.chosen_ids == whole_chosen[:64 - 24]
