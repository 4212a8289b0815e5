"""add_weighted_adapter: the new adapter's per-layer delta weight against a hand-computed reference."""

from __future__ import annotations

import pytest
import torch

from tiny_models import build_model, randomize_lora
from lorakit import AdapterError, LoraConfig, wrap

WEIGHTS = [0.7, -0.4]


def _model(b_rank: int = 4, b_targets=("q_proj", "v_proj", "o_proj")):
    lora = wrap(build_model("llama"), LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8), adapter_name="a")
    lora.add_adapter("b", LoraConfig(target_modules=list(b_targets), r=b_rank, lora_alpha=3))
    randomize_lora(lora, scale=0.3)
    return lora


def _reference_sum(layer, weights) -> torch.Tensor:
    """sum_i w_i * s_i * B_i @ A_i over the adapters present on the layer, computed by hand."""
    total = torch.zeros(layer.out_features, layer.in_features)
    for name, w in zip(["a", "b"], weights):
        if name in layer.lora_A:
            total += w * layer.scaling[name] * layer.lora_B[name].detach() @ layer.lora_A[name].detach()
    return total


def _new_delta(layer) -> torch.Tensor:
    with torch.no_grad():
        return layer.scaling["mix"] * layer.lora_B["mix"] @ layer.lora_A["mix"]


def test_cat_is_exactly_the_weighted_sum_and_concatenates_ranks():
    lora = _model(b_rank=2)
    lora.add_weighted_adapter(["a", "b"], WEIGHTS, "mix", combination_type="cat")
    seen = 0
    for path, layer in lora.lora_layers():
        present = [n for n in ("a", "b") if n in layer.lora_A]
        assert "mix" in layer.lora_A, path
        assert layer.lora_A["mix"].shape[0] == sum(layer.lora_A[n].shape[0] for n in present)
        assert layer.scaling["mix"] == 1.0
        expected = _reference_sum(layer, WEIGHTS)
        assert expected.abs().max() > 1e-3
        torch.testing.assert_close(_new_delta(layer), expected, rtol=1e-5, atol=1e-6)
        seen += 1
    assert seen == 6  # q, v, o in two layers


def test_cat_with_unit_weights_equals_both_adapters_active(input_ids):
    lora = _model(b_rank=2)
    lora.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="cat")
    lora.set_adapter(["a", "b"])
    with torch.no_grad():
        both = lora(input_ids).logits
        lora.set_adapter("mix")
        torch.testing.assert_close(lora(input_ids).logits, both, rtol=1e-5, atol=1e-5)


