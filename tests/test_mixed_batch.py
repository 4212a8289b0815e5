"""Mixed-adapter batches: forward/generate with one adapter name (or "__base__") per row."""

from __future__ import annotations

import pytest
import torch

from tiny_models import VOCAB, build_model, randomize_lora
from lorakit import AdapterError, LoraConfig, wrap
from lorakit.lora.layer import LoraEmbedding, LoraLinear

BASE = "__base__"

# name: (family, {adapter: config}); the first adapter is the one `wrap` creates.
SETUPS = {
    "llama": ("llama", {
        "a": dict(target_modules=["q_proj", "v_proj"]),
        "b": dict(target_modules=["v_proj", "down_proj"], use_dora=True, r=4),
        "c": dict(target_modules=["embed_tokens", "o_proj"], r=2, lora_alpha=8),
    }),
    "gpt2": ("gpt2", {
        "a": dict(target_modules=["c_attn"]),
        "b": dict(target_modules=["c_attn", "c_proj"], use_dora=True),
        "c": dict(target_modules=["wte", "c_fc"], use_rslora=True),
    }),
    "bert_modules_to_save": ("bert", {
        "a": dict(target_modules=["query", "value"], modules_to_save=["classifier"]),
        "b": dict(target_modules=["value"], modules_to_save=["classifier"], use_dora=True),
        "c": dict(target_modules=["word_embeddings", "key"]),  # no classifier copy: rows use the original
    }),
}
ROWS = ["a", BASE, "c", "b", "a", "c"]


def _build(setup: str, scale: float = 0.2):
    family, adapters = SETUPS[setup]
    lora = None
    for name, config in adapters.items():
        if lora is None:
            lora = wrap(build_model(family), LoraConfig(**config), adapter_name=name)
        else:
            lora.add_adapter(name, LoraConfig(**config))
    randomize_lora(lora, scale=scale)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # give modules_to_save copies their own weights too
        for n, p in lora.named_parameters():
            if ".copies." in n:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return lora


def _ids(rows: int, seed: int = 11) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, 8), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def _row_alone(lora, ids, name):
    """Reference: the row run on its own with `name` as the only active adapter (or no adapter)."""
    if name == BASE:
        with lora.disable_adapters():
            return _logits(lora, ids)
    lora.set_adapter(name)
    return _logits(lora, ids)


@pytest.mark.parametrize("setup", SETUPS)
def test_mixed_batch_rows_equal_each_row_run_with_its_adapter(setup):
    lora = _build(setup)
    ids = _ids(len(ROWS))
    mixed = _logits(lora, ids, adapter_names=ROWS)
    refs = [_row_alone(lora, ids[i : i + 1], name)[0] for i, name in enumerate(ROWS)]
    base_rows = [_row_alone(lora, ids[i : i + 1], BASE)[0] for i in range(len(ROWS))]
    for i, name in enumerate(ROWS):
        if name != BASE:
            assert not torch.allclose(refs[i], base_rows[i], atol=1e-3), f"adapter {name} had no effect on row {i}"
        torch.testing.assert_close(mixed[i], refs[i], rtol=1e-5, atol=1e-5, msg=f"row {i} ({name})")


def test_mixed_batch_does_not_change_the_active_adapter_state():
    lora = _build("llama")
    ids = _ids(len(ROWS))
    lora.set_adapter(["a", "b"])
    before = _logits(lora, ids)
    _logits(lora, ids, adapter_names=ROWS)
    assert lora.active_adapters == ["a", "b"]
    torch.testing.assert_close(_logits(lora, ids), before, rtol=0, atol=0)


def test_all_rows_one_adapter_equals_that_adapter_active():
    lora = _build("gpt2")
    ids = _ids(3)
    lora.set_adapter("b")
    expected = _logits(lora, ids)
    lora.set_adapter("a")
    torch.testing.assert_close(_logits(lora, ids, adapter_names=["b"] * 3), expected, rtol=1e-5, atol=1e-5)


def _generate_each_row_alone(lora, prompts, rows, kwargs):
    """The reference: each prompt generated on its own with its adapter active (or adapters disabled)."""
    outs = []
    for i, name in enumerate(rows):
        one = dict(kwargs, attention_mask=kwargs["attention_mask"][i : i + 1])
        if name == BASE:
            with lora.disable_adapters():
                outs.append(lora.generate(prompts[i : i + 1], **one))
        else:
            lora.set_adapter(name)
            outs.append(lora.generate(prompts[i : i + 1], **one))
    return outs


@pytest.mark.parametrize("setup", ["llama", "gpt2"])
def test_generate_with_adapter_names_matches_per_row_greedy_generate(setup):
    lora = _build(setup, scale=0.5)
    rows = ["a", BASE, "b", "c"]
    prompts = _ids(len(rows), seed=3)[:, :5]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0,
                  attention_mask=torch.ones_like(prompts))
    with torch.no_grad():
        mixed = lora.generate(prompts, adapter_names=rows, **kwargs)
        refs = [out[0] for out in _generate_each_row_alone(lora, prompts, rows, kwargs)]
    assert mixed.shape == (len(rows), 5 + 6)
    assert len({tuple(r.tolist()) for r in refs}) > 1, "all adapters generated the same text: the test proves nothing"
    for i, name in enumerate(rows):
        # A row alone stops at EOS; in the batch it is padded (pad_token_id=0) to the longest row.
        ref = refs[i].tolist()
        assert mixed[i].tolist() == ref + [0] * (mixed.shape[1] - len(ref)), f"row {i} ({name})"


