"""Packing, collation and batch order: packed loss == unpacked loss; padding; seeded length grouping."""

from __future__ import annotations

import pytest
import torch
from data_helpers import chat, tok  # noqa: F401 (fixtures)

from lorakit.data import (IGNORE_INDEX, DataOptions, LengthGroupedBatchSampler, block_causal_mask, collate,
                          collate_packed, iter_batches, pack, packed_rows, prepare)
from lorakit.data.prepare import Example

TEXTS = ["hello world, how are you today?", "I am fine.", "The quick brown fox jumps over the lazy dog.",
         "What is two plus two? It is four.", "thanks for asking", "0123456789 and 42", "hi", "say hi there"]


def _ex(n, start=0):
    ids = list(range(start, start + n))
    return Example(ids, list(ids), f"ex{start}")


def test_pack_fits_rows_uses_each_example_once_and_restarts_positions():
    examples = [_ex(n, 100 * k) for k, n in enumerate([5, 9, 3, 7, 2, 8, 1])]
    rows = pack(examples, 10)
    assert all(len(r) <= 10 for r in rows)
    assert sorted(i for r in rows for i in r.example_indices) == list(range(len(examples)))
    assert len(rows) == 4  # 35 tokens in rows of 10: best-fit decreasing needs the minimum
    for r in rows:
        at = 0
        for s, i in enumerate(r.example_indices):
            n = len(examples[i].input_ids)
            assert r.input_ids[at:at + n] == examples[i].input_ids
            assert r.position_ids[at:at + n] == list(range(n))
            assert r.segment_ids[at:at + n] == [s] * n
            assert r.labels[at:at + n] == [IGNORE_INDEX] + examples[i].labels[1:]
            at += n
    assert pack(examples, 10) == rows  # deterministic


def test_block_causal_mask_blocks_across_segments_and_the_future():
    seg = torch.tensor([[0, 0, 1, 1, 1, 2]])
    allowed = block_causal_mask(seg, torch.bool)
    assert allowed.shape == (1, 1, 6, 6) and allowed.dtype == torch.bool
    want = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                         [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(allowed[0, 0], want)
    additive = block_causal_mask(seg, torch.float32)
    assert torch.equal(additive[0, 0] == 0, want)
    assert torch.all(additive[0, 0][~want] == torch.finfo(torch.float32).min)


def _llama(vocab, impl, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128)
    cfg._attn_implementation = impl
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def mixed_examples(tok):
    """Text and chat examples of varied lengths, including labels masked on prompts."""
    text = prepare([{"text": t} for t in TEXTS], tok).examples
    convs = prepare([chat("Hi", "Hello there"), chat("What is two plus two?", "four", "And three?", "six"),
                     chat("say hi", "hi there", system="You are terse.")], tok, DataOptions(template="chatml")).examples
    return text + convs


@pytest.mark.parametrize("impl, mask", [("eager", "float"), ("sdpa", "float"), ("sdpa", "bool"),
                                        ("sdpa", "position_ids")])
def test_packed_loss_equals_unpacked_loss(tok, mixed_examples, impl, mask):
    """Same examples, same tiny seeded Llama: the mean loss over supervised tokens matches within 1e-5."""
    model = _llama(len(tok), impl)
    pad = tok.eos_token_id
    with torch.no_grad():
        unpacked = model(**collate(mixed_examples, pad)).loss
        rows = pack(mixed_examples, 64)
        assert len(rows) < len(mixed_examples) and any(len(r.example_indices) > 2 for r in rows)
        batch = collate_packed(rows, pad, mask=mask)
        # position_ids-only packing is detected by transformers only without a KV cache.
        packed = model(**batch, use_cache=False).loss
    assert batch["input_ids"].shape[1] <= 64
    assert torch.allclose(packed, unpacked, atol=1e-5, rtol=0), (packed.item(), unpacked.item())


def test_collate_pads_to_longest_with_pad_id_ignored_labels_and_attention_mask():
    batch = collate([_ex(3, 10), _ex(5, 20)], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 0, 0], [20, 21, 22, 23, 24]]
    assert batch["labels"].tolist() == [[10, 11, 12, -100, -100], [20, 21, 22, 23, 24]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert collate([_ex(3)], 0, pad_to_multiple_of=8)["input_ids"].shape == (1, 8)


def test_collate_packed_pads_rows_as_their_own_segment():
    rows = pack([_ex(4, 10), _ex(2, 20), _ex(3, 30)], 6)  # rows: [4+2], [3]
    batch = collate_packed(rows, pad_token_id=0, mask="bool")
    assert batch["input_ids"].shape == (2, 6) and batch["attention_mask"].shape == (2, 1, 6, 6)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert batch["labels"][1].tolist() == [-100, 31, 32, -100, -100, -100]
    assert bool(batch["attention_mask"].any(-1).all())  # every query attends to something
    assert not batch["attention_mask"][1, 0, 3:, :3].any()  # padding sees no real token
    assert not batch["attention_mask"][1, 0, :3, 3:].any()


def test_sampler_order_is_a_pure_function_of_seed_and_epoch():
    lengths = [(i * 37) % 101 for i in range(300)]
    a = LengthGroupedBatchSampler(lengths, 8, seed=3)
    b = LengthGroupedBatchSampler(lengths, 8, seed=3)
    assert a.batches(0) == b.batches(0) and a.batches(5) == b.batches(5)
    assert a.batches(0) != a.batches(1)
    assert a.batches(0) != LengthGroupedBatchSampler(lengths, 8, seed=4).batches(0)
    b.set_epoch(5)
    assert list(b) == a.batches(5)
    for epoch in range(3):  # each epoch a permutation: nothing skipped or repeated
        assert sorted(i for batch in a.batches(epoch) for i in batch) == list(range(300))
    assert len(a) == len(a.batches(0)) == 38


def test_sampler_groups_by_length_and_puts_the_longest_batch_first():
    lengths = [(i * 37) % 101 for i in range(400)]
    batches = LengthGroupedBatchSampler(lengths, 8, seed=0).batches(0)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    shuffled = LengthGroupedBatchSampler(lengths, 8, seed=0, group_by_length=False).batches(0)
    spread_random = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in shuffled) / len(shuffled)
    assert spread < spread_random / 5
    assert max(lengths[i] for i in batches[0]) == max(lengths)


