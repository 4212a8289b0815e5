"""Interop with PEFT, PEFT as the oracle: adapter files move both ways and compute the same function.

Every test builds a tiny seeded model twice (identical weights), puts an adapter on one copy with one
library, saves it, loads it onto the other copy with the other library, and compares fp32 logits
(max abs diff <= 1e-5). Adapters are randomised (B != 0, DoRA magnitudes off their initial norms),
so a wrong scaling, orientation or key name shows up as a logit difference.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import lorakit
from tiny_models import build_model, randomize_lora

peft = pytest.importorskip("peft")

ATOL = 1e-5

# PEFT's own notices about the inputs we give it on purpose (GPT-2 Conv1D targets, disabling a bias="all" adapter).
pytestmark = [
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
    pytest.mark.filterwarnings("ignore:Careful, disabling adapter layers with bias:UserWarning"),
]

# ---- named parameter tables -------------------------------------------------------------------------
# Per family: the targets adapted, covering nn.Linear, GPT-2's Conv1D and nn.Embedding.
FAMILY_TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"],  # Linear + Embedding
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],  # Linear with biases (q/k/v)
    "gpt2": ["c_attn", "c_proj", "wte"],  # Conv1D (attn and mlp c_proj) + Embedding
}
# The LoRA variants: the scaling rule (alpha / r vs alpha / sqrt(r)) and DoRA on/off.
VARIANTS = {
    "lora": dict(use_rslora=False, use_dora=False),
    "rslora": dict(use_rslora=True, use_dora=False),
    "dora": dict(use_rslora=False, use_dora=True),
    "rslora+dora": dict(use_rslora=True, use_dora=True),
}
BASE_OPTIONS = dict(r=4, lora_alpha=16)  # scaling 4 (lora) or 8 (rslora): a wrong rule changes the logits

FAMILY_VARIANT = [pytest.param(f, v, id=f"{f}-{v}") for f in FAMILY_TARGETS for v in VARIANTS]


def options(family: str, variant: str, **extra) -> dict:
    """Keyword arguments valid for both lorakit.LoraConfig and peft.LoraConfig (same field names)."""
    return dict(BASE_OPTIONS, target_modules=list(FAMILY_TARGETS[family]), **VARIANTS[variant], **extra)


# ---- helpers ------------------------------------------------------------------------------------------
@torch.no_grad()
def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits.detach().clone()


def assert_same(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    assert actual.dtype == torch.float32 and expected.dtype == torch.float32
    assert actual.shape == expected.shape
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


def assert_adapter_matters(with_adapter: torch.Tensor, family: str, seed: int, input_ids: torch.Tensor) -> None:
    """Guards against a vacuous comparison: the adapter must change the base model's output."""
    base = logits(build_model(family, seed), input_ids)
    assert (with_adapter - base).abs().max().item() > 1e-3


def peft_lora(base, adapter_name: str = "default", **kwargs):
    """PEFT model with a non-trivial adapter: random A and B, and random DoRA magnitudes."""
    model = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **kwargs), adapter_name=adapter_name)
    randomize_lora(model, seed=7)
    return model.eval()


def quiet_peft_save(model, directory, **kwargs) -> None:
    with warnings.catch_warnings():
        # "Setting save_embedding_layers to True as embedding layers found in target_modules" is expected.
        warnings.simplefilter("ignore")
        model.save_pretrained(str(directory), **kwargs)


