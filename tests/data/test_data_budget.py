"""A huge record costs bounded memory (its text is cut to a budget before tokenizing), and for every record the
examples, labels, counts and problems are exactly those of tokenizing the whole record then truncating."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from data_helpers import CHATML_JINJA, build_tokenizer, tok, tok_chat  # noqa: F401

from lorakit.data import DataOptions, prepare
from lorakit.data import budget as budget_module
from lorakit.data.budget import char_budget, cut_to_budget
from lorakit.data.formats import normalise

WORDS = ["hello", "world,", "how", "are", "you", "today?", "The", "quick", "brown", "fox", "0123456789", "jumps",
         "Héllo", "wörld", "你好", "世界!", "  ", "\n", "\n\n", "I'm", "here,", "it's", "99", "degrees;", "☃", "—",
         "print(x)", "{a: [1, 2]}", "\t", "a" * 32, "." * 16]


def _text(rng: random.Random, chars: int) -> str:
    out, size = [], 0
    while size < chars:
        word = rng.choice(WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


def _records(seed: int = 0) -> list[dict]:
    """Chat records from short to well past the budget, some holding special-token strings (kept literal) near
    the start or only far past any cut."""
    rng = random.Random(seed)
    records = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _text(rng, 8)}]}
               for _ in range(3)]
    for size in (40, 900, 3000, 9000, 30000):
        reply = _text(rng, size)
        records.append({"messages": [{"role": "user", "content": _text(rng, 12)},
                                     {"role": "assistant", "content": reply}]})
        records.append({"messages": [{"role": "system", "content": _text(rng, size // 3)},
                                     {"role": "user", "content": _text(rng, 12)},
                                     {"role": "assistant", "content": _text(rng, 30)},
                                     {"role": "user", "content": _text(rng, size)},
                                     {"role": "assistant", "content": _text(rng, size // 2)}]})
        records.append({"messages": [{"role": "user", "content": "say <|im_end|> " + _text(rng, 12)},
                                     {"role": "assistant", "content": reply + " <|im_end|> and </s>"}]})
    return records


def _texts(seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": _text(rng, size) + (" </s>" if size > 5000 else "")} for size in (10, 20, 30, 2000, 8000, 40000)]


def _prepare_both(records, tokenizer, options, monkeypatch):
    """(prepare with the budget, prepare with no budget at all)."""
    bounded = prepare(records, tokenizer, options)
    with monkeypatch.context() as m:
        m.setattr(budget_module, "char_budget", lambda max_seq_len: 1 << 62)
        whole = prepare(records, tokenizer, options)
    assert whole.summary.kept >= 3  # (some examples to compare)
    return bounded, whole


def _assert_same(bounded, whole):
    assert [(e.input_ids, e.labels, e.source) for e in bounded.examples] == \
           [(e.input_ids, e.labels, e.source) for e in whole.examples]
    b, w = bounded.summary, whole.summary
    assert (b.kept, b.truncated, b.cut_replies, b.dropped, b.supervised_tokens, b.total_tokens) == \
           (w.kept, w.truncated, w.cut_replies, w.dropped, w.supervised_tokens, w.total_tokens)
    strip = [p.replace("+ tokens", " tokens") for p in b.problems]
    assert [p.split(":")[0] for p in strip] == [p.split(":")[0] for p in w.problems]
    assert [p.split(" tokens >")[1:] for p in strip] == [p.split(" tokens >")[1:] for p in w.problems]


def _cuts(records, fmt: str, max_seq_len: int) -> int:
    return sum(cut_to_budget(normalise(r, fmt), char_budget(max_seq_len)) is not None for r in records)


POLICIES = {"truncate": dict(truncation="truncate"), "drop": dict(truncation="drop"),
            "train_on_prompt": dict(truncation="truncate", train_on_prompt=True)}


@pytest.mark.parametrize("tight", [False, True], ids=["default-budget", "tight-budget"])
@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
@pytest.mark.parametrize("max_seq_len", [48, 256])
@pytest.mark.parametrize("template", ["tokenizer", "alpaca"])
def test_byte_level_chat_records_give_the_examples_of_the_whole_record(tok_chat, template, max_seq_len, policy,
                                                                         tight, monkeypatch):
    if tight:  # 2 characters a token and no slack: cuts close to max_seq_len (the budget then doubles)
        monkeypatch.setattr(budget_module, "CHARS_PER_TOKEN", 2)
        monkeypatch.setattr(budget_module, "BUDGET_SLACK", 0)
    records = _records()
    assert _cuts(records, "messages", max_seq_len) >= 4  # the cut path really runs
    options = DataOptions(template="auto" if template == "tokenizer" else template, max_seq_len=max_seq_len,
                          skip_bad_records=True, max_drop_fraction=1.0, **policy)
    _assert_same(*_prepare_both(records, tok_chat, options, monkeypatch))


@pytest.mark.parametrize("tight", [False, True], ids=["default-budget", "tight-budget"])
@pytest.mark.parametrize("max_seq_len", [48, 256])
def test_byte_level_text_records_give_the_examples_of_the_whole_record(tok, max_seq_len, tight, monkeypatch):
    if tight:
        monkeypatch.setattr(budget_module, "CHARS_PER_TOKEN", 2)
        monkeypatch.setattr(budget_module, "BUDGET_SLACK", 0)
    records = _texts()
    assert _cuts(records, "text", max_seq_len) >= 2
    options = DataOptions(max_seq_len=max_seq_len, max_drop_fraction=1.0)
    _assert_same(*_prepare_both(records, tok, options, monkeypatch))


@pytest.fixture(scope="module")
def sentencepiece_tokenizers(tmp_path_factory):
    """bpe: Llama 2 style, converted by transformers from a sentencepiece BPE model trained here (no split at
    spaces: the whole text is one word to BPE). unigram: a SentencePiece-style unigram model (T5 style, Viterbi
    over each ▁-word) trained with `tokenizers`."""
    spm = pytest.importorskip("sentencepiece")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tmp = tmp_path_factory.mktemp("spm")
    rng = random.Random(3)
    lines = [_text(rng, 200) for _ in range(300)]
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp / "bpe"), vocab_size=450,
                                   hard_vocab_limit=False, model_type="bpe", byte_fallback=True,
                                   character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    source = tmp / "bpe-tok"
    source.mkdir()
    (source / "tokenizer.model").write_bytes((tmp / "bpe.model").read_bytes())
    (source / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    unigram.train_from_iterator(lines, trainers.UnigramTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                               unk_token="<unk>", show_progress=False))
    return {"bpe": AutoTokenizer.from_pretrained(source),
            "unigram": PreTrainedTokenizerFast(tokenizer_object=unigram, bos_token="<s>", eos_token="</s>",
                                               unk_token="<unk>")}


@pytest.mark.parametrize("tight", [False, True], ids=["default-budget", "tight-budget"])
@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_sentencepiece_records_give_the_examples_of_the_whole_record(sentencepiece_tokenizers, kind, tight,
                                                                     monkeypatch):
    if tight:
        monkeypatch.setattr(budget_module, "CHARS_PER_TOKEN", 2)
        monkeypatch.setattr(budget_module, "BUDGET_SLACK", 0)
    tokenizer = sentencepiece_tokenizers[kind]
    for records, fmt, template in ((_records(), "messages", "alpaca"), (_texts(), "text", "auto")):
        assert _cuts(records, fmt, 48) >= 2
        for truncation in ("truncate", "drop"):
            options = DataOptions(template=template, max_seq_len=48, truncation=truncation, skip_bad_records=True,
                                  max_drop_fraction=1.0)
            _assert_same(*_prepare_both(records, tokenizer, options, monkeypatch))


def test_a_cut_turn_keeps_a_special_token_string_its_full_content_has():
    from lorakit.data.formats import Turn

    turns = (Turn("user", "hi"), Turn("assistant", "a" * 100 + "<|im_end|>"), Turn("user", "more"),
             Turn("assistant", "b"))
    cut = cut_to_budget(turns, 50, ("<|im_end|>",))
    assert cut == (Turn("user", "hi"), Turn("assistant", "a" * 48 + "<|im_end|>"))
    assert cut_to_budget(turns, 1000, ("<|im_end|>",)) is None
    assert cut_to_budget("x" * 10, 4) == "xxxx" and cut_to_budget("x" * 10, 10) is None


MEMORY_CHILD = textwrap.dedent("""
    import json, resource, sys
    sys.path.insert(0, sys.argv[1])
    from data_helpers import CHATML_JINJA, build_tokenizer
    from lorakit.data import DataOptions, prepare

    tokenizer = build_tokenizer(CHATML_JINJA)
    sentence = "hello world, how are you today? The quick brown fox jumps over the lazy dog 0123456789. "
    reply = (sentence * (10_000_000 // len(sentence) + 1))[:10_000_000]
    record = {"messages": [{"role": "user", "content": "say it all"}, {"role": "assistant", "content": reply}]}
    prepare([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}], tokenizer,
            DataOptions(max_seq_len=128))  # warm up: lazy imports, template compilation
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    data = prepare([record], tokenizer, DataOptions(max_seq_len=128))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_kib": after - before, "tokens": len(data.examples[0].input_ids),
                      "truncated": data.summary.truncated, "cut_replies": data.summary.cut_replies}))
""")


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_a_10_mb_reply_at_max_seq_len_128_takes_little_memory():
    """Tokenizing the whole 10 MB reply took about 3 GB; cut first, the peak grows by well under 200 MB. Measured
    as the peak RSS of a fresh process, since the tokenizer's memory is not Python's (tracemalloc misses it)."""
    tests = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(tests)], capture_output=True, text=True,
                         timeout=600, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tokens"] == 128 and result["truncated"] == 1 and result["cut_replies"] == 1
    assert result["growth_kib"] < 200 * 1024, result
