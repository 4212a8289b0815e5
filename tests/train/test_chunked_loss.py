"""Chunked loss (train/chunked_loss.py): same loss, count and LoRA gradients as the full-logits path, for every
tiny causal family, chunk sizes that do and don't divide the tokens, padding, masked prompts, packed rows,
a LoRA-adapted lm_head and tied embeddings; models that post-process their logits fall back to the full path."""

from __future__ import annotations

import pytest
import torch

from lorakit import LoraConfig, wrap
from lorakit.data import collate_packed, iter_batches, pack
from lorakit.data.prepare import Example
from lorakit.train import loop
from lorakit.train.chunked_loss import chunked_token_loss_sum, lm_loss_sum, split_head, token_loss_sum
from lorakit.train.evaluate import evaluate
from test_loop_support import config, lora_model, quiet, toy_data
from tiny_models import VOCAB, build_model, randomize_lora

CAUSAL = ["llama", "qwen2", "mistral", "gpt2"]
CHUNKS = [1, 7, 1000]  # one token per chunk, a size that leaves a short last chunk, all in one


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """3 rows of 12: row 1 right-padded by 5, row 2 by 2 (labels -100 there), and prompts masked (-100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 12), generator=g)  # (batch, seq)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 10:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100
    labels[1, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _inputs(batch: dict) -> dict:
    return {**{k: v for k, v in batch.items() if k != "labels"}, "use_cache": False}


def _wrapped(family: str, targets="all-linear", seed: int = 0):
    model = wrap(build_model(family, seed=seed), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_lora(model, seed=seed + 1, scale=0.1)
    return model


def _loss_and_grads(model, batch: dict, chunk: int | None):
    model.zero_grad(set_to_none=True)
    loss, count = lm_loss_sum(model, _inputs(batch), batch["labels"], chunk)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), count, grads


def _assert_same(model, batch: dict, chunk: int) -> None:
    plain_loss, plain_count, plain_grads = _loss_and_grads(model, batch, None)
    loss, count, grads = _loss_and_grads(model, batch, chunk)
    assert count == plain_count
    torch.testing.assert_close(loss, plain_loss, atol=1e-5, rtol=1e-6)
    assert grads.keys() == plain_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_every_causal_family_splits_and_a_classifier_does_not():
    for family in CAUSAL:
        split = split_head(_wrapped(family))
        assert split is not None, family
        assert split_head(build_model(family)) is not None, f"{family} (bare transformers model)"
    assert split_head(build_model("bert")) is None  # no output embeddings: the caller uses the full logits


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("family", CAUSAL)
def test_chunked_loss_and_lora_grads_equal_the_full_logits_path(family, chunk):
    model = _wrapped(family)
    _assert_same(model, _batch(), chunk)


@pytest.mark.parametrize("head_trains", [False, True])  # fused frozen-head path / checkpointed path
def test_the_head_sees_only_supervised_positions_in_chunks_of_the_given_size(head_trains, monkeypatch):
    from lorakit.train import chunked_loss

    model = _wrapped("llama")
    decoder, head = split_head(model)
    head.weight.requires_grad_(head_trains)
    batch = _batch()
    hidden = decoder(**_inputs(batch))[0]
    rows = []
    real_linear = chunked_loss.F.linear

    def spy(x, weight, bias=None):
        if weight is head.weight:
            rows.append(x.shape[0])
        return real_linear(x, weight, bias)

    monkeypatch.setattr(chunked_loss.F, "linear", spy)
    loss, count = chunked_token_loss_sum(hidden, head, batch["labels"], 7)
    assert count == int((batch["labels"][:, 1:] != -100).sum()) < batch["labels"].numel()
    assert rows == [7] * (count // 7) + ([count % 7] if count % 7 else [])
    forward = list(rows)
    loss.backward()  # the checkpointed path recomputes each chunk (in reverse order); the fused one never
    assert rows == (forward + forward[::-1] if head_trains else forward)
    assert (head.weight.grad is not None) == head_trains


@pytest.mark.parametrize("tied", [False, True])
def test_lora_on_lm_head_and_tied_embeddings(tied):
    """A LoRA-wrapped lm_head is called as a module (its update applies); a tied head works the same way."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=tied)).eval()
    targets = ["q_proj", "v_proj"] if tied else ["q_proj", "v_proj", "lm_head"]
    model = wrap(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_lora(model, scale=0.1)
    assert split_head(model) is not None
    if not tied:
        assert any("lm_head.lora_B" in n for n, p in model.named_parameters() if p.requires_grad)
    for chunk in (1, 7):
        _assert_same(model, _batch(), chunk)


def test_a_batch_with_no_supervised_token_gives_zero_that_backpropagates():
    model = _wrapped("llama")
    batch = _batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    plain_loss, plain_count, plain_grads = _loss_and_grads(model, batch, None)
    loss, count, grads = _loss_and_grads(model, batch, 4)
    assert count == plain_count == 0
    assert float(loss) == float(plain_loss) == 0.0
    assert grads.keys() == plain_grads.keys()
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())


