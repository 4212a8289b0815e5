"""Merging adapters into the base weights: same outputs, exact-enough unmerge, safety, and disable_adapters."""

from __future__ import annotations

import pytest
import torch

from tiny_models import build_model, randomize_lora
from lorakit import AdapterError, LoraConfig, wrap
from lorakit.lora.full_copy import FullCopy
from lorakit.lora.layer import LoraLayer

# name: (family, [(adapter name, config), ...]); every adapter listed is active together.
CASES = {
    "plain": ("llama", [("a", dict(target_modules=["q_proj", "v_proj", "down_proj"]))]),
    "rslora": ("llama", [("a", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=16, use_rslora=True))]),
    "dora": ("llama", [("a", dict(target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True))]),
    "conv1d": ("gpt2", [("a", dict(target_modules=["c_attn", "c_proj"]))]),
    "conv1d_dora": ("gpt2", [("a", dict(target_modules=["c_attn", "c_fc"], use_dora=True))]),
    "embedding": ("llama", [("a", dict(target_modules=["embed_tokens", "o_proj"]))]),
    "embedding_dora": ("gpt2", [("a", dict(target_modules=["wte", "c_attn"], use_dora=True))]),
    "two_plain": ("llama", [("a", dict(target_modules=["q_proj", "v_proj"])),
                            ("b", dict(target_modules=["v_proj", "o_proj"], r=4, lora_alpha=4))]),
    "dora_plus_plain": ("llama", [("a", dict(target_modules=["q_proj", "v_proj"], use_dora=True)),
                                  ("b", dict(target_modules=["v_proj", "o_proj"]))]),
    "plain_plus_dora": ("llama", [("a", dict(target_modules=["q_proj", "v_proj"])),
                                  ("b", dict(target_modules=["v_proj", "o_proj"], use_dora=True))]),
    "two_dora_conv1d": ("gpt2", [("a", dict(target_modules=["c_attn"], use_dora=True)),
                                 ("b", dict(target_modules=["c_attn", "c_proj"], use_dora=True, r=2))]),
    "bias_and_modules_to_save": ("bert", [("a", dict(target_modules=["query", "value"], bias="lora_only",
                                                     modules_to_save=["classifier"]))]),
}


def _build(case: str, seed: int = 1):
    family, adapters = CASES[case]
    base = build_model(family)
    lora = None
    for name, config in adapters:
        if lora is None:
            lora = wrap(base, LoraConfig(**config), adapter_name=name)
        else:
            lora.add_adapter(name, LoraConfig(**config))
    randomize_lora(lora, seed=seed, scale=0.2)
    _realistic_magnitudes(lora, seed)
    lora.set_adapter([name for name, _ in adapters])
    return lora


