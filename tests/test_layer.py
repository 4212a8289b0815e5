"""Contract of a single LoRA layer: the forward formula, init schemes, scaling, DoRA and dropout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tiny_models import build_model, randomize_lora
from lorakit import ConfigError, LoraConfig, wrap
from lorakit.lora.layer import LoraEmbedding, LoraLayer

# kind -> (family, target suffix, full module name of one adapted layer)
KINDS = {
    "linear": ("llama", "q_proj", "model.layers.0.self_attn.q_proj"),
    "linear_narrow": ("llama", "v_proj", "model.layers.0.self_attn.v_proj"),  # out (16) != in (32)
    "conv1d": ("gpt2", "c_attn", "transformer.h.0.attn.c_attn"),
    "embedding": ("llama", "embed_tokens", "model.embed_tokens"),
}


def _wrapped(kind: str, **config):
    family, target, path = KINDS[kind]
    base = build_model(family)
    lora = wrap(base, LoraConfig(target_modules=[target], **config))
    return lora, lora.model.get_submodule(path)


def _layer_input(layer: LoraLayer, seed: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if isinstance(layer, LoraEmbedding):
        return torch.randint(0, layer.in_features, (2, 7), generator=gen)
    return torch.randn(2, 7, layer.in_features, generator=gen)


def _w_out_in(module: nn.Module) -> torch.Tensor:
    """The (base) weight in (out, in) orientation, from the raw parameter, independently of the layer code."""
    base = module.base_layer if isinstance(module, LoraLayer) else module
    w = base.weight
    if isinstance(base, nn.Linear):
        return w
    return w.T  # Conv1D stores (in, out); Embedding stores (num_embeddings, dim) = (in, out)


def _down_by_hand(layer: LoraLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    A = layer.lora_A[name]
    return A.T[x] if isinstance(layer, LoraEmbedding) else x @ A.T


def _bias(layer: LoraLayer):
    b = getattr(layer.base_layer, "bias", None)
    return 0 if b is None else b


# ---- fresh adapters change nothing -------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
def test_fresh_adapter_output_equals_base_output(kind, input_ids):
    family, target, _ = KINDS[kind]
    base = build_model(family)
    with torch.no_grad():
        expected = base(input_ids).logits
    lora = wrap(base, LoraConfig(target_modules=[target]))
    with torch.no_grad():
        fresh = lora(input_ids).logits
        torch.testing.assert_close(fresh, expected, rtol=0, atol=0)
        randomize_lora(lora)
        assert not torch.allclose(lora(input_ids).logits, expected, atol=1e-4), "adapter had no effect"


@pytest.mark.parametrize("kind", ["linear", "linear_narrow", "conv1d", "embedding"])
def test_forward_is_base_plus_scaled_BA(kind):
    """y = base(x) + (alpha / r) * (x A^T) B^T, with x A^T a lookup of A^T rows for embeddings."""
    lora, layer = _wrapped(kind, r=4, lora_alpha=12)
    randomize_lora(lora)
    x = _layer_input(layer)
    with torch.no_grad():
        expected = layer.base_layer(x) + 3.0 * _down_by_hand(layer, "default", x) @ layer.lora_B["default"].T
        assert not torch.allclose(expected, layer.base_layer(x), atol=1e-4)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


# adapter dtype on a bf16 base: fp32 by default (unfused path), or bf16 when cast with the model (fused GEMM)
ADAPTER_DTYPES = {"fp32_adapters": torch.float32, "bf16_adapters": torch.bfloat16}


@pytest.mark.parametrize("adapter_dtype", list(ADAPTER_DTYPES))
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_bf16_base_forward_matches_fp32_formula(kind, adapter_dtype):
    """On a bf16 base the output is bf16 and equals the LoRA formula computed in fp32, within bf16 rounding,
    whether the adapter is kept in fp32 (the default) or cast to bf16 with the whole model."""
    family, target, path = KINDS[kind]
    lora = wrap(build_model(family).to(torch.bfloat16), LoraConfig(target_modules=[target], r=4, lora_alpha=8))
    layer = lora.model.get_submodule(path)
    assert layer.lora_A["default"].dtype == torch.float32  # the default keeps adapters in fp32 on a 16-bit base
    if adapter_dtype == "bf16_adapters":
        lora.to(torch.bfloat16)  # the base is bf16 already; this casts the adapter too
    randomize_lora(lora, scale=0.5)
    assert layer.lora_A["default"].dtype == ADAPTER_DTYPES[adapter_dtype]
    x = _layer_input(layer).to(torch.bfloat16)
    with torch.no_grad():
        A, B = layer.lora_A["default"].float(), layer.lora_B["default"].float()
        expected = layer.base_layer(x).float() + 2.0 * (x.float() @ A.T) @ B.T
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert not torch.allclose(expected, layer.base_layer(x).float(), atol=1e-2), "adapter had no effect"
    # bf16 keeps 8 bits of mantissa: allow a few units in the last place of the larger terms
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=6e-2)


# ---- init schemes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_default_init_is_kaiming_uniform_A_and_zero_B(kind):
    _, layer = _wrapped(kind, r=8)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform(a=sqrt(5)) bound for fan_in = in_features
    assert A.shape == (8, layer.in_features) and B.shape == (layer.out_features, 8)
    assert torch.count_nonzero(B) == 0
    assert A.abs().max() <= bound
    assert A.abs().max() > 0.9 * bound  # uniform over the full range, not a narrower one
    assert abs(A.mean().item()) < 0.2 * bound


def test_gaussian_init_has_A_std_one_over_r_and_zero_B():
    base = build_model("llama")
    lora = wrap(base, LoraConfig(target_modules="all-linear", r=2, init_lora_weights="gaussian"))
    As = torch.cat([layer.lora_A["default"].flatten() for _, layer in lora.lora_layers()])
    Bs = torch.cat([layer.lora_B["default"].flatten() for _, layer in lora.lora_layers()])
    assert torch.count_nonzero(Bs) == 0
    # 1/r = 0.5 here; kaiming-uniform would give about 0.1.
    assert As.std().item() == pytest.approx(0.5, rel=0.1)


def test_init_false_makes_B_nonzero_and_changes_output(input_ids):
    base = build_model("llama")
    with torch.no_grad():
        expected = base(input_ids).logits
    lora = wrap(base, LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    for _, layer in lora.lora_layers():
        assert torch.count_nonzero(layer.lora_B["default"]) > 0
        assert torch.count_nonzero(layer.lora_A["default"]) > 0
    with torch.no_grad():
        assert not torch.allclose(lora(input_ids).logits, expected, atol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "linear_narrow", "conv1d"])
def test_pissa_init_keeps_output_and_splits_weight_into_top_r_and_residual(kind):
    family, target, path = KINDS[kind]
    base = build_model(family)
    original = _w_out_in(base.get_submodule(path)).detach().clone()
    x = torch.randn(2, 5, original.shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = base.get_submodule(path)(x)
    r, alpha = 4, 8
    lora = wrap(base, LoraConfig(target_modules=[target], r=r, lora_alpha=alpha, init_lora_weights="pissa"))
    layer = lora.model.get_submodule(path)
    s = alpha / r
    U, S, Vh = torch.linalg.svd(original, full_matrices=False)
    top_r = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    with torch.no_grad():
        adapter_part = s * layer.lora_B["default"] @ layer.lora_A["default"]
        residual = _w_out_in(layer)
        torch.testing.assert_close(adapter_part, top_r, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(residual, original - top_r, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(residual, original, atol=1e-3), "base weight was not replaced by its residual"
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


def test_pissa_niter_keeps_output_unchanged():
    base = build_model("llama")
    path = "model.layers.1.self_attn.q_proj"
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = base.get_submodule(path)(x)
    lora = wrap(base, LoraConfig(target_modules=["q_proj"], r=4, init_lora_weights="pissa_niter_4"))
    layer = lora.model.get_submodule(path)
    with torch.no_grad():
        assert torch.count_nonzero(layer.lora_B["default"]) > 0
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


def test_embedding_init_true_is_zero_A_and_normal_B():
    _, layer = _wrapped("embedding", r=4)
    assert torch.count_nonzero(layer.lora_A["default"]) == 0
    assert torch.count_nonzero(layer.lora_B["default"]) == layer.lora_B["default"].numel()


def test_pissa_on_embedding_is_refused():
    base = build_model("llama")
    with pytest.raises(ConfigError, match="pissa"):
        wrap(base, LoraConfig(target_modules=["embed_tokens"], init_lora_weights="pissa"))


# ---- scaling -----------------------------------------------------------------------------------------
SCALINGS = {
    # name: (r, alpha, use_rslora, expected scaling)
    "plain": (4, 16, False, 16 / 4),
    "rslora": (4, 16, True, 16 / math.sqrt(4)),
    "rslora_r9": (9, 6, True, 6 / 3),
}


@pytest.mark.parametrize("case", SCALINGS)
def test_scaling_is_alpha_over_r_or_alpha_over_sqrt_r_with_rslora(case):
    r, alpha, rslora, expected = SCALINGS[case]
    lora, layer = _wrapped("linear", r=r, lora_alpha=alpha, use_rslora=rslora)
    assert layer.scaling["default"] == pytest.approx(expected)
    randomize_lora(lora)
    x = _layer_input(layer)
    with torch.no_grad():
        by_hand = layer.base_layer(x) + expected * (x @ layer.lora_A["default"].T) @ layer.lora_B["default"].T
        torch.testing.assert_close(layer(x), by_hand, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.delta_weight("default"),
                                   expected * layer.lora_B["default"] @ layer.lora_A["default"])


# ---- DoRA --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "linear_narrow", "conv1d", "embedding"])
def test_dora_init_output_equals_base_and_magnitude_is_weight_row_norm(kind):
    lora, layer = _wrapped(kind, use_dora=True)
    x = _layer_input(layer)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=1e-6)
        row_norm = _w_out_in(layer).norm(dim=1)  # one per output feature
        torch.testing.assert_close(layer.lora_magnitude["default"], row_norm, rtol=1e-6, atol=1e-6)
        randomize_lora(lora)
        assert not torch.allclose(layer(x), layer.base_layer(x), atol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
def test_dora_forward_is_magnitude_times_normalised_direction(kind):
    """y = m * (W + s B A) x / ||W + s B A||_row  (+ bias)  (Liu et al. 2024, eq. 5)."""
    lora, layer = _wrapped(kind, use_dora=True, r=4, lora_alpha=8)
    randomize_lora(lora, scale=0.3)
    x = _layer_input(layer)
    with torch.no_grad():
        V = _w_out_in(layer) + 2.0 * layer.lora_B["default"] @ layer.lora_A["default"]
        W_dora = layer.lora_magnitude["default"][:, None] * V / V.norm(dim=1, keepdim=True)
        expected = W_dora.T[x] if isinstance(layer, LoraEmbedding) else x @ W_dora.T + _bias(layer)
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


# ---- dropout -----------------------------------------------------------------------------------------
def test_zero_dropout_creates_no_dropout_module():
    lora, layer = _wrapped("linear", lora_dropout=0.0)
    assert len(layer.lora_dropout) == 0
    assert not any(isinstance(m, nn.Dropout) for _, l in lora.lora_layers() for m in l.modules())


@pytest.mark.parametrize("use_dora", [False, True], ids=["plain", "dora"])
def test_dropout_changes_output_in_train_mode_only(use_dora):
    lora, layer = _wrapped("linear", lora_dropout=0.5, use_dora=use_dora)
    assert isinstance(layer.lora_dropout["default"], nn.Dropout)
    randomize_lora(lora, scale=0.3)
    x = _layer_input(layer)
    with torch.no_grad():
        # Reference without dropout, by hand (for DoRA the adapter is compared against eval mode).
        lora.eval()
        eval_out = layer(x)
        if not use_dora:
            no_dropout = layer.base_layer(x) + (x @ layer.lora_A["default"].T) @ layer.lora_B["default"].T
            torch.testing.assert_close(eval_out, no_dropout, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer(x), eval_out, rtol=0, atol=0)
        lora.train()
        torch.manual_seed(0)
        train_a = layer(x)
        train_b = layer(x)
    assert not torch.allclose(train_a, eval_out, atol=1e-4)
    assert not torch.allclose(train_a, train_b, atol=1e-4), "dropout should draw a new mask per call"


def test_embedding_ignores_dropout():
    lora, layer = _wrapped("embedding", lora_dropout=0.5)
    randomize_lora(lora)
    x = _layer_input(layer)
    with torch.no_grad():
        lora.eval()
        eval_out = layer(x)
        lora.train()
        torch.testing.assert_close(layer(x), eval_out, rtol=0, atol=0)
        assert not torch.allclose(eval_out, layer.base_layer(x), atol=1e-4)


def test_wrapping_keeps_the_model_mode_in_every_new_module():
    base = build_model("bert")
    assert not base.training
    lora = wrap(base, LoraConfig(target_modules=["query"], lora_dropout=0.1, modules_to_save=["classifier"]))
    lora.add_adapter("other", LoraConfig(target_modules=["value"], lora_dropout=0.2, modules_to_save=["classifier"]))
    assert [n for n, m in lora.named_modules() if m.training] == []
    lora.train()
    assert [n for n, m in lora.named_modules() if not m.training] == []
