"""The adapter-method seam (lora/methods/): the registry, roles by method, and a third method that works
through routing, merge, save/load and training from this file alone."""

from __future__ import annotations

import pytest
import torch

from tiny_models import VOCAB, build_model, randomize_lora
from lorakit import ConfigError, LoraConfig, load_adapter, wrap
from lorakit.lora import parameter_roles
from lorakit.lora.methods import METHODS, Adapter, Dora, Lora, config_class_for, method_for
from lorakit.train import build_optimizer
from lorakit.train.checkpoint import trainable_parameters
from lorakit.config import TrainConfig
from lorakit.train.tasks import adapter_parameters

BASE = "__base__"


def _ids(rows: int = 3, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, 8), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


# ---- registry ---------------------------------------------------------------------------------------
def test_registry_picks_lora_or_dora_by_peft_type_and_use_dora():
    assert method_for(LoraConfig()) is Lora
    assert method_for(LoraConfig(use_dora=True)) is Dora
    assert config_class_for("LORA") is LoraConfig
    assert config_class_for("IA3") is None


def test_an_unregistered_peft_type_is_a_config_error_naming_the_known_ones():
    class Unknown(LoraConfig):
        peft_type = "NOPE"

    with pytest.raises(ConfigError, match="NOPE.*known: LORA, LORA \\+ use_dora"):
        method_for(Unknown())


def test_every_adapter_tensor_has_the_role_its_method_gives_it():
    """parameter_roles (from names) agrees with each adapter's own tensors(), on linear and embedding layers."""
    lora = wrap(build_model("llama"), LoraConfig(target_modules=["q_proj", "embed_tokens"]), adapter_name="a")
    lora.add_adapter("b", LoraConfig(target_modules=["v_proj"], use_dora=True))
    by_id = {id(p): role for _, layer in lora.lora_layers() for _, role, p in layer.adapter_parameters()}
    named = dict(lora.named_parameters())
    roles = parameter_roles(named)
    assert roles == {n: by_id[id(p)] for n, p in named.items() if id(p) in by_id}
    assert set(roles.values()) == {"A", "B", "magnitude"}


def test_loraplus_puts_embedding_lora_b_in_the_fast_group():
    """LoRA on an nn.Embedding keeps B in the same role as on a linear layer, so LoRA+ speeds it up too."""
    lora = wrap(build_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    params = trainable_parameters(lora)
    embedding_b = [p for n, p in params.items() if "embed_tokens" in n and ".lora_B." in n]
    assert len(embedding_b) == 1
    opt = build_optimizer(params, TrainConfig(lr=1e-3, loraplus_lr_ratio=16.0))
    fast = {id(p) for p in opt.param_groups[1]["params"]}
    assert id(embedding_b[0]) in fast
    assert fast == {id(p) for n, p in params.items() if parameter_roles(params).get(n) == "B"}
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 16e-3]


# ---- a third method, defined here -------------------------------------------------------------------
class RowScaleConfig(LoraConfig):
    peft_type = "TOY_ROW_SCALE"


class RowScale(Adapter):
    """A toy IA3-like method: each output feature of W x is scaled by a learned l (out,), the bias is not.

        y = base(x) + (l - 1) * W x        merged: W' = l * W        (l = 1 at start: y = base(x))
    """

    peft_type = "TOY_ROW_SCALE"
    config_class = RowScaleConfig
    stores = {"scale": "toy_row_scale"}
    uses_base_out = True

    def __init__(self, layer, name, config, module_name, *, init=None):
        super().__init__(layer, name, config, module_name, init=init)
        dtype, device = layer.adapter_dtype_device()
        self._put("scale", torch.ones(layer.out_features, dtype=dtype, device=device))

    def saved_tensors(self):
        return {"toy_row_scale": self.tensor("scale")}

    def delta(self, x, base_out):
        return (self.tensor("scale") - 1) * self.layer.without_bias(base_out).to(self.tensor("scale").dtype)

    def delta_weight(self):
        return (self.tensor("scale").float() - 1)[:, None] * self.layer.base_weight().float()  # (out, in)

    def merge_terms(self, state):
        return self.tensor("scale").float(), None


@pytest.fixture
def row_scale(monkeypatch):
    """RowScale registered for the test only: one registry entry, nothing else changed."""
    monkeypatch.setitem(METHODS, ("TOY_ROW_SCALE", False), RowScale)


