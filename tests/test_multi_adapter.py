"""Several named adapters on one model: switching, combining active adapters, deleting, and name checks."""

from __future__ import annotations

import pytest
import torch

from tiny_models import build_model, randomize_lora
from lorakit import AdapterError, LoraConfig, wrap
from lorakit.lora.layer import LoraLayer


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _two_adapters(family="llama", a=None, b=None):
    lora = wrap(build_model(family), LoraConfig(**(a or dict(target_modules=["q_proj", "v_proj"]))), adapter_name="a")
    lora.add_adapter("b", LoraConfig(**(b or dict(target_modules=["v_proj", "o_proj"], r=4))))
    randomize_lora(lora, scale=0.2)
    return lora


def test_new_adapter_is_inactive_until_set_adapter(input_ids):
    lora = _two_adapters()
    assert lora.active_adapters == ["a"]
    only_a = _logits(lora, input_ids)
    lora.add_adapter("c", LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    assert lora.active_adapters == ["a"]
    torch.testing.assert_close(_logits(lora, input_ids), only_a, rtol=0, atol=0)


def test_switching_a_b_a_gives_a_output_again(input_ids):
    lora = _two_adapters()
    first_a = _logits(lora, input_ids)
    lora.set_adapter("b")
    only_b = _logits(lora, input_ids)
    assert not torch.allclose(only_b, first_a, atol=1e-3)
    lora.set_adapter("a")
    torch.testing.assert_close(_logits(lora, input_ids), first_a, rtol=0, atol=0)
    lora.set_adapter("b")
    torch.testing.assert_close(_logits(lora, input_ids), only_b, rtol=0, atol=0)


ADDITIVE = {
    # name: (config of a, config of b), both on lm_head only: logits = lm_head(h) with h unaffected
    "plain": (dict(target_modules=["lm_head"]), dict(target_modules=["lm_head"], r=4, lora_alpha=16)),
    "dora_plus_plain": (dict(target_modules=["lm_head"], use_dora=True), dict(target_modules=["lm_head"], r=2)),
    "plain_plus_dora": (dict(target_modules=["lm_head"], use_rslora=True), dict(target_modules=["lm_head"], use_dora=True)),
}


@pytest.mark.parametrize("case", ADDITIVE)
def test_several_active_adapters_add_their_deltas(case, input_ids):
    """With only the output layer adapted, out(a+b) - base == (out(a) - base) + (out(b) - base)."""
    a, b = ADDITIVE[case]
    lora = _two_adapters(a=a, b=b)
    with lora.disable_adapters():
        base = _logits(lora, input_ids)
    lora.set_adapter("a")
    delta_a = _logits(lora, input_ids) - base
    lora.set_adapter("b")
    delta_b = _logits(lora, input_ids) - base
    assert delta_a.abs().max() > 1e-2 and delta_b.abs().max() > 1e-2
    lora.set_adapter(["a", "b"])
    assert lora.active_adapters == ["a", "b"]
    torch.testing.assert_close(_logits(lora, input_ids) - base, delta_a + delta_b, rtol=1e-5, atol=1e-5)


def test_several_active_adapters_equal_merging_both(input_ids):
    lora = _two_adapters(b=dict(target_modules=["v_proj", "o_proj", "up_proj"], use_dora=True))
    lora.set_adapter(["a", "b"])
    both = _logits(lora, input_ids)
    lora.set_adapter("a")
    assert not torch.allclose(both, _logits(lora, input_ids), atol=1e-3)
    lora.set_adapter(["b", "a"])
    lora.merge()
    torch.testing.assert_close(_logits(lora, input_ids), both, rtol=1e-5, atol=1e-5)


def test_delete_adapter_removes_its_weights_and_keeps_the_others(input_ids):
    lora = _two_adapters()
    only_a = _logits(lora, input_ids)
    lora.set_adapter(["a", "b"])
    lora.delete_adapter("b")
    assert list(lora.adapter_configs) == ["a"]
    assert lora.active_adapters == ["a"]
    assert not any(n.endswith(".b") or ".b." in n for n, _ in lora.named_parameters())
    assert all("b" not in layer.scaling for _, layer in lora.lora_layers())
    torch.testing.assert_close(_logits(lora, input_ids), only_a, rtol=0, atol=0)
    # the name is free again
    lora.add_adapter("b", LoraConfig(target_modules=["q_proj"]))
    assert "b" in lora.adapter_configs


def test_deleting_the_active_adapter_activates_another_with_a_warning(input_ids):
    """As PEFT: another adapter takes over (said in a warning), so the model keeps computing an adapter."""
    lora = _two_adapters()
    lora.set_adapter("b")
    only_b = _logits(lora, input_ids)
    lora.set_adapter("a")
    with pytest.warns(UserWarning, match="'b' is active now"):
        lora.delete_adapter("a")
    assert lora.active_adapters == ["b"]
    torch.testing.assert_close(_logits(lora, input_ids), only_b, rtol=0, atol=0)


def test_deleting_every_adapter_puts_the_original_modules_back(input_ids):
    """Deleting undoes injecting: with no adapter left, no lorakit module remains and outputs equal the base."""
    from lorakit.lora.layer import LoraLayer

    base_out = _logits(build_model("llama"), input_ids)
    lora = _two_adapters()
    lora.set_adapter("a")
    lora.delete_adapter("b")
    lora.delete_adapter("a")
    assert not any(isinstance(m, LoraLayer) for m in lora.model.modules())
    assert all(".base_layer." not in n for n, _ in lora.model.named_parameters())
    torch.testing.assert_close(_logits(lora, input_ids), base_out, rtol=0, atol=0)


def test_delete_merged_adapter_raises():
    lora = _two_adapters()
    lora.merge()
    with pytest.raises(AdapterError, match="unmerge"):
        lora.delete_adapter("a")
    assert "a" in lora.adapter_configs


UNKNOWN_NAME_CALLS = {
    "set_adapter": lambda m, ids: m.set_adapter("nope"),
    "set_adapter_list": lambda m, ids: m.set_adapter(["a", "nope"]),
    "delete_adapter": lambda m, ids: m.delete_adapter("nope"),
    "merge": lambda m, ids: m.merge(["nope"]),
    "forward_adapter_names": lambda m, ids: m(ids, adapter_names=["a", "nope", "b"]),
    "add_weighted_adapter": lambda m, ids: m.add_weighted_adapter(["a", "nope"], [1.0, 1.0], "mix", "cat"),
    "save_adapter": lambda m, ids: m.save_adapter("/nonexistent-dir-never-written", ["nope"]),
}


@pytest.mark.parametrize("call", UNKNOWN_NAME_CALLS)
def test_unknown_adapter_name_raises_and_lists_loaded_adapters(call, input_ids):
    lora = _two_adapters()
    with pytest.raises(AdapterError, match=r"'nope'.*loaded adapters: a, b"):
        UNKNOWN_NAME_CALLS[call](lora, input_ids)
    assert list(lora.adapter_configs) == ["a", "b"] and lora.active_adapters == ["a"]


INVALID_NAMES = {
    "path_traversal": "../x",
    "slash": "a/b",
    "empty": "",
    "base_sentinel": "__base__",
    "leading_dot": ".hidden",
    "dot": "v1.2",  # a dot would break the parameter names (and PEFT's module keys)
    "too_long": "x" * 65,
    "not_a_string": 3,
}


@pytest.mark.parametrize("case", INVALID_NAMES)
def test_invalid_adapter_name_raises_and_adds_nothing(case):
    lora = _two_adapters()
    modules = dict(lora.named_modules())
    with pytest.raises(AdapterError, match="invalid adapter name"):
        lora.add_adapter(INVALID_NAMES[case], LoraConfig(target_modules=["k_proj"]))
    assert list(lora.adapter_configs) == ["a", "b"]
    assert dict(lora.named_modules()) == modules


@pytest.mark.parametrize("case", ["path_traversal", "base_sentinel", "empty"])
def test_wrap_with_invalid_adapter_name_leaves_model_untouched(case):
    model = build_model("llama")
    modules = dict(model.named_modules())
    with pytest.raises(AdapterError, match="invalid adapter name"):
        wrap(model, LoraConfig(target_modules=["q_proj"]), adapter_name=INVALID_NAMES[case])
    assert dict(model.named_modules()) == modules
    assert all(p.requires_grad for p in model.parameters())


def test_valid_adapter_names_are_accepted():
    lora = _two_adapters()
    for name in ["c", "my-adapter_v1-2", "0", "x" * 64]:
        lora.add_adapter(name, LoraConfig(target_modules=["q_proj"]))
    assert len(lora.adapter_configs) == 6


def test_duplicate_adapter_name_raises():
    lora = _two_adapters()
    with pytest.raises(AdapterError, match="already exists"):
        lora.add_adapter("b", LoraConfig(target_modules=["q_proj"]))


def test_add_or_switch_adapter_while_merged_raises():
    lora = _two_adapters()
    lora.merge()
    with pytest.raises(AdapterError, match="unmerge"):
        lora.add_adapter("c", LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match="unmerge"):
        lora.set_adapter("b")
    assert "c" not in lora.adapter_configs
    assert not any("c" in layer.lora_A for _, layer in lora.lora_layers())


def test_wrapping_a_lora_model_again_raises():
    lora = _two_adapters()
    with pytest.raises(AdapterError, match="already wrapped"):
        wrap(lora, LoraConfig(target_modules=["q_proj"]))


def test_unwrap_restores_the_original_modules(input_ids):
    model = build_model("llama")
    expected = _logits(model, input_ids)
    originals = {n: m for n, m in model.named_modules()}
    lora = wrap(model, LoraConfig(target_modules=["q_proj", "embed_tokens"]))
    randomize_lora(lora)
    plain = lora.unwrap()
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert {n: m for n, m in plain.named_modules()} == originals
    torch.testing.assert_close(_logits(plain, input_ids), expected, rtol=0, atol=0)


def test_a_lora_model_can_start_empty_and_take_adapters_later(tmp_path):
    """LoraModel(model, None): no adapter, outputs are the base's; adapters added later work as usual."""
    from lorakit import LoraConfig, LoraModel, wrap
    from tiny_models import build_model, randomize_lora

    source = wrap(build_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora(source)
    source.save_adapter(tmp_path / "a")
    base = build_model("llama")
    ids = torch.arange(8)[None]
    with torch.no_grad():
        want_base = base(ids).logits
        empty = LoraModel(base, None)
        assert empty.adapter_configs == {} and not any(p.requires_grad for p in empty.parameters())
        assert torch.equal(empty(input_ids=ids).logits, want_base)
        empty.load_adapter(tmp_path / "a", "a")
        empty.set_adapter("a")
        assert torch.allclose(empty(input_ids=ids).logits, source(input_ids=ids).logits, atol=1e-6)
