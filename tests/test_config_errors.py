"""LoraConfig validation, target selection, per-layer overrides, and that a rejected config changes nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tiny_models import build_model
from lorakit import ConfigError, LoraConfig, TargetNotFoundError, wrap
from lorakit.lora.full_copy import FullCopy
from lorakit.lora.layer import LoraLayer


def _adapted(lora) -> list[str]:
    return [name for name, _ in lora.lora_layers()]


# ---- field validation ----------------------------------------------------------------------------------
BAD_FIELDS = {
    # name: (kwargs, message regex)
    "r_zero": (dict(r=0), r"r must be a positive integer, at most 65536, got 0"),
    "r_negative": (dict(r=-4), r"r must be a positive integer"),
    "r_float": (dict(r=2.5), r"r must be a positive integer"),
    "r_bool": (dict(r=True), r"r must be a positive integer"),
    "alpha_zero": (dict(lora_alpha=0), r"lora_alpha must be a positive number"),
    # NaN fails every comparison, so `alpha <= 0` let it (and inf) through; a finite but absurd alpha overflows
    "alpha_nan": (dict(lora_alpha=float("nan")), r"lora_alpha must be a positive number, finite and at most 1,000,000, got nan"),
    "alpha_inf": (dict(lora_alpha=float("inf")), r"lora_alpha must be a positive number, finite .* got inf"),
    "alpha_huge": (dict(lora_alpha=1e300), r"lora_alpha must be .* at most 1,000,000, got 1e\+300"),
    "alpha_huge_int": (dict(lora_alpha=10**400), r"lora_alpha must be .* at most 1,000,000"),
    "r_huge": (dict(r=2**40), r"r must be a positive integer, at most 65536, got 1099511627776"),
    "alpha_pattern_inf": (dict(alpha_pattern={"q_proj": float("inf")}), r"alpha_pattern\['q_proj'\] must be a positive number, finite"),
    "rank_pattern_huge": (dict(rank_pattern={"q_proj": 10**30}), r"rank_pattern\['q_proj'\] must be a positive integer, at most 65536"),
    "dropout_one": (dict(lora_dropout=1.0), r"lora_dropout must be a number in \[0, 1\)"),
    "unknown_init": (dict(init_lora_weights="xavier"), r"init_lora_weights must be .*'xavier'"),
    "pissa_niter_zero": (dict(init_lora_weights="pissa_niter_0"), r"init_lora_weights"),
    "bad_bias": (dict(bias="some"), r"bias must be one of none, all, lora_only; got 'some'"),
    "bad_target_regex": (dict(target_modules="q_proj("), r"target_modules 'q_proj\(' is not a valid regular expression"),
    "bad_exclude_regex": (dict(exclude_modules="[a-"), r"exclude_modules .* not a valid regular expression"),
    "empty_targets": (dict(target_modules=[]), r"target_modules must not be empty"),
    "targets_not_strings": (dict(target_modules=["q_proj", 3]), r"target_modules must be a list of module names"),
    "bad_rank_pattern_regex": (dict(rank_pattern={"q_proj(": 4}), r"rank_pattern key .* not a valid regular expression"),
    "bad_rank_pattern_value": (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be a positive integer"),
    "bad_alpha_pattern_value": (dict(alpha_pattern={"q_proj": -1}), r"alpha_pattern\['q_proj'\] must be a positive number"),
    "bad_layers_to_transform": (dict(layers_to_transform=[0, -1]), r"layers_to_transform must be"),
    "bad_modules_to_save": (dict(modules_to_save="classifier"), r"modules_to_save must be a list"),
    "flag_not_bool": (dict(use_dora="yes"), r"use_dora must be true or false"),
}


@pytest.mark.parametrize("case", BAD_FIELDS)
def test_invalid_field_raises_config_error_naming_it(case):
    kwargs, message = BAD_FIELDS[case]
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**kwargs)


def test_several_problems_are_reported_together():
    with pytest.raises(ConfigError) as err:
        LoraConfig(r=0, bias="x", lora_dropout=2)
    assert len(err.value.problems) == 3
    assert "3 problems" in str(err.value)


@pytest.mark.parametrize("how", ["kwargs", "from_dict"])
def test_unknown_option_suggests_the_close_one(how):
    with pytest.raises(ConfigError, match=r"lora_aplha: unknown option \(did you mean 'lora_alpha'\?\)"):
        if how == "kwargs":
            LoraConfig(lora_aplha=16)
        else:
            LoraConfig.from_dict({"r": 4, "lora_aplha": 16})


def test_from_dict_rejects_non_mapping_and_names_the_source():
    with pytest.raises(ConfigError, match="expected a mapping"):
        LoraConfig.from_dict(["r", 4])
    with pytest.raises(ConfigError, match=r"invalid train.yaml: r must be"):
        LoraConfig.from_dict({"r": 0}, where="train.yaml")


def test_valid_inits_are_accepted():
    for init in (True, False, "gaussian", "pissa", "pissa_niter_4"):
        assert LoraConfig(init_lora_weights=init).init_lora_weights == init


# ---- target selection ------------------------------------------------------------------------------------
def test_target_that_matches_nothing_lists_candidates_and_a_close_match():
    model = build_model("llama")
    with pytest.raises(TargetNotFoundError) as err:
        wrap(model, LoraConfig(target_modules=["q_prj"]))
    message = str(err.value)
    assert "did you mean 'q_proj'" in message
    for candidate in ("k_proj", "v_proj", "o_proj", "gate_proj", "embed_tokens", "lm_head"):
        assert candidate in message


def test_regex_that_matches_nothing_raises_target_not_found():
    with pytest.raises(TargetNotFoundError, match="Modules that can be targeted"):
        wrap(build_model("gpt2"), LoraConfig(target_modules=r".*\.q_proj"))


def test_unwrappable_target_raises_naming_the_type():
    with pytest.raises(ConfigError, match=r"'model.layers.0.self_attn' is a LlamaAttention, which LoRA cannot wrap"):
        wrap(build_model("llama"), LoraConfig(target_modules=["self_attn"]))


def test_default_targets_by_model_type():
    assert _adapted(wrap(build_model("llama"), LoraConfig())) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    assert _adapted(wrap(build_model("gpt2"), LoraConfig())) == [f"transformer.h.{i}.attn.c_attn" for i in range(2)]


def test_no_default_targets_for_unknown_model_raises():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="target_modules is not set"):
        wrap(model, LoraConfig())


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
def test_all_linear_targets_every_linear_but_the_output_head(family):
    model = build_model(family)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    assert "lm_head" in linear and len(linear) > 4
    lora = wrap(model, LoraConfig(target_modules="all-linear"))
    assert _adapted(lora) == [n for n in linear if n != "lm_head"]


def test_regex_target_matches_the_full_name():
    lora = wrap(build_model("llama"), LoraConfig(target_modules=r".*\.layers\.1\.self_attn\.(q|k)_proj"))
    assert _adapted(lora) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]


def test_list_target_matches_exact_name_or_dotted_suffix():
    lora = wrap(build_model("llama"), LoraConfig(target_modules=["self_attn.q_proj", "model.layers.0.mlp.up_proj"]))
    assert _adapted(lora) == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
                              "model.layers.1.self_attn.q_proj"]
    # "proj" is not a dotted suffix of "q_proj"
    with pytest.raises(TargetNotFoundError):
        wrap(build_model("llama"), LoraConfig(target_modules=["proj"]))


EXCLUDES = {
    "list": (["o_proj", "mlp"], lambda n: not n.endswith("o_proj")),  # "mlp" names a container, excludes nothing
    "regex": (r".*\.layers\.0\..*", lambda n: ".layers.1." in n),
}


@pytest.mark.parametrize("case", EXCLUDES)
def test_exclude_modules_removes_targets(case):
    exclude, keep = EXCLUDES[case]
    model = build_model("llama")
    every = _adapted(wrap(build_model("llama"), LoraConfig(target_modules="all-linear")))
    lora = wrap(model, LoraConfig(target_modules="all-linear", exclude_modules=exclude))
    assert _adapted(lora) == [n for n in every if keep(n)]
    assert len(_adapted(lora)) < len(every)


LAYERS = {
    # name: (family, config, expected adapted names)
    "list": ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
             ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]),
    "int": ("llama", dict(target_modules=["q_proj"], layers_to_transform=0), ["model.layers.0.self_attn.q_proj"]),
    "pattern": ("llama", dict(target_modules=["o_proj"], layers_to_transform=[1], layers_pattern="layers"),
                ["model.layers.1.self_attn.o_proj"]),
    "gpt2_h": ("gpt2", dict(target_modules=["c_attn", "c_fc"], layers_to_transform=[0], layers_pattern=["h"]),
               ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"]),
    "bert_layer": ("bert", dict(target_modules=["query"], layers_to_transform=[1], layers_pattern="layer"),
                   ["bert.encoder.layer.1.attention.self.query"]),
    "bert_no_pattern": ("bert", dict(target_modules=["query"], layers_to_transform=[0]),
                        ["bert.encoder.layer.0.attention.self.query"]),
}


@pytest.mark.parametrize("case", LAYERS)
def test_layers_to_transform_selects_layer_indices(case):
    family, config, expected = LAYERS[case]
    assert _adapted(wrap(build_model(family), LoraConfig(**config))) == expected


def test_layers_pattern_that_matches_no_layer_list_targets_nothing():
    with pytest.raises(TargetNotFoundError):
        wrap(build_model("llama"), LoraConfig(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="blocks"))


def test_rank_and_alpha_patterns_apply_per_layer():
    config = LoraConfig(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16,
                        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 4},
                        alpha_pattern={r"layers\.0\.self_attn\.q_proj": 4})
    lora = wrap(build_model("llama"), config)
    expected = {  # path: (r, scaling)
        "model.layers.0.self_attn.q_proj": (8, 4 / 8),
        "model.layers.0.self_attn.v_proj": (2, 16 / 2),
        "model.layers.1.self_attn.q_proj": (4, 16 / 4),
        "model.layers.1.self_attn.v_proj": (2, 16 / 2),
    }
    got = {n: (layer.lora_A["default"].shape[0], layer.scaling["default"]) for n, layer in lora.lora_layers()}
    assert got == expected
    assert all(layer.lora_B["default"].shape[1] == expected[n][0] for n, layer in lora.lora_layers())


def test_pattern_matches_at_a_dot_boundary_only():
    config = LoraConfig(target_modules=["q_proj"], rank_pattern={"proj": 2})  # "proj" is not a whole component
    assert config.rank_for("model.layers.0.self_attn.q_proj") == config.r
    assert config.rank_for("model.layers.0.self_attn.proj") == 2


# ---- rank limits -------------------------------------------------------------------------------------------
def test_rank_larger_than_a_layer_allows_names_the_layer_and_the_limit():
    with pytest.raises(ConfigError) as err:
        wrap(build_model("llama"), LoraConfig(target_modules=["q_proj", "v_proj"], r=20))
    message = str(err.value)
    assert "'model.layers.0.self_attn.v_proj'" in message and "at most 16" in message
    assert "q_proj" not in message  # 32 x 32 allows r = 20


def test_rank_equal_to_the_limit_is_allowed():
    lora = wrap(build_model("llama"), LoraConfig(target_modules=["v_proj"], r=16))
    assert all(layer.lora_A["default"].shape[0] == 16 for _, layer in lora.lora_layers())


# ---- a rejected config changes nothing -----------------------------------------------------------------------
REJECTED = {
    # name: (config kwargs, expected exception)
    "target_not_found": (dict(target_modules=["q_prj"]), TargetNotFoundError),
    "rank_too_large_late_layer": (dict(target_modules=["q_proj", "lm_head"], rank_pattern={"lm_head": 64}), ConfigError),
    "unwrappable": (dict(target_modules=["q_proj", "mlp"]), ConfigError),
    "missing_modules_to_save": (dict(target_modules=["q_proj"], modules_to_save=["score"]), ConfigError),
    "pissa_with_embedding": (dict(target_modules=["q_proj", "lm_head", "embed_tokens"], init_lora_weights="pissa"),
                             ConfigError),
}


def _state(model: nn.Module):
    return ({n: id(m) for n, m in model.named_modules()},
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})


def _assert_same_state(model, before):
    modules, params = _state(model)
    assert modules == before[0]
    assert params.keys() == before[1].keys()
    for n, (value, requires_grad) in params.items():
        assert torch.equal(value, before[1][n][0]) and requires_grad == before[1][n][1], n


@pytest.mark.parametrize("case", REJECTED)
def test_rejected_config_leaves_a_plain_model_untouched(case):
    kwargs, error = REJECTED[case]
    model = build_model("llama")
    before = _state(model)
    with pytest.raises(error):
        wrap(model, LoraConfig(**kwargs))
    _assert_same_state(model, before)
    assert not any(isinstance(m, (LoraLayer, FullCopy)) for m in model.modules())


@pytest.mark.parametrize("case", REJECTED)
def test_rejected_config_leaves_a_lora_model_untouched(case):
    kwargs, error = REJECTED[case]
    lora = wrap(build_model("llama"), LoraConfig(target_modules=["q_proj", "v_proj"]))
    before = _state(lora)
    with pytest.raises(error):
        lora.add_adapter("second", LoraConfig(**kwargs))
    _assert_same_state(lora, before)
    assert list(lora.adapter_configs) == ["default"]
    assert all(list(layer.lora_A) == ["default"] for _, layer in lora.lora_layers())


def test_pissa_on_a_model_whose_embedding_comes_last_changes_no_weight():
    """The embedding check must come before any PiSSA init rewrites an earlier layer's base weight."""

    class Tail(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.table = nn.Embedding(10, 8)

    torch.manual_seed(0)
    model = Tail()
    before = _state(model)
    with pytest.raises(ConfigError, match="pissa"):
        wrap(model, LoraConfig(target_modules=["proj", "table"], r=2, init_lora_weights="pissa"))
    _assert_same_state(model, before)


# ---- adapters that overlap ------------------------------------------------------------------------------------
def test_a_module_saved_in_full_cannot_be_a_lora_target_of_another_adapter():
    lora = wrap(build_model("bert"), LoraConfig(target_modules=["query"], modules_to_save=["classifier"]), adapter_name="a")
    before = _state(lora)
    with pytest.raises(ConfigError, match=r"'classifier' is in another adapter's modules_to_save"):
        lora.add_adapter("b", LoraConfig(target_modules=["value", "classifier"], r=2))
    _assert_same_state(lora, before)


def test_all_linear_skips_a_head_saved_in_full_by_another_adapter():
    lora = wrap(build_model("llama"), LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]), adapter_name="a")
    lora.add_adapter("b", LoraConfig(target_modules="all-linear", r=2))
    assert isinstance(lora.model.lm_head, FullCopy) and list(lora.model.lm_head.copies) == ["a"]
    assert "lm_head" not in _adapted(lora) and len(_adapted(lora)) == 14


