"""Templates and loss masks: checked token by token on a multi-turn conversation for every template."""

from __future__ import annotations

import pytest
from data_helpers import CHATML_JINJA, build_tokenizer, tok, tok_chat  # noqa: F401 (fixtures)

from lorakit.data import IGNORE_INDEX, BadRecord, Turn, resolve_template, tokenize_conversation, tokenize_text
from lorakit.errors import DataError

CONV = (Turn("system", "You are terse."), Turn("user", "Hi"), Turn("assistant", "Hello there"),
        Turn("user", "What is two plus two?"), Turn("assistant", "four"))
Q = "What is two plus two?"
# The rendered conversation cut into (text, supervised) pieces: written out by hand per template.
EXPECTED = {
    "chatml": [
        ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", 0),
        ("Hello there<|im_end|>", 1),
        (f"\n<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n", 0),
        ("four<|im_end|>", 1),
        ("\n", 0)],
    "llama3": [
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", 0),
        ("Hello there<|eot_id|>", 1),
        (f"<|start_header_id|>user<|end_header_id|>\n\n{Q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
         0),
        ("four<|eot_id|>", 1)],
    "alpaca": [
        ("<|begin_of_text|>You are terse.\n\n### Instruction:\nHi\n\n### Response:\n", 0),
        ("Hello there</s>", 1),
        (f"### Instruction:\n{Q}\n\n### Response:\n", 0),
        ("four</s>", 1)],
    "plain": [
        ("<|begin_of_text|>You are terse.\n\nHi\n", 0),
        ("Hello there</s>", 1),
        (f"{Q}\n", 0),
        ("four</s>", 1)],
}
EXPECTED["tokenizer"] = EXPECTED["chatml"]
END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "alpaca": "</s>", "plain": "</s>", "tokenizer": "<|im_end|>"}


def _reference(tokenizer, pieces):
    """Ids and labels built independently: each piece encoded alone, labelled by its flag."""
    ids, labels = [], []
    for text, supervised in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    labels[0] = IGNORE_INDEX
    return ids, labels


def _supervised_runs(tokenizer, ids, labels):
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            runs, cur = runs + [cur], []
    return [tokenizer.decode(r) for r in runs + ([cur] if cur else [])]


@pytest.fixture(params=list(EXPECTED))
def setup(request, tok, tok_chat):
    name = request.param
    tokenizer = tok_chat if name == "tokenizer" else tok
    return name, tokenizer, resolve_template(tokenizer, "auto" if name == "tokenizer" else name)


def test_mask_supervises_each_assistant_turn_and_its_end_token_only(setup):
    """Token by token: labels equal the ids on every assistant reply + end-of-turn token, -100 elsewhere."""
    name, tokenizer, template = setup
    got = tokenize_conversation(CONV, tokenizer, template)
    ids, labels = _reference(tokenizer, EXPECTED[name])
    assert got.input_ids == ids
    for k, (want, have) in enumerate(zip(labels, got.labels)):
        assert want == have, f"{name}: token {k} ({tokenizer.decode([ids[k]])!r}) label {have}, expected {want}"
    assert len(got.labels) == len(labels)
    assert _supervised_runs(tokenizer, got.input_ids, got.labels) == [f"Hello there{END[name]}", f"four{END[name]}"]


def test_train_on_prompt_supervises_every_token_but_the_first(setup):
    name, tokenizer, template = setup
    got = tokenize_conversation(CONV, tokenizer, template, train_on_prompt=True)
    assert got.labels == [IGNORE_INDEX] + got.input_ids[1:]


def test_tokenizer_template_matches_equivalent_builtin(tok, tok_chat):
    a = tokenize_conversation(CONV, tok_chat, resolve_template(tok_chat, "auto"))
    b = tokenize_conversation(CONV, tok, resolve_template(tok, "chatml"))
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)


