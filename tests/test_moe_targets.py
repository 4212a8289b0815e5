"""Mixture-of-experts models whose experts are fused 3-D parameters (transformers' Mixtral, Qwen3-MoE, ...):
module targeting cannot reach the experts, and lorakit says so instead of training a quarter of what the user
thinks (issue 24; LoRA on the experts themselves, PEFT's target_parameters, is not built yet)."""

from __future__ import annotations

import pytest
import torch

from lorakit import LoraConfig, wrap
from lorakit.errors import ConfigError
from lorakit.lora.inject import fused_expert_weights
from tiny_models import build_model

MOE = ["mixtral", "qwen3_moe"]


def _adapted(lm) -> set[str]:
    """The adapted modules' names from `layers.` on."""
    return {name[name.index("layers."):name.index(".lora_A")] for name, _ in lm.named_parameters() if ".lora_A" in name}


@pytest.mark.parametrize("family", MOE)
def test_the_fused_expert_weights_are_found_with_their_shapes(family):
    model = build_model(family)
    found = fused_expert_weights(model)
    assert sorted(found) == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("down_proj", "gate_up_proj")]
    experts = model.model.layers[0].mlp.experts
    assert found["model.layers.0.mlp.experts.gate_up_proj"] == tuple(experts.gate_up_proj.shape)
    assert all(shape[0] == 4 for shape in found.values())
    assert fused_expert_weights(build_model("llama")) == {}  # a dense model has none


@pytest.mark.parametrize("family", MOE)
def test_all_linear_warns_that_the_experts_are_left_out_and_adapts_the_linear_layers(family):
    model = build_model(family)
    with pytest.warns(UserWarning, match=r"fused parameters.*experts\.down_proj, experts\.gate_up_proj.*leaves "
                                         r"these 4 out.*target_parameters") as caught:
        lm = wrap(model, LoraConfig(r=2, target_modules="all-linear"))
    assert len(caught) == 1  # one message for the model, not one per weight
    assert _adapted(lm) == {f"layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert "model.layers.0.mlp.experts.gate_up_proj, shape 4 x " in str(caught[0].message)


def test_a_regex_that_matches_an_expert_weight_warns_and_one_that_does_not_is_silent():
    with pytest.warns(UserWarning, match=r"\(experts\.down_proj; e\.g\. model\.layers\.0\.mlp\.experts\.down_proj.*"
                                         r"leaves these 2 out"):
        lm = wrap(build_model("mixtral"), LoraConfig(r=2, target_modules=r".*\.(q_proj|down_proj)"))
    assert _adapted(lm) == {"layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"}
    lm = wrap(build_model("mixtral"), LoraConfig(r=2, target_modules=r".*\.(q_proj|v_proj)"))  # pyproject: a warning fails
    assert len(_adapted(lm)) == 4


@pytest.mark.parametrize("name", ["gate_up_proj", "experts.down_proj"])
def test_naming_an_expert_weight_in_target_modules_is_refused_with_what_to_do(name):
    model = build_model("qwen3_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=rf"target_modules '{name}' names a fused expert weight "
                                          r"\(model\.layers\.0\.mlp\.experts\.\w+, shape 4 x \d+ x \d+, one matrix per "
                                          r"expert\), a parameter, not a module.*target_parameters.*linear layers"):
        wrap(model, LoraConfig(r=2, target_modules=["q_proj", name]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any change


def test_naming_only_linear_layers_of_a_moe_model_is_silent_and_trains_them():
    lm = wrap(build_model("mixtral"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert _adapted(lm) == {f"layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    lm.train()
    lm(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in lm.named_parameters() if p.requires_grad)