def test_a_lora_layer_cannot_be_saved_in_full_by_another_adapter():
    lora = wrap(build_model("bert"), LoraConfig(target_modules=["query"]), adapter_name="a")
    before = _state(lora)
    with pytest.raises(ConfigError, match=r"modules_to_save '.*query' holds LoRA layers"):
        lora.add_adapter("b", LoraConfig(target_modules=["value"], modules_to_save=["query"]))
    _assert_same_state(lora, before)


PEFT_REFUSED = {
    "regex_with_layers_to_transform": dict(target_modules=r".*\.(q_proj|v_proj)", layers_to_transform=[0]),
    "regex_with_layers_pattern": dict(target_modules=r".*\.q_proj", layers_pattern="layers", layers_to_transform=[0]),
    "layers_pattern_alone": dict(target_modules=["q_proj"], layers_pattern="layers"),
}


@pytest.mark.parametrize("case", PEFT_REFUSED)
def test_combinations_peft_refuses_are_refused_up_front(case):
    """Configs PEFT cannot load are refused when made, not after training when the file goes to PEFT."""
    with pytest.raises(ConfigError, match="layers_"):
        LoraConfig(**PEFT_REFUSED[case])


def test_all_linear_with_layers_to_transform_is_allowed():
    lora = wrap(build_model("llama"), LoraConfig(target_modules="all-linear", layers_to_transform=[1]))
    names = [n for n, _ in lora.lora_layers()]
    assert names and all(".layers.1." in n for n in names)
