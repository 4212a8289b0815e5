"""What trains: only adapter weights (plus the biases and module copies the config names), only for the active adapter."""

from __future__ import annotations

import pytest
import torch

from tiny_models import build_model, randomize_lora
from lorakit import LoraConfig, wrap


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _one_adamw_step(lora, input_ids) -> None:
    lora.train()
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    out = lora(input_ids, labels=input_ids if not _is_classifier(lora) else torch.tensor([0, 1, 2]))
    out.loss.backward()
    opt.step()
    opt.zero_grad()
    lora.eval()


def _is_classifier(lora) -> bool:
    return type(lora.model).__name__.endswith("ForSequenceClassification")


def _changed(before, model) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _adapter_params(model, adapter: str) -> set[str]:
    return {
        n for n, _ in model.named_parameters()
        if n.endswith((f".lora_A.{adapter}", f".lora_B.{adapter}", f".lora_magnitude.{adapter}"))
        or f".copies.{adapter}." in n
    }


CASES = {
    # name: (family, config)
    "llama_qv": ("llama", dict(target_modules=["q_proj", "v_proj"])),
    "llama_dora_embed": ("llama", dict(target_modules=["embed_tokens", "o_proj"], use_dora=True)),
    "gpt2_conv1d": ("gpt2", dict(target_modules=["c_attn", "c_fc"])),
    "bert_modules_to_save": ("bert", dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
}


@pytest.mark.parametrize("case", CASES)
def test_one_adamw_step_changes_only_adapter_weights(case, input_ids):
    family, config = CASES[case]
    lora = wrap(build_model(family), LoraConfig(**config))
    randomize_lora(lora)
    adapter = _adapter_params(lora, "default")
    assert adapter and _trainable(lora) == adapter
    before = _snapshot(lora)
    _one_adamw_step(lora, input_ids)
    changed = _changed(before, lora)
    assert changed == adapter, f"unexpected: {sorted(changed ^ adapter)[:5]}"
    for n, p in lora.named_parameters():
        if n not in adapter:
            assert p.grad is None, n


def test_trainable_report_counts_adapter_weights_only():
    lora = wrap(build_model("llama"), LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    # q: 4*32 + 32*4, v: 4*32 + 16*4, two layers
    expected = 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))
    report = lora.trainable_parameters()
    assert report.trainable == expected
    assert report.total == sum(p.numel() for p in lora.parameters())


BIAS = {
    # bias option: which biases (by owner) must train on gpt2 with c_attn adapted
    "none": lambda name: False,
    "all": lambda name: True,
    "lora_only": lambda name: ".c_attn.base_layer." in name,
}


@pytest.mark.parametrize("bias", BIAS)
def test_bias_option_selects_the_biases_that_train(bias, input_ids):
    lora = wrap(build_model("gpt2"), LoraConfig(target_modules=["c_attn"], bias=bias))
    randomize_lora(lora)
    biases = {n for n, _ in lora.named_parameters() if n.endswith("bias") and ".lora_" not in n}
    assert len(biases) > 4
    expected = _adapter_params(lora, "default") | {n for n in biases if BIAS[bias](n)}
    assert _trainable(lora) == expected
    before = _snapshot(lora)
    _one_adamw_step(lora, input_ids)
    assert _changed(before, lora) == expected


def test_lora_only_biases_are_those_of_the_layers_the_active_adapter_adapts(input_ids):
    """Layers wrapped for another adapter do not count: their biases are not in this adapter's file."""
    lora = wrap(build_model("gpt2"), LoraConfig(target_modules=["c_attn"], bias="lora_only"))
    lora.add_adapter("other", LoraConfig(target_modules=["c_fc"]))
    randomize_lora(lora)
    trainable_biases = {n for n in _trainable(lora) if n.endswith("bias")}
    assert trainable_biases == {f"model.transformer.h.{i}.attn.c_attn.base_layer.bias" for i in range(2)}
    lora.set_adapter("other")
    assert not any(n.endswith("bias") for n in _trainable(lora))


def test_modules_to_save_trains_the_copy_and_never_the_original_even_with_bias_all(input_ids):
    lora = wrap(build_model("bert"), LoraConfig(target_modules=["query"], modules_to_save=["classifier"], bias="all"))
    randomize_lora(lora)
    original = {n for n, _ in lora.named_parameters() if ".original_module." in n}
    copies = {n for n, _ in lora.named_parameters() if ".copies.default." in n}
    assert original and copies
    assert not original & _trainable(lora)
    assert copies <= _trainable(lora)
    before = _snapshot(lora)
    _one_adamw_step(lora, input_ids)
    changed = _changed(before, lora)
    assert copies <= changed
    assert not original & changed


def test_with_two_adapters_only_the_active_one_trains(input_ids):
    lora = wrap(build_model("llama"), LoraConfig(target_modules=["q_proj", "v_proj"]), adapter_name="a")
    lora.add_adapter("b", LoraConfig(target_modules=["v_proj", "o_proj"], use_dora=True))
    randomize_lora(lora)
    a, b = _adapter_params(lora, "a"), _adapter_params(lora, "b")
    assert _trainable(lora) == a
    before = _snapshot(lora)
    _one_adamw_step(lora, input_ids)
    assert _changed(before, lora) == a

    lora.set_adapter("b")
    assert _trainable(lora) == b
    before = _snapshot(lora)
    _one_adamw_step(lora, input_ids)
    assert _changed(before, lora) == b

    lora.set_adapter(["a", "b"])
    assert _trainable(lora) == a | b


def test_inference_mode_adapter_is_frozen():
    lora = wrap(build_model("llama"), LoraConfig(target_modules=["q_proj"], inference_mode=True))
    assert _trainable(lora) == set()
    assert lora.trainable_parameters().trainable == 0


def test_gradients_reach_every_trainable_parameter(input_ids):
    lora = wrap(build_model("gpt2"), LoraConfig(target_modules=["c_attn", "wte"], use_dora=True, bias="lora_only"))
    randomize_lora(lora)
    lora.train()
    lora(input_ids, labels=input_ids).loss.backward()
    for n, p in lora.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, n
        else:
            assert p.grad is None, n