def test_eval_under_no_grad_chunks_without_recompute_and_matches():
    model = _wrapped("qwen2")
    batch = _batch()
    with torch.no_grad():
        plain = lm_loss_sum(model, _inputs(batch), batch["labels"], None)
        chunked = lm_loss_sum(model, _inputs(batch), batch["labels"], 5)
    assert chunked[1] == plain[1]
    torch.testing.assert_close(chunked[0], plain[0], atol=1e-5, rtol=1e-6)
    data = toy_data(5, lengths=(4, 11, 7), prompt=2)
    a = evaluate(model, iter_batches(data, 2), loss_chunk_tokens=3)
    b = evaluate(model, iter_batches(data, 2), loss_chunk_tokens=None)
    assert a.tokens == b.tokens and a.loss == pytest.approx(b.loss, rel=1e-6)


def test_softcapped_logits_fall_back_to_the_full_path():
    """Gemma 2 caps its logits after lm_head: split_head refuses it and lm_loss_sum still gives the model's loss
    (and the test can tell: the uncapped chunked loss is another number)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=VOCAB,
                                           final_logit_softcapping=0.5)).eval()
    assert split_head(model) is None
    batch = _batch()
    with torch.no_grad():
        loss, count = lm_loss_sum(model, _inputs(batch), batch["labels"], 4)
        want, want_count = token_loss_sum(model(**_inputs(batch)).logits, batch["labels"])
        uncapped, _ = chunked_token_loss_sum(model.model(**_inputs(batch))[0], model.lm_head, batch["labels"], 4)
    assert count == want_count and torch.equal(loss, want)
    assert abs(float(uncapped) - float(want)) > 1e-3


def test_logits_changed_by_an_unlisted_forward_are_caught_by_the_probe():
    """A model whose forward rescales the logits under no config attribute we list: the probe forward sees
    that the returned logits are not the head's output, and the full path is used."""
    from transformers import LlamaForCausalLM

    class Rescaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    torch.manual_seed(0)
    model = Rescaled(build_model("llama").config).eval()
    assert split_head(model) is None
    batch = _batch()
    with torch.no_grad():
        loss, _ = lm_loss_sum(model, _inputs(batch), batch["labels"], 4)
        assert torch.equal(loss, token_loss_sum(model(**_inputs(batch)).logits, batch["labels"])[0])


@pytest.mark.parametrize("mask", ["float", "position_ids"])
def test_packed_rows_give_the_same_loss_and_grads(mask):
    g = torch.Generator().manual_seed(3)
    examples = []
    for k, n in enumerate([9, 4, 6, 3, 7, 5]):
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        examples.append(Example(ids, [-100] * (k % 3) + ids[k % 3:], f"ex{k}"))
    rows = pack(examples, 16)
    assert any(len(r.example_indices) > 1 for r in rows)
    batch = collate_packed(rows, pad_token_id=0, mask=mask)
    model = _wrapped("llama")
    for chunk in (3, 1000):
        _assert_same(model, batch, chunk)


def test_fit_with_chunked_loss_gives_the_same_steps(tmp_path):
    """Four optimizer steps with loss_chunk_tokens=4 and with None: same per-step losses, same adapter."""
    data = toy_data(8, lengths=(12, 7, 10), prompt=3)
    models, results = [], []
    for chunk in (4, None):
        model = lora_model()
        results.append(loop.fit(model, data, config(max_steps=4, lr=1e-3, loss_chunk_tokens=chunk),
                                tmp_path / str(chunk), log=quiet))
        models.append(model)
    chunked, plain = results
    assert len(chunked.losses) == len(plain.losses) == 4
    assert chunked.losses == pytest.approx(plain.losses, rel=1e-5)
    a, b = (dict(m.named_parameters()) for m in models)
    for name, p in a.items():
        if p.requires_grad:
            torch.testing.assert_close(p, b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_the_config_field_takes_a_positive_integer_or_null():
    from lorakit.config import run_config_from_dict
    from lorakit.errors import ConfigError

    raw = {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}
    assert run_config_from_dict(raw).train.loss_chunk_tokens == 1024
    assert run_config_from_dict({**raw, "train": {"loss_chunk_tokens": None}}).train.loss_chunk_tokens is None
    with pytest.raises(ConfigError, match="train.loss_chunk_tokens: must be a positive integer"):
        run_config_from_dict({**raw, "train": {"loss_chunk_tokens": 0}})


def test_a_bf16_base_gives_the_plain_loss_and_grads_within_bf16_rounding():
    """The fused frozen-head path in bf16: logits from a bf16 matmul, the loss in fp32, the hidden-state
    gradient from a bf16 matmul, as the plain path computes them."""
    model = wrap(build_model("llama").to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_lora(model, seed=1, scale=0.1)
    plain_loss, _, plain_grads = _loss_and_grads(model, _batch(), None)
    loss, _, grads = _loss_and_grads(model, _batch(), 7)
    torch.testing.assert_close(loss, plain_loss, rtol=2e-3, atol=1e-2)
    for name, grad in grads.items():
        scale = plain_grads[name].abs().max()
        assert (grad - plain_grads[name]).abs().max() <= 2e-2 * scale, name
