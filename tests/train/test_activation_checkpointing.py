"""Gradient checkpointing of every k-th decoder layer (train/activation_checkpointing.py): exactly those layers recompute in
backward, the loss and LoRA gradients are unchanged, and disabling restores the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, wrap
from lorakit.errors import ConfigError
from lorakit.train import loop
from lorakit.train.activation_checkpointing import decoder_layers, enable_checkpointing
from test_loop_support import config, quiet, toy_data
from tiny_models import VOCAB, randomize_lora


def _four_layer_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64))
    model = wrap(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_lora(model, seed=seed + 1, scale=0.1)
    return model.train()  # checkpointing only acts in training mode (dropout is 0 in these configs)


def _step(model, input_ids) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[int]]:
    """Loss, LoRA grads, and how often each layer's MLP was entered in forward + backward. The MLP, not the
    layer: transformers checkpoints the layer's forward inside its __call__, so hooks on the layer fire once.
    A pre-hook: the recompute stops early, inside the MLP, once it has what backward needs, so no post-hook."""
    layers = model.model.model.layers
    calls = [0] * len(layers)
    handles = [layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(layers)]
    model.zero_grad(set_to_none=True)
    try:
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, calls


def _flags(model) -> list[bool]:
    return [layer.gradient_checkpointing for layer in decoder_layers(model.model)]


def test_every_second_layer_recomputes_and_the_step_is_unchanged(input_ids):
    model = _four_layer_llama()
    plain_loss, plain_grads, calls = _step(model, input_ids)
    assert calls == [1, 1, 1, 1]

    disable = enable_checkpointing(model.model, every=2)
    assert _flags(model) == [True, False, True, False]
    loss, grads, calls = _step(model, input_ids)
    assert calls == [2, 1, 2, 1]  # layers 0 and 2 ran again in backward
    torch.testing.assert_close(loss, plain_loss, atol=1e-6, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)

    disable()
    assert _flags(model) == [False] * 4
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert not getattr(model.model, "_require_grads_hooks", None)  # transformers' input-grads hook removed too
    loss, grads, calls = _step(model, input_ids)
    assert calls == [1, 1, 1, 1]
    torch.testing.assert_close(loss, plain_loss, atol=0, rtol=0)


def test_every_layer_by_default(input_ids):
    model = _four_layer_llama()
    disable = enable_checkpointing(model.model)
    assert _flags(model) == [True] * 4
    assert _step(model, input_ids)[2] == [2, 2, 2, 2]
    disable()


def test_k_above_one_without_checkpointable_layers_is_a_config_error():
    class NoLayers(nn.Module):
        def gradient_checkpointing_enable(self, **kwargs):
            raise AssertionError("must not be enabled before the check")

    with pytest.raises(ConfigError, match="checkpoint_every.*set it to 1"):
        enable_checkpointing(NoLayers(), every=2)
    with pytest.raises(ConfigError, match="does not support gradient checkpointing"):
        enable_checkpointing(nn.Linear(2, 2))


def test_fit_with_checkpoint_every_two_gives_the_same_losses(tmp_path):
    data = toy_data(8, lengths=(12,), prompt=2)
    losses = []
    for name, overrides in [("plain", {}), ("every2", {"gradient_checkpointing": True, "checkpoint_every": 2})]:
        model = _four_layer_llama()
        result = loop.fit(model, data, config(max_steps=3, lr=1e-3, **overrides), tmp_path / name, log=quiet)
        losses.append(result.losses)
        assert _flags(model) == [False] * 4  # fit turns it off again at the end
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_the_config_field_takes_a_positive_integer():
    from lorakit.config import run_config_from_dict

    raw = {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}
    assert run_config_from_dict(raw).train.checkpoint_every == 1
    with pytest.raises(ConfigError, match="train.checkpoint_every: must be a positive integer"):
        run_config_from_dict({**raw, "train": {"checkpoint_every": 0}})