def test_svd_with_full_rank_is_exact():
    lora = _model(b_rank=2)
    lora.add_weighted_adapter(["a", "b"], WEIGHTS, "mix", combination_type="svd", svd_rank=32)
    for path, layer in lora.lora_layers():
        assert layer.lora_A["mix"].shape[0] == min(layer.in_features, layer.out_features), path
        torch.testing.assert_close(_new_delta(layer), _reference_sum(layer, WEIGHTS), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_svd_truncated_is_the_best_rank_k_approximation(k):
    lora = _model()
    lora.add_weighted_adapter(["a", "b"], WEIGHTS, "mix", combination_type="svd", svd_rank=k)
    for path, layer in lora.lora_layers():
        target = _reference_sum(layer, WEIGHTS)
        got = _new_delta(layer)
        S = torch.linalg.svdvals(target)
        assert layer.lora_A["mix"].shape[0] == k
        assert torch.linalg.matrix_rank(got, atol=1e-5) == k
        # Eckart-Young: the best rank-k error in Frobenius norm is the norm of the dropped singular values.
        err = torch.linalg.matrix_norm(target - got)
        assert err.item() == pytest.approx(S[k:].norm().item(), rel=1e-4, abs=1e-6), path
        assert err.item() > 1e-4  # truncation really dropped something


def test_svd_default_rank_is_the_largest_rank_present_on_each_layer():
    lora = _model(b_rank=2)  # a: r=4 on q, v; b: r=2 on q, v, o
    lora.add_weighted_adapter(["a", "b"], WEIGHTS, "mix", combination_type="svd")
    assert lora.adapter_configs["mix"].r == 4
    for path, layer in lora.lora_layers():
        assert layer.lora_A["mix"].shape[0] == (2 if path.endswith("o_proj") else 4), path
        if path.endswith("o_proj"):  # a single rank-2 input: its rank is enough to be exact
            torch.testing.assert_close(_new_delta(layer), _reference_sum(layer, WEIGHTS), rtol=1e-4, atol=1e-5)


def test_linear_mixes_the_factors_as_documented():
    """A = sum_i sqrt(|w_i|) s_i A_i, B = sum_i sign(w_i) sqrt(|w_i|) B_i, scaling 1 (combine.py)."""
    lora = _model()
    weights = [0.7, 0.2]
    lora.add_weighted_adapter(["a", "b"], weights, "mix", combination_type="linear")
    for path, layer in lora.lora_layers():
        A = sum(w**0.5 * layer.scaling[n] * layer.lora_A[n].detach() for n, w in zip("ab", weights) if n in layer.lora_A)
        B = sum(w**0.5 * layer.lora_B[n].detach() for n, w in zip("ab", weights) if n in layer.lora_A)
        assert layer.scaling["mix"] == 1.0
        torch.testing.assert_close(layer.lora_A["mix"].detach(), A, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.lora_B["mix"].detach(), B, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(_new_delta(layer), B @ A, rtol=1e-5, atol=1e-6)


def test_linear_with_a_negative_weight_flips_the_sign_of_B():
    lora = _model(b_targets=("o_proj",))  # disjoint layers: each layer holds one adapter, no cross terms
    lora.add_weighted_adapter(["a", "b"], WEIGHTS, "mix", combination_type="linear")
    for path, layer in lora.lora_layers():
        torch.testing.assert_close(_new_delta(layer), _reference_sum(layer, WEIGHTS), rtol=1e-5, atol=1e-6)


def test_new_adapter_is_an_ordinary_adapter_that_merges(input_ids):
    lora = _model(b_rank=2)
    lora.add_weighted_adapter(["a", "b"], WEIGHTS, "mix", combination_type="svd", svd_rank=3)
    assert lora.active_adapters == ["a"]
    lora.set_adapter("mix")
    with torch.no_grad():
        out = lora(input_ids).logits
        lora.merge()
        torch.testing.assert_close(lora(input_ids).logits, out, rtol=1e-5, atol=1e-5)


ERRORS = {
    # name: (model kwargs, add_weighted_adapter args, message)
    "linear_different_ranks": (dict(b_rank=2), (["a", "b"], WEIGHTS, "mix", "linear"), "equal rank"),
    "unknown_combination": ({}, (["a", "b"], WEIGHTS, "mix", "ties"), "combination_type"),
    "weight_count": ({}, (["a", "b"], [1.0], "mix", "cat"), "one weight per adapter"),
    "bad_svd_rank": ({}, (["a", "b"], WEIGHTS, "mix", "svd", 0), "svd_rank"),
    "existing_name": ({}, (["a", "b"], WEIGHTS, "b", "cat"), "already exists"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_invalid_combination_raises_and_adds_nothing(case):
    model_kwargs, args, message = ERRORS[case]
    lora = _model(**model_kwargs)
    with pytest.raises(AdapterError, match=message):
        lora.add_weighted_adapter(*args)
    assert list(lora.adapter_configs) == ["a", "b"]
    assert not any("mix" in layer.lora_A for _, layer in lora.lora_layers())


@pytest.mark.parametrize("kind", ["linear", "cat", "svd"])
def test_dora_adapters_cannot_be_combined(kind):
    lora = _model()
    lora.add_adapter("d", LoraConfig(target_modules=["q_proj"], r=4, use_dora=True))
    with pytest.raises(AdapterError, match="DoRA"):
        lora.add_weighted_adapter(["a", "d"], [0.5, 0.5], "mix", combination_type=kind)
    assert "mix" not in lora.adapter_configs


def test_modules_to_save_adapters_cannot_be_combined():
    lora = wrap(build_model("bert"), LoraConfig(target_modules=["query"], modules_to_save=["classifier"]), adapter_name="a")
    lora.add_adapter("b", LoraConfig(target_modules=["query"]))
    with pytest.raises(AdapterError, match="modules_to_save"):
        lora.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mix", combination_type="cat")


def test_cat_beyond_the_layer_rank_is_still_exact():
    """Two r=16 adapters on v_proj (16 outputs): the concatenation would be rank 32, more than the layer allows."""
    lora = wrap(build_model("llama"), LoraConfig(target_modules=["v_proj", "q_proj"], r=16), adapter_name="a")
    lora.add_adapter("b", LoraConfig(target_modules=["v_proj", "q_proj"], r=16, lora_alpha=4))
    randomize_lora(lora)
    lora.add_weighted_adapter(["a", "b"], WEIGHTS, "mix", combination_type="cat")
    for path, layer in lora.lora_layers():
        assert layer.lora_A["mix"].shape[0] == (16 if path.endswith("v_proj") else 32), path
        torch.testing.assert_close(_new_delta(layer), _reference_sum(layer, WEIGHTS), rtol=1e-4, atol=1e-5)