@pytest.mark.parametrize("typed", ["<|im_end|>", "</s>", "<|eot_id|>", "<|im_start|>assistant\n"])
def test_special_token_strings_typed_in_user_content_are_encoded_as_text(setup, typed):
    name, tokenizer, template = setup
    user = f"please print {typed} literally"
    conv = (Turn("user", user), Turn("assistant", "ok"))
    got = tokenize_conversation(conv, tokenizer, template)
    plain = tokenize_conversation((Turn("user", "please print X literally"), Turn("assistant", "ok")), tokenizer,
                                  template)
    specials = set(tokenizer.all_special_ids)
    # Same control tokens as without the typed string: the typed one added none.
    assert [i for i in got.input_ids if i in specials] == [i for i in plain.input_ids if i in specials]
    as_text = tokenizer(user, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert any(got.input_ids[k:k + len(as_text)] == as_text for k in range(len(got.input_ids)))


def test_special_token_string_in_assistant_reply_is_text_and_supervised(setup):
    name, tokenizer, template = setup
    conv = (Turn("user", "Hi"), Turn("assistant", "say <|im_end|> now"))
    got = tokenize_conversation(conv, tokenizer, template)
    assert _supervised_runs(tokenizer, got.input_ids, got.labels) == [f"say <|im_end|> now{END[name]}"]
    end_id = tokenizer.convert_tokens_to_ids(END[name])
    assert [i for i in got.labels if i == end_id] == [end_id]


def test_special_tokens_parse_normally_again_after_a_literal_encode(tok):
    tokenize_conversation((Turn("user", "<|im_end|>"), Turn("assistant", "ok")), tok, resolve_template(tok, "chatml"))
    assert tok("<|im_end|>", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_template_that_does_not_round_trip_raises():
    """The generation prompt says `bot` but assistant turns render as `assistant`: the mask would be wrong."""
    jinja = CHATML_JINJA.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>bot\n{% endif %}")
    tokenizer = build_tokenizer(jinja)
    with pytest.raises(BadRecord, match="does not round-trip") as err:
        tokenize_conversation(CONV, tokenizer, resolve_template(tokenizer))
    assert err.value.reason == "template_roundtrip"


def test_template_without_end_of_turn_token_raises():
    jinja = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
             "{% if add_generation_prompt %}assistant: {% endif %}")
    tokenizer = build_tokenizer(jinja)
    with pytest.raises(BadRecord, match="never learn to stop") as err:
        tokenize_conversation(CONV, tokenizer, resolve_template(tokenizer))
    assert err.value.reason == "no_end_of_turn"


def test_template_that_transforms_content_cannot_keep_special_text_literal():
    tokenizer = build_tokenizer(CHATML_JINJA.replace("{{ m['content'] }}", "{{ m['content'] | trim }}"))
    template = resolve_template(tokenizer)
    tokenize_conversation(CONV, tokenizer, template)  # fine without special strings in content
    with pytest.raises(BadRecord, match="transforms message content"):
        tokenize_conversation((Turn("user", " <|im_end|> "), Turn("assistant", "ok")), tokenizer, template)


def test_template_that_raises_is_a_bad_record():
    tokenizer = build_tokenizer("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(BadRecord, match="roles must alternate") as err:
        tokenize_conversation(CONV, tokenizer, resolve_template(tokenizer))
    assert err.value.reason == "template_error"


def test_auto_template_without_tokenizer_chat_template_is_an_error(tok):
    with pytest.raises(DataError, match="no chat_template; set template to one of chatml, llama3, alpaca, plain"):
        resolve_template(tok, "auto")


def test_builtin_template_needs_its_special_tokens():
    tokenizer = build_tokenizer(special=["</s>"])
    with pytest.raises(DataError, match="lacks <\\|im_start\\|>, <\\|im_end\\|>"):
        resolve_template(tokenizer, "chatml")
    resolve_template(tokenizer, "plain")  # needs only EOS


def test_text_is_bos_text_eos_with_special_strings_as_text(tok):
    got = tokenize_text("a </s> b", tok)
    body = tok("a </s> b", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert got.input_ids == [tok.bos_token_id, *body, tok.eos_token_id]
    assert got.input_ids.count(tok.eos_token_id) == 1
    assert got.labels == [IGNORE_INDEX] + got.input_ids[1:]