def _realistic_magnitudes(lora, seed: int) -> None:
    """DoRA magnitudes within +-30% of ||W + s B A|| (as after training), not noise around zero.

    A magnitude near zero makes the merged row scale near zero, and unmerging divides by it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers():
            for name, m in layer.lora_magnitude.items():
                norm = (layer.base_weight().float() + layer.delta_weight(name)).norm(dim=1)
                m.copy_(norm * (1 + 0.3 * (2 * torch.rand(norm.shape, generator=gen) - 1)))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _base_weights(lora) -> dict[str, torch.Tensor]:
    return {n: layer.base_layer.weight.detach().clone() for n, layer in lora.lora_layers()}


def _base_output(lora, ids):
    with lora.disable_adapters():
        return _logits(lora, ids)


@pytest.mark.parametrize("case", CASES)
def test_merged_output_equals_unmerged_output(case, input_ids):
    lora = _build(case)
    base = _base_output(lora, input_ids)
    unmerged = _logits(lora, input_ids)
    assert not torch.allclose(unmerged, base, atol=1e-3), "adapter had no effect"
    lora.merge()
    assert lora.merged_adapters == [name for name, _ in CASES[case][1]]
    torch.testing.assert_close(_logits(lora, input_ids), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_unmerge_restores_base_weights_and_outputs(case, input_ids):
    lora = _build(case)
    weights = _base_weights(lora)
    unmerged = _logits(lora, input_ids)
    lora.merge()
    assert any(not torch.allclose(layer.base_layer.weight, weights[n], atol=1e-4) for n, layer in lora.lora_layers())
    lora.unmerge()
    assert lora.merged_adapters == []
    for name, layer in lora.lora_layers():
        torch.testing.assert_close(layer.base_layer.weight, weights[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(lora, input_ids), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["plain", "conv1d_dora", "embedding", "dora_plus_plain", "bias_and_modules_to_save"])
def test_merge_and_unload_returns_plain_model_with_same_outputs(case, input_ids):
    lora = _build(case)
    expected = _logits(lora, input_ids)
    plain = lora.merge_and_unload()
    assert plain is lora.model
    leftovers = [n for n, m in plain.named_modules() if isinstance(m, (LoraLayer, FullCopy))]
    assert leftovers == []
    assert not any(".lora_" in n or ".base_layer." in n or ".copies." in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(_logits(plain, input_ids), expected, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_output_differs_from_the_original_base(input_ids):
    base = build_model("llama")
    original = _logits(base, input_ids)
    lora = wrap(base, LoraConfig(target_modules=["q_proj"]))
    randomize_lora(lora)
    plain = lora.merge_and_unload()
    assert not torch.allclose(_logits(plain, input_ids), original, atol=1e-3)


def test_merge_of_a_named_inactive_adapter_activates_it_everywhere(input_ids):
    lora = _build("two_plain")
    lora.set_adapter("a")
    lora.set_adapter("b")
    only_b = _logits(lora, input_ids)
    lora.set_adapter("a")
    lora.merge(["b"])
    assert lora.active_adapters == ["b"]
    torch.testing.assert_close(_logits(lora, input_ids), only_b, rtol=1e-5, atol=1e-5)
    lora.unmerge()
    assert lora.active_adapters == ["b"]
    assert all(layer.active_adapters == (["b"] if "b" in layer.lora_A else []) for _, layer in lora.lora_layers())
    torch.testing.assert_close(_logits(lora, input_ids), only_b, rtol=1e-5, atol=1e-5)


def test_safe_merge_refuses_nan_and_leaves_every_weight_untouched(input_ids):
    lora = _build("plain")
    layers = list(lora.lora_layers())
    with torch.no_grad():
        layers[-1][1].lora_B["a"][0, 0] = float("nan")  # the last layer: earlier ones must not be written either
    weights = _base_weights(lora)
    with pytest.raises(AdapterError, match="NaN"):
        lora.merge(safe_merge=True)
    assert lora.merged_adapters == []
    for name, layer in lora.lora_layers():
        assert torch.equal(layer.base_layer.weight, weights[name]), name
    # Without safe_merge, the same merge does write non-finite weights (so the check above is meaningful).
    lora.merge()
    assert not torch.isfinite(layers[-1][1].base_layer.weight).all()


def test_merge_in_training_mode_raises_with_a_hint():
    lora = _build("plain")
    lora.train()
    with pytest.raises(AdapterError, match=r"training mode.*eval\(\)"):
        lora.merge()
    assert lora.merged_adapters == []


def test_training_forward_while_merged_raises(input_ids):
    lora = _build("plain")
    lora.merge()
    lora.train()
    with pytest.raises(AdapterError, match="unmerge"):
        lora(input_ids)
    with torch.no_grad():  # inference in train mode is fine
        lora(input_ids)


def test_merge_twice_raises():
    lora = _build("plain")
    lora.merge()
    with pytest.raises(AdapterError, match="already merged"):
        lora.merge()


@pytest.mark.parametrize("case", ["plain", "dora_plus_plain", "bias_and_modules_to_save", "embedding_dora"])
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_disable_adapters_gives_base_output_and_restores_state(case, merged, input_ids):
    family, _ = CASES[case]
    original = _logits(build_model(family), input_ids)
    lora = _build(case)
    adapted = _logits(lora, input_ids)
    assert not torch.allclose(adapted, original, atol=1e-3)
    if merged:
        lora.merge()
    with lora.disable_adapters():
        torch.testing.assert_close(_logits(lora, input_ids), original, rtol=1e-5, atol=1e-5)
    assert lora.merged_adapters == (lora.active_adapters if merged else [])
    torch.testing.assert_close(_logits(lora, input_ids), adapted, rtol=1e-5, atol=1e-5)


def test_merge_refuses_a_target_whose_weight_is_tied_to_another_module():
    """GPT-2 ties wte to lm_head: merging into wte would change lm_head too, so wrap warns and merge refuses."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32,
                                       tie_word_embeddings=True)).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.warns(UserWarning, match="tied"):
        lora = wrap(model, LoraConfig(target_modules=["wte"]))
    before = model.lm_head.weight.detach().clone()
    with pytest.raises(AdapterError, match="tied to.*lm_head"):
        lora.merge()
    torch.testing.assert_close(model.lm_head.weight, before, rtol=0, atol=0)