def _randomize_row_scales(lora, seed: int = 3) -> None:
    """Row scales, and DoRA magnitudes relative to their ||W + s B A||, within +-20% of 1, as after training
    (a merged row factor near 0 would make unmerging divide by it)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers():
            for name, role, p in layer.adapter_parameters():
                if role in ("scale", "magnitude"):
                    one = 1 if role == "scale" else (layer.base_weight().float() + layer.delta_weight(name)).norm(dim=1)
                    p.copy_(one * (1 + 0.2 * (2 * torch.rand(p.shape, generator=gen) - 1)))


def _mixed_methods():
    """Tiny Llama with a RowScale adapter "s", a LoRA adapter "l" and a DoRA adapter "d" sharing v_proj."""
    lora = wrap(build_model("llama"), RowScaleConfig(target_modules=["q_proj", "v_proj"]), adapter_name="s")
    lora.add_adapter("l", LoraConfig(target_modules=["v_proj", "o_proj", "embed_tokens"], r=4))
    lora.add_adapter("d", LoraConfig(target_modules=["v_proj", "down_proj"], r=2, use_dora=True))
    randomize_lora(lora, scale=0.2)
    _randomize_row_scales(lora)
    return lora


def test_a_fresh_third_method_adapter_leaves_the_output_unchanged(row_scale):
    base = build_model("llama")
    expected = _logits(base, _ids())
    lora = wrap(base, RowScaleConfig(target_modules=["q_proj", "v_proj"]))
    torch.testing.assert_close(_logits(lora, _ids()), expected, rtol=0, atol=0)
    layer = lora.model.get_submodule("model.layers.0.self_attn.v_proj")
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["toy_row_scale.default"]


def test_a_third_method_computes_its_own_update(row_scale):
    lora = wrap(build_model("llama"), RowScaleConfig(target_modules=["v_proj"]))
    _randomize_row_scales(lora)
    layer = lora.model.get_submodule("model.layers.0.self_attn.v_proj")
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    scale = layer.toy_row_scale["default"]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (scale[:, None] * layer.base_layer.weight).T)


def test_mixed_batch_rows_of_three_methods_equal_each_row_alone(row_scale):
    lora = _mixed_methods()
    rows = ["s", BASE, "l", "d", "s"]
    ids = _ids(len(rows))
    mixed = _logits(lora, ids, adapter_names=rows)
    for i, name in enumerate(rows):
        if name == BASE:
            with lora.disable_adapters():
                alone = _logits(lora, ids[i:i + 1])
        else:
            lora.set_adapter(name)
            alone = _logits(lora, ids[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_merging_three_methods_at_once_equals_unmerged_and_unmerge_restores(row_scale):
    lora = _mixed_methods().eval()
    lora.set_adapter(["s", "l", "d"])
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in lora.lora_layers()}
    unmerged = _logits(lora, _ids())
    lora.merge(safe_merge=True)
    torch.testing.assert_close(_logits(lora, _ids()), unmerged, rtol=1e-4, atol=1e-5)
    lora.unmerge()
    for n, layer in lora.lora_layers():
        torch.testing.assert_close(layer.base_layer.weight, weights[n], rtol=1e-5, atol=1e-6)


def test_a_third_method_saves_under_its_peft_type_and_loads_back_exactly(row_scale, tmp_path):
    lora = _mixed_methods()
    lora.save_adapter(tmp_path, ["s"])  # any adapter but "default" goes to its own folder, as in PEFT
    lora.set_adapter("s")
    expected = _logits(lora, _ids())
    loaded = load_adapter(build_model("llama"), tmp_path / "s")
    assert type(loaded.adapter_configs["default"]) is RowScaleConfig
    assert '"peft_type": "TOY_ROW_SCALE"' in (tmp_path / "s" / "adapter_config.json").read_text()
    torch.testing.assert_close(_logits(loaded, _ids()), expected, rtol=0, atol=0)


def test_a_third_method_trains_alone_and_per_task(row_scale):
    lora = _mixed_methods()
    lora.set_adapter(["s", "l"])
    params = trainable_parameters(lora)
    roles = parameter_roles(params)
    assert set(roles.values()) == {"scale", "A", "B"} and roles.keys() == params.keys()
    owned = adapter_parameters(lora, ["s", "l"], params)
    assert {id(p) for p in owned["s"]} == {id(p) for n, p in params.items() if roles[n] == "scale"}
    lora.train()
    ids = _ids()
    lora(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in owned["s"])
    lora.cast_adapters(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for _, layer in lora.lora_layers() for *_, p in layer.adapter_parameters())