WRONG_LENGTHS = {"fewer": ["a", "b"], "one_for_three": ["a"], "more": ["a", "b", "c", "a"], "double": ["a", "b", "c"] * 2}


@pytest.mark.parametrize("case", WRONG_LENGTHS)
def test_adapter_names_of_wrong_length_raise(case):
    lora = _build("llama")
    with pytest.raises(AdapterError, match="one adapter name per row"):
        _logits(lora, _ids(3), adapter_names=WRONG_LENGTHS[case])


def test_generate_with_adapter_names_of_wrong_length_raises():
    lora = _build("llama")
    with pytest.raises(AdapterError, match="one adapter name per row"):
        lora.generate(_ids(3)[:, :4], adapter_names=["a"], max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_empty_adapter_names_raise():
    lora = _build("llama")
    with pytest.raises(AdapterError, match="empty"):
        _logits(lora, _ids(3), adapter_names=[])


def test_adapter_names_while_merged_raise():
    lora = _build("llama")
    lora.merge()
    with pytest.raises(AdapterError, match="unmerge"):
        _logits(lora, _ids(3), adapter_names=["a", "a", BASE])


def test_grouped_one_lora_matmul_per_distinct_adapter_not_per_row(monkeypatch):
    """Where autograd records (training a mixed batch), a layer runs one down-projection per distinct adapter present
    (base excluded), on that adapter's rows only. (Inference takes _mixed_together, tested below.)"""
    lora = _build("llama")
    calls: dict[str, list[tuple[str, int]]] = {}

    def counting(original):
        def _delta(self, name, x, base_out):
            calls.setdefault(self._probe_name, []).append((name, x.shape[0]))
            return original(self, name, x, base_out)
        return _delta

    for path, layer in lora.lora_layers():
        layer._probe_name = path
    for cls in (LoraLinear, LoraEmbedding):
        monkeypatch.setattr(cls, "_delta", counting(cls._delta))
    rows = ["a", "b", "a", BASE, "a", "b", "c", "a"]
    lora(_ids(len(rows)), adapter_names=rows)  # grad enabled
    assert calls, "no adapter computation observed"
    for path, layer in lora.lora_layers():
        present = [n for n in dict.fromkeys(rows) if n != BASE and n in layer.lora_A]
        got = calls.get(path, [])
        assert sorted(n for n, _ in got) == sorted(present), path
        assert all(size == rows.count(n) for n, size in got), f"{path}: {got}"


def test_generate_with_beams_routes_each_expanded_row_to_its_prompts_adapter():
    """generate() expands each prompt into num_beams rows; every expanded row keeps its prompt's adapter."""
    lora = _build("gpt2", scale=0.5)
    rows = ["b", BASE, "a"]
    prompts = _ids(len(rows), seed=5)[:, :4]
    kwargs = dict(max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2, pad_token_id=0,
                  attention_mask=torch.ones_like(prompts))
    with torch.no_grad():
        mixed = lora.generate(prompts, adapter_names=rows, **kwargs)
        refs = _generate_each_row_alone(lora, prompts, rows, kwargs)
    assert mixed.shape[0] == 2 * len(rows)
    assert len({tuple(r[0].tolist()) for r in refs}) > 1
    for i, name in enumerate(rows):
        assert mixed[2 * i : 2 * i + 2].tolist() == refs[i].tolist(), f"prompt {i} ({name})"


@pytest.mark.parametrize("setup", ["llama", "gpt2"])
def test_mixed_batch_gradients_equal_each_rows_own_adapter_gradients(setup):
    """Training through a mixed batch: each adapter's gradient equals the gradient of its rows run alone with
    it active (the grouped path under autograd, where the base output must not be modified in place)."""
    lora = _build(setup)  # eval mode (no dropout noise), but autograd on
    ids = _ids(len(ROWS))
    lora.set_adapter(["a", "b", "c"])  # all three trainable
    lora(ids, adapter_names=ROWS).logits.pow(2).mean(dim=(1, 2)).sum().backward()
    mixed = {n: p.grad.clone() for n, p in lora.named_parameters() if p.grad is not None}
    assert mixed, "no gradient reached the adapters"
    lora.zero_grad(set_to_none=True)

    for adapter in ("a", "b", "c"):
        rows = [i for i, name in enumerate(ROWS) if name == adapter]
        lora.set_adapter(adapter)
        lora(ids[rows]).logits.pow(2).mean(dim=(1, 2)).sum().backward()
    alone = {n: p.grad for n, p in lora.named_parameters() if p.grad is not None}
    assert set(mixed) == set(alone)
    for name in mixed:
        torch.testing.assert_close(mixed[name], alone[name], atol=1e-5, rtol=1e-4, msg=name)



def test_inference_computes_every_adapter_of_a_mixed_batch_together(monkeypatch):
    """Without autograd, a linear LoRA layer takes all the plain-LoRA adapters present in two matmuls
    (_mixed_together), never the per-adapter loop, and every row still equals that row run alone with its adapter
    (or none). (DoRA, whose update reads the base output, keeps the loop: the tests above mix it in.)"""
    lora = _build("llama")
    loops = []
    for cls in (LoraLinear,):
        original = cls._delta
        monkeypatch.setattr(cls, "_delta", lambda self, *a, _o=original: loops.append(1) or _o(self, *a))
    rows = ["a", "c", "a", BASE, "c", "a"]  # plain LoRA only ("b" is DoRA)
    ids = _ids(len(rows))
    mixed = _logits(lora, ids, adapter_names=rows)
    assert not loops
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], _row_alone(lora, ids[i:i + 1], name)[0], atol=1e-5, rtol=1e-5)