def perturb_biases(model, select, seed: int = 3) -> int:
    """Add noise to the biases `select(param_name)` picks (a trained bias="all"/"lora_only" adapter)."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and ".lora_" not in name and select(name):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
                count += 1
    return count


def peft_lora_layers(peft_model) -> dict:
    """The layers PEFT put a LoRA adapter on, by name relative to the transformers model (as lorakit names them)."""
    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def peft_layers(peft_model) -> set[str]:
    return set(peft_lora_layers(peft_model))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ---- 1. single adapter, both directions, every family x variant --------------------------------------------
@pytest.mark.parametrize("family,variant", FAMILY_VARIANT)
def test_lorakit_adapter_loads_in_peft_with_same_logits(family, variant, input_ids, tmp_path):
    """A lorakit adapter (Linear / Conv1D / Embedding targets, +-rsLoRA, +-DoRA) loads in
    peft.PeftModel.from_pretrained and gives the same logits."""
    lm = lorakit.wrap(build_model(family, 0), lorakit.LoraConfig(**options(family, variant)))
    randomize_lora(lm)
    expected = logits(lm, input_ids)
    assert_adapter_matters(expected, family, 0, input_ids)
    lm.save_adapter(tmp_path)

    pm = peft.PeftModel.from_pretrained(build_model(family, 0), str(tmp_path)).eval()
    assert_same(logits(pm, input_ids), expected)


@pytest.mark.parametrize("family,variant", FAMILY_VARIANT)
def test_peft_adapter_loads_in_lorakit_with_same_logits(family, variant, input_ids, tmp_path):
    """A PEFT adapter (Linear / Conv1D / Embedding targets, +-rsLoRA, +-DoRA) loads with lorakit.load_adapter
    and gives the same logits; for embedding targets PEFT also saves the full embedding weight, which must load."""
    pm = peft_lora(build_model(family, 0), **options(family, variant))
    expected = logits(pm, input_ids)
    assert_adapter_matters(expected, family, 0, input_ids)
    quiet_peft_save(pm, tmp_path)

    lm = lorakit.load_adapter(build_model(family, 0), tmp_path)
    assert_same(logits(lm, input_ids), expected)


def test_peft_file_with_full_embedding_weight_loads(input_ids, tmp_path):
    """PEFT saves `<embedding>.base_layer.weight` (the whole embedding matrix) when an embedding is targeted;
    lorakit accepts that key and uses the saved matrix, as PEFT does (here it differs from the fresh base's)."""
    pm = peft_lora(build_model("llama", 0), r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    with torch.no_grad():  # a resized / retrained embedding: the file's copy is what counts
        pm.base_model.model.model.embed_tokens.base_layer.weight.add_(0.05)
    expected = logits(pm, input_ids)
    quiet_peft_save(pm, tmp_path)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in keys

    lm = lorakit.load_adapter(build_model("llama", 0), tmp_path)
    assert_same(logits(lm, input_ids), expected)


def test_peft_pickle_adapter_loads_in_lorakit(input_ids, tmp_path):
    """PEFT's non-safetensors format (adapter_model.bin, safe_serialization=False) loads too, via weights_only."""
    pm = peft_lora(build_model("gpt2", 0), **options("gpt2", "dora"))
    expected = logits(pm, input_ids)
    quiet_peft_save(pm, tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()

    lm = lorakit.load_adapter(build_model("gpt2", 0), tmp_path)
    assert_same(logits(lm, input_ids), expected)


# ---- 2. several adapters in one save -----------------------------------------------------------------
MULTI_FAMILIES = ["llama", "gpt2"]


@pytest.mark.parametrize("family", MULTI_FAMILIES)
def test_lorakit_multi_adapter_save_loads_in_peft_subfolders(family, input_ids, tmp_path):
    """lorakit saves "default" at the root and other adapters in dir/<name>/ (PEFT's layout); PEFT loads
    each (from_pretrained + load_adapter(dir/<name>, adapter_name=<name>)) and matches every adapter's logits."""
    lm = lorakit.wrap(build_model(family, 0), lorakit.LoraConfig(**options(family, "lora", task_type="CAUSAL_LM")))
    lm.add_adapter("other", lorakit.LoraConfig(**options(family, "dora", r=2, task_type="CAUSAL_LM")))
    randomize_lora(lm)
    expected = {}
    for name in ("default", "other"):
        lm.set_adapter(name)
        expected[name] = logits(lm, input_ids)
    assert (expected["default"] - expected["other"]).abs().max() > 1e-3
    lm.save_adapter(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()

    pm = peft.PeftModel.from_pretrained(build_model(family, 0), str(tmp_path))
    assert isinstance(pm, peft.PeftModelForCausalLM)
    pm.load_adapter(str(tmp_path / "other"), adapter_name="other")
    pm.eval()
    for name in ("default", "other"):
        pm.set_adapter(name)
        assert_same(logits(pm, input_ids), expected[name])


@pytest.mark.parametrize("family", MULTI_FAMILIES)
def test_peft_multi_adapter_save_loads_in_lorakit(family, input_ids, tmp_path):
    """PEFT's save_pretrained of two adapters (root + dir/<name>/) loads into lorakit as two adapters,
    each giving PEFT's logits."""
    pm = peft_lora(build_model(family, 0), **options(family, "rslora"))
    pm.add_adapter("other", peft.LoraConfig(init_lora_weights=False, **options(family, "dora", r=2)))
    randomize_lora(pm, seed=11)
    pm.eval()
    expected = {}
    for name in ("default", "other"):
        pm.set_adapter(name)
        expected[name] = logits(pm, input_ids)
    quiet_peft_save(pm, tmp_path)
    assert (tmp_path / "other" / "adapter_config.json").is_file()

    lm = lorakit.load_adapter(build_model(family, 0), tmp_path)
    lm.load_adapter(tmp_path / "other", adapter_name="other")
    for name in ("default", "other"):
        lm.set_adapter(name)
        assert_same(logits(lm, input_ids), expected[name])


# ---- 3. trained biases ----------------------------------------------------------------------------------
def _bias_selector(bias: str):
    if bias == "all":
        return lambda name: True
    # lora_only: the biases of adapted layers; both libraries name them <module>.base_layer.bias
    return lambda name: name.endswith(".base_layer.bias")


BIASES = ["all", "lora_only"]


@pytest.mark.parametrize("bias", BIASES)
def test_lorakit_bias_adapter_loads_in_peft(bias, input_ids, tmp_path):
    """bias="all" / "lora_only" on GPT-2 (which has biases): the trained biases lorakit saves are the ones
    PEFT reads, so PEFT reproduces the logits."""
    lm = lorakit.wrap(build_model("gpt2", 0), lorakit.LoraConfig(**options("gpt2", "lora", bias=bias)))
    randomize_lora(lm)
    assert perturb_biases(lm.model, _bias_selector(bias)) > 0
    expected = logits(lm, input_ids)
    lm.save_adapter(tmp_path)

    pm = peft.PeftModel.from_pretrained(build_model("gpt2", 0), str(tmp_path)).eval()
    assert_same(logits(pm, input_ids), expected)


@pytest.mark.parametrize("bias", BIASES)
def test_peft_bias_adapter_loads_in_lorakit(bias, input_ids, tmp_path):
    """bias="all" / "lora_only" adapters saved by PEFT (GPT-2) load in lorakit with the trained biases."""
    pm = peft_lora(build_model("gpt2", 0), **options("gpt2", "lora", bias=bias))
    assert perturb_biases(pm, _bias_selector(bias)) > 0
    expected = logits(pm, input_ids)
    quiet_peft_save(pm, tmp_path)

    lm = lorakit.load_adapter(build_model("gpt2", 0), tmp_path)
    assert_same(logits(lm, input_ids), expected)


# ---- 4. modules_to_save (a classification head trained in full) -----------------------------------------
BERT_TARGETS = ["query", "value"]


def _perturb_classifier_copy(model, marker: str) -> None:
    """Change the saved copy of the classifier (`marker` is the library's name for the copy's container)."""
    gen = torch.Generator().manual_seed(5)
    hit = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "classifier" in name and marker in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
                hit += 1
    assert hit == 2  # weight and bias


def test_lorakit_modules_to_save_loads_in_peft(input_ids, tmp_path):
    """modules_to_save=["classifier"] (BERT sequence classification): lorakit saves the full classifier copy
    under PEFT's key names, and PEFT's SEQ_CLS model reproduces the logits."""
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=BERT_TARGETS, modules_to_save=["classifier"],
                                task_type="SEQ_CLS")
    lm = lorakit.wrap(build_model("bert", 0), config)
    randomize_lora(lm)
    _perturb_classifier_copy(lm, ".copies.")
    expected = logits(lm, input_ids)
    lm.save_adapter(tmp_path)

    pm = peft.PeftModel.from_pretrained(build_model("bert", 0), str(tmp_path)).eval()
    assert isinstance(pm, peft.PeftModelForSequenceClassification)
    assert_same(logits(pm, input_ids), expected)


def test_lorakit_modules_to_save_without_task_type_loads_in_peft(input_ids, tmp_path):
    """Without task_type, PEFT's generic PeftModel still restores the classifier copy from lorakit's file."""
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=BERT_TARGETS, modules_to_save=["classifier"])
    lm = lorakit.wrap(build_model("bert", 0), config)
    _assert_bert_classifier_adapter_loads_in_peft(lm, input_ids, tmp_path)


def _assert_bert_classifier_adapter_loads_in_peft(lm, input_ids, tmp_path):
    randomize_lora(lm)
    _perturb_classifier_copy(lm, ".copies.")
    expected = logits(lm, input_ids)
    lm.save_adapter(tmp_path)
    pm = peft.PeftModel.from_pretrained(build_model("bert", 0), str(tmp_path)).eval()
    assert_same(logits(pm, input_ids), expected)


def test_seq_cls_task_type_trains_and_saves_the_head_like_peft(input_ids, tmp_path):
    """task_type="SEQ_CLS" alone (no modules_to_save) makes the classifier head a full trainable copy, kept out of
    all-linear, as PEFT does; PEFT then loads the file (it requires the head's weights) with the same logits."""
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS")
    lm = lorakit.wrap(build_model("bert", 0), config)
    assert lm.adapter_configs["default"].modules_to_save == ["classifier"]
    assert "classifier" not in [name for name, _ in lm.lora_layers()]
    _assert_bert_classifier_adapter_loads_in_peft(lm, input_ids, tmp_path)


def test_peft_seq_cls_modules_to_save_loads_in_lorakit(input_ids, tmp_path):
    """PEFT's task_type="SEQ_CLS" adds ["classifier", "score"] to modules_to_save (BERT has no "score");
    lorakit loads that file, restores the classifier copy, and matches PEFT's logits."""
    pm = peft_lora(build_model("bert", 0), r=4, lora_alpha=8, target_modules=BERT_TARGETS, task_type="SEQ_CLS")
    _perturb_classifier_copy(pm, ".modules_to_save.")
    expected = logits(pm, input_ids)
    quiet_peft_save(pm, tmp_path)
    assert "score" in read_json(tmp_path / "adapter_config.json")["modules_to_save"]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = lorakit.load_adapter(build_model("bert", 0), tmp_path)
    assert [str(w.message) for w in caught if "modules_to_save" in str(w.message)] == []
    assert_same(logits(lm, input_ids), expected)


def test_peft_seq_cls_with_bias_all_loads_in_lorakit(input_ids, tmp_path):
    """With bias="all" PEFT's file also holds the biases inside its modules_to_save wrapper
    (`classifier.modules_to_save.bias`, `classifier.original_module.bias`); lorakit accepts them and matches PEFT
    with the adapter on and with adapters disabled (where the original classifier, with the saved bias, is used)."""
    pm = peft_lora(build_model("bert", 0), r=4, lora_alpha=8, target_modules=BERT_TARGETS, task_type="SEQ_CLS",
                   bias="all")
    _perturb_classifier_copy(pm, ".modules_to_save.")
    assert perturb_biases(pm, lambda name: True) > 0
    expected = logits(pm, input_ids)
    with pm.disable_adapter():
        expected_disabled = logits(pm, input_ids)
    quiet_peft_save(pm, tmp_path)
    from safetensors.torch import load_file

    assert "base_model.model.classifier.original_module.bias" in load_file(str(tmp_path / "adapter_model.safetensors"))

    lm = lorakit.load_adapter(build_model("bert", 0), tmp_path)
    assert_same(logits(lm, input_ids), expected)
    with lm.disable_adapters():
        assert_same(logits(lm, input_ids), expected_disabled)


def test_peft_file_naming_an_absent_module_to_save_loads_with_warning(input_ids, tmp_path):
    """PEFT ignores modules_to_save names that match no module; lorakit loads such a file too (warning about it)
    and gives PEFT's logits, instead of rejecting the file."""
    pm = peft_lora(build_model("llama", 0), r=4, lora_alpha=8, target_modules=["q_proj"],
                   modules_to_save=["no_such_head"])
    expected = logits(pm, input_ids)
    quiet_peft_save(pm, tmp_path)
    with pytest.warns(UserWarning, match="no_such_head"):
        lm = lorakit.load_adapter(build_model("llama", 0), tmp_path)
    assert_same(logits(lm, input_ids), expected)


# ---- 5. per-module ranks and alphas ----------------------------------------------------------------------
PATTERN_CASES = {
    # family: (rank_pattern, alpha_pattern) -- keys are PEFT's regexes matched against the module name's end
    "llama": ({"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, {"q_proj": 3.0, "embed_tokens": 5}),
    "gpt2": ({"c_attn": 2, r"h\.0\.mlp\.c_proj": 6}, {"c_proj": 2.5, "wte": 3}),
}


@pytest.mark.parametrize("family", list(PATTERN_CASES))
@pytest.mark.parametrize("variant", ["lora", "rslora"])
def test_rank_and_alpha_patterns_round_trip_both_ways(family, variant, input_ids, tmp_path):
    """rank_pattern / alpha_pattern give the same per-layer ranks and scalings in both libraries, in both directions."""
    rank_pattern, alpha_pattern = PATTERN_CASES[family]
    opts = options(family, variant, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)

    lm = lorakit.wrap(build_model(family, 0), lorakit.LoraConfig(**opts))
    randomize_lora(lm)
    expected = logits(lm, input_ids)
    lm.save_adapter(tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(build_model(family, 0), str(tmp_path / "ours")).eval()
    assert_same(logits(pm, input_ids), expected)
    theirs = peft_lora_layers(pm)
    ranks_ours = {n: layer.lora_A["default"].shape[0] for n, layer in lm.lora_layers()}
    assert ranks_ours == {n: m.r["default"] for n, m in theirs.items()}
    assert len(set(ranks_ours.values())) > 1
    scalings_ours = {n: layer.scaling["default"] for n, layer in lm.lora_layers()}
    assert scalings_ours == pytest.approx({n: m.scaling["default"] for n, m in theirs.items()})
    assert len(set(scalings_ours.values())) > 1

    pm2 = peft_lora(build_model(family, 0), **opts)
    expected2 = logits(pm2, input_ids)
    quiet_peft_save(pm2, tmp_path / "theirs")
    lm2 = lorakit.load_adapter(build_model(family, 0), tmp_path / "theirs")
    assert_same(logits(lm2, input_ids), expected2)


# ---- 6. the config file -----------------------------------------------------------------------------------
TARGET_SPECS = {
    # name: (family, target-selection options)
    "list": ("llama", dict(target_modules=["q_proj", "v_proj", "embed_tokens"])),
    "default": ("llama", dict(target_modules=None)),
    "all-linear-llama": ("llama", dict(target_modules="all-linear")),
    "all-linear-gpt2": ("gpt2", dict(target_modules="all-linear")),
    "regex": ("llama", dict(target_modules=r".*\.layers\.0\.mlp\.(gate|up)_proj")),
    "gpt2-list": ("gpt2", dict(target_modules=["c_attn", "wte"])),
    "layers-to-transform": ("llama", dict(target_modules=["q_proj", "o_proj"], layers_to_transform=[1],
                                          layers_pattern="layers")),
    "exclude": ("gpt2", dict(target_modules="all-linear", exclude_modules=["c_fc"])),
}


@pytest.mark.parametrize("spec_name", list(TARGET_SPECS))
def test_config_readable_by_peft_without_warnings_and_same_targets(spec_name, tmp_path):
    """The adapter_config.json lorakit writes loads with peft.LoraConfig.from_pretrained without any warning
    (no unknown keys), keeps our option values, names the same target modules PEFT's own file would, and each
    library's file adapts the same layers in the other library."""
    family, selection = TARGET_SPECS[spec_name]
    opts = dict(r=4, lora_alpha=8, lora_dropout=0.1, use_rslora=True, use_dora=True, bias="lora_only", **selection)
    lm = lorakit.wrap(build_model(family, 0), lorakit.LoraConfig(**opts))
    lm.save_adapter(tmp_path / "ours")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs_read = peft.LoraConfig.from_pretrained(str(tmp_path / "ours"))
    assert [str(w.message) for w in caught] == []
    assert isinstance(theirs_read, peft.LoraConfig)
    for key in ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias"):
        assert getattr(theirs_read, key) == opts[key], key

    pm = peft.get_peft_model(build_model(family, 0), peft.LoraConfig(**opts))
    quiet_peft_save(pm, tmp_path / "peft")
    ours = read_json(tmp_path / "ours" / "adapter_config.json")["target_modules"]
    peft_written = read_json(tmp_path / "peft" / "adapter_config.json")["target_modules"]
    if isinstance(peft_written, str):
        assert ours == peft_written
    else:
        # PEFT writes "all-linear" resolved before exclude_modules applies (the exclusion happens again on load);
        # lorakit writes only the layers it adapted, so old readers without exclude_modules pick the same set.
        excluded = opts.get("exclude_modules") or []
        assert sorted(ours) == sorted(n for n in peft_written if not any(n == e or n.endswith("." + e) for e in excluded))
    # and the same layers end up adapted, whichever library reads whichever file
    ours_layers = {n for n, _ in lm.lora_layers()}
    assert ours_layers == peft_layers(pm)
    assert peft_layers(peft.PeftModel.from_pretrained(build_model(family, 0), str(tmp_path / "ours"))) == ours_layers
    assert {n for n, _ in lorakit.load_adapter(build_model(family, 0), tmp_path / "peft").lora_layers()} == ours_layers


def test_config_keys_are_all_known_to_peft(tmp_path):
    """Every key in our adapter_config.json is a field of peft.LoraConfig (so no reader drops or rejects one)."""
    import dataclasses

    lm = lorakit.wrap(build_model("gpt2", 0), lorakit.LoraConfig(target_modules=["c_attn"]))
    lm.save_adapter(tmp_path)
    peft_fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    written = read_json(tmp_path / "adapter_config.json")
    assert set(written) - peft_fields == set()
    assert written["peft_type"] == "LORA"
    assert written["fan_in_fan_out"] is True  # Conv1D


# ---- 7. merged weights ------------------------------------------------------------------------------------
MERGE_CASES = {
    # name: (family, lorakit.LoraConfig options)
    "llama-lora": ("llama", options("llama", "lora")),
    "llama-dora": ("llama", options("llama", "dora")),  # DoRA on Linear and on the embedding
    "qwen2-rslora+dora": ("qwen2", options("qwen2", "rslora+dora")),  # DoRA on layers with a bias
    "gpt2-lora": ("gpt2", options("gpt2", "lora")),
    "gpt2-dora": ("gpt2", options("gpt2", "dora")),  # DoRA on Conv1D (fan_in_fan_out)
    "bert-modules_to_save": ("bert", dict(r=4, lora_alpha=8, target_modules=BERT_TARGETS, use_dora=True,
                                          modules_to_save=["classifier"])),
}


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_and_unload_matches_peft(case, input_ids, tmp_path):
    """For the same adapter, lorakit's merge_and_unload() gives the same plain model as PEFT's merge_and_unload():
    the same module types, equal state dicts (same keys, weights within 1e-5) and equal logits, DoRA included."""
    family, opts = MERGE_CASES[case]
    lm = lorakit.wrap(build_model(family, 0), lorakit.LoraConfig(**opts))
    randomize_lora(lm)
    if opts.get("modules_to_save"):
        _perturb_classifier_copy(lm, ".copies.")
    unmerged = logits(lm, input_ids)
    lm.save_adapter(tmp_path)
    pm = peft.PeftModel.from_pretrained(build_model(family, 0), str(tmp_path)).eval()
    assert_same(logits(pm, input_ids), unmerged)

    ours = lm.merge_and_unload()
    theirs = pm.merge_and_unload()
    assert [(n, type(m)) for n, m in ours.named_modules()] == [(n, type(m)) for n, m in theirs.named_modules()]
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert set(ours_sd) == set(theirs_sd)
    for key in ours_sd:
        assert_same(ours_sd[key].float(), theirs_sd[key].float())
    assert_same(logits(ours, input_ids), logits(theirs, input_ids))
    assert_same(logits(ours, input_ids), unmerged)


def test_a_distilbert_style_head_trains_its_random_pre_classifier_as_peft_does(tmp_path):
    """DistilBERT's classification head has a randomly initialised pre_classifier before the classifier: with
    task_type SEQ_CLS lorakit trains and saves both in full, the names PEFT adds (CLASSIFIER_MODULE_NAMES), and
    PEFT's own file of such a model loads in lorakit without a word."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    def distilbert():
        torch.manual_seed(0)
        return DistilBertForSequenceClassification(DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2,
                                                                    hidden_dim=64, max_position_embeddings=32))
    lm = lorakit.wrap(distilbert(), lorakit.LoraConfig(r=4, target_modules=["q_lin", "v_lin"], task_type="SEQ_CLS"))
    assert set(lm.adapter_configs["default"].modules_to_save) == {"pre_classifier", "classifier"}
    pm = peft_lora(distilbert(), r=4, target_modules=["q_lin", "v_lin"], task_type="SEQ_CLS")
    quiet_peft_save(pm, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = lorakit.load_adapter(distilbert(), tmp_path)
    assert "pre_classifier" in loaded.adapter_configs["default"].modules_to_save