def _correlation(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    return cov / (sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys)) ** 0.5


def test_sampler_batch_order_is_no_longest_to_shortest_saw_tooth():
    """Batches are length-grouped but not emitted longest to shortest within each mega-batch (a curriculum that
    ends every stretch of steps on the shortest examples): over any mega-batch's worth of consecutive steps,
    batch length and position are uncorrelated, not correlated ~-1."""
    lengths = [(i * 37) % 101 + 1 for i in range(2000)]
    factor = 10
    for seed in range(3):
        batches = LengthGroupedBatchSampler(lengths, 8, seed=seed, mega_batch_factor=factor).batches(0)
        means = [sum(lengths[i] for i in b) / len(b) for b in batches]
        # a mega-batch's worth of steps at a time, the first (which holds the longest-first batch) aside
        windows = [means[k:k + factor] for k in range(factor, len(means) - factor + 1, factor)]
        mean_corr = sum(_correlation(list(range(factor)), w) for w in windows) / len(windows)
        assert abs(mean_corr) < 0.3, (seed, mean_corr)
        falls = sum(a > b for a, b in zip(means, means[1:])) / (len(means) - 1)
        assert 0.35 < falls < 0.65, (seed, falls)


def test_sampler_groups_only_within_each_mega_batch():
    """mega_batch_factor=2 (a step of 2 micro-batches): the 2 batches of each step split its examples by length,
    but the steps themselves are random samples, as spread out in length as plain shuffled pairs of batches."""
    lengths = [(i * 37) % 101 + 1 for i in range(400)]
    batches = LengthGroupedBatchSampler(lengths, 8, seed=0, mega_batch_factor=2).batches(0)
    steps = [batches[k:k + 2] for k in range(0, len(batches), 2)]
    for a, b in steps:
        longer, shorter = sorted((a, b), key=lambda batch: -max(lengths[i] for i in batch))
        assert min(lengths[i] for i in longer) >= max(lengths[i] for i in shorter)

    def step_spread(batch_list):
        pairs = [batch_list[k] + batch_list[k + 1] for k in range(0, len(batch_list) - 1, 2)]
        return sum(max(lengths[i] for i in p) - min(lengths[i] for i in p) for p in pairs) / len(pairs)

    random_batches = LengthGroupedBatchSampler(lengths, 8, seed=0, group_by_length=False).batches(0)
    grouped_50 = LengthGroupedBatchSampler(lengths, 8, seed=0).batches(0)
    assert step_spread(batches) > 0.8 * step_spread(random_batches)
    assert step_spread(grouped_50) < 0.5 * step_spread(random_batches)  # the test can tell them apart
    assert max(lengths[i] for i in batches[0]) == max(lengths)
    assert sorted(i for batch in batches for i in batch) == list(range(400))


def test_sampler_drop_last_drops_the_short_batch_wherever_it_falls():
    lengths = [(i * 37) % 101 + 1 for i in range(90)]
    for factor in (1, 3, 50):
        batches = LengthGroupedBatchSampler(lengths, 8, seed=1, drop_last=True, mega_batch_factor=factor).batches(0)
        assert len(batches) == 11 and all(len(b) == 8 for b in batches)


def test_sampler_drop_last():
    s = LengthGroupedBatchSampler(list(range(10)), 4, drop_last=True)
    assert len(s) == 2 and all(len(b) == 4 for b in s.batches(0))


def test_iter_batches_packs_text_by_default_and_pads_chat(tok):
    text = prepare([{"text": t} for t in TEXTS], tok, DataOptions(max_seq_len=32))
    assert text.packing
    batches = list(iter_batches(text, 2, seed=1, rows=packed_rows(text)))
    assert all(b["attention_mask"].dim() == 4 and b["input_ids"].shape[1] <= 32 for b in batches)
    assert sum(int((b["labels"] != -100).sum()) for b in batches) == text.summary.supervised_tokens
    chat_data = prepare([chat("Hi", "Hello there"), chat("say hi", "hi")], tok, DataOptions(template="chatml"))
    assert not chat_data.packing
    (batch,) = iter_batches(chat_data, 4)
    assert batch["attention_mask"].dim() == 2
