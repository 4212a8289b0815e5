"""Adapter files: exact save/load round trips, and loading as a trust boundary (bad files change nothing)."""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from tiny_models import build_model, randomize_lora
from lorakit import AdapterError, LoraConfig, wrap
from lorakit.lora import io as lora_io
from lorakit.lora.full_copy import FullCopy
from lorakit.lora.layer import LoraLayer

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _saved(tmp_path: Path, family: str = "llama", **config) -> tuple[Path, "lorakit.LoraModel"]:
    """A trained-looking adapter saved under tmp_path/adapter."""
    config = config or dict(target_modules=["q_proj", "v_proj"])
    lora = wrap(build_model(family), LoraConfig(**config))
    randomize_lora(lora)
    path = tmp_path / "adapter"
    lora.save_adapter(path)
    return path, lora


def _adapter_state(lora, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lora_io.adapter_tensors(lora, name).items()}


def _no_lorakit_modules(model) -> bool:
    return not any(isinstance(m, (LoraLayer, FullCopy)) for m in model.modules())


def _plain_state(model):
    return ({n: id(m) for n, m in model.named_modules()},
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})


def _assert_plain_unchanged(model, before):
    modules, params = _plain_state(model)
    assert modules == before[0]
    for n, (value, requires_grad) in params.items():
        assert torch.equal(value, before[1][n][0]) and requires_grad == before[1][n][1], n


# ---- round trips ---------------------------------------------------------------------------------------------
ROUND_TRIPS = {
    # name: (family, config of "default", config of "second")
    "llama": ("llama", dict(target_modules=["q_proj", "v_proj"]),
              dict(target_modules=["embed_tokens", "o_proj"], use_dora=True, r=4, lora_alpha=16)),
    "gpt2_bias": ("gpt2", dict(target_modules=["c_attn"], bias="lora_only"),
                  dict(target_modules=["wte", "c_fc"], use_rslora=True, rank_pattern={"c_fc": 2})),
    "bert_modules_to_save": ("bert", dict(target_modules=["query", "value"], modules_to_save=["classifier"]),
                             dict(target_modules=["key", "dense"], exclude_modules=["output.dense"], use_dora=True)),
}


@pytest.mark.parametrize("case", ROUND_TRIPS)
def test_save_load_round_trip_is_exact_including_a_named_adapter_in_a_subfolder(case, tmp_path, input_ids):
    family, first, second = ROUND_TRIPS[case]
    lora = wrap(build_model(family), LoraConfig(**first))
    lora.add_adapter("second", LoraConfig(**second))
    randomize_lora(lora)
    with torch.no_grad():  # make modules_to_save copies and trainable biases differ from the base model
        for n, p in lora.named_parameters():
            if ".copies." in n or (p.requires_grad and n.endswith("bias")):
                p.add_(0.1)
    expected = {}
    for name in ("default", "second"):
        lora.set_adapter(name)
        expected[name] = _logits(lora, input_ids)
    states = {name: _adapter_state(lora, name) for name in ("default", "second")}
    lora.save_adapter(tmp_path)
    assert (tmp_path / WEIGHTS).is_file() and (tmp_path / CONFIG).is_file()
    assert (tmp_path / "second" / WEIGHTS).is_file() and (tmp_path / "second" / CONFIG).is_file()

    fresh = build_model(family)
    assert not torch.allclose(_logits(fresh, input_ids), expected["default"], atol=1e-3)
    loaded = lorakit.load_adapter(fresh, tmp_path)
    loaded.load_adapter(tmp_path / "second", "second")
    for name in ("default", "second"):
        got = _adapter_state(loaded, name)
        assert got.keys() == states[name].keys()
        for key, value in states[name].items():
            assert torch.equal(got[key], value), key
        loaded.set_adapter(name)
        torch.testing.assert_close(_logits(loaded, input_ids), expected[name], rtol=0, atol=0)


def test_loaded_adapter_is_frozen_unless_is_trainable(tmp_path):
    path, _ = _saved(tmp_path)
    frozen = lorakit.load_adapter(build_model("llama"), path)
    assert frozen.trainable_parameters().trainable == 0
    trainable = lorakit.load_adapter(build_model("llama"), path, is_trainable=True)
    assert trainable.trainable_parameters().trainable > 0


def test_weighted_adapter_with_per_layer_ranks_round_trips(tmp_path, input_ids):
    lora = wrap(build_model("llama"), LoraConfig(target_modules=["q_proj", "v_proj"], r=4), adapter_name="a")
    lora.add_adapter("b", LoraConfig(target_modules=["o_proj"], r=2))
    randomize_lora(lora)
    lora.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mix", combination_type="cat")  # ranks 4 and 2 per layer
    lora.set_adapter("mix")
    expected = _logits(lora, input_ids)
    lora.save_adapter(tmp_path, ["mix"])
    loaded = lorakit.load_adapter(build_model("llama"), tmp_path / "mix", "mix")
    torch.testing.assert_close(_logits(loaded, input_ids), expected, rtol=0, atol=0)


def test_saved_file_uses_peft_key_names(tmp_path):
    path, _ = _saved(tmp_path, target_modules=["q_proj", "embed_tokens"], use_dora=True)
    keys = set(load_file(str(path / WEIGHTS)))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    config = json.loads((path / CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True


# ---- pickles -------------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates a marker file: what a malicious adapter_model.bin would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _replace_with_pickle(path: Path, tensors: dict) -> None:
    (path / WEIGHTS).unlink()
    torch.save(tensors, path / "adapter_model.bin")


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    path, _ = _saved(tmp_path)
    # The payload really works when unpickled without weights_only (so the test can fail).
    probe = tmp_path / "probe-marker"
    pickle.loads(pickle.dumps(_Payload(probe))).close()  # the payload's result is the file it opened
    assert probe.exists()

    marker = tmp_path / "pwned"
    tensors = {**load_file(str(path / WEIGHTS)), "evil": _Payload(marker)}
    _replace_with_pickle(path, tensors)
    model = build_model("llama")
    before = _plain_state(model)
    with pytest.raises(AdapterError, match="refused"):
        lorakit.load_adapter(model, path)
    assert not marker.exists()
    _assert_plain_unchanged(model, before)
    assert _no_lorakit_modules(model)


def test_plain_tensor_pickle_loads_with_weights_only(tmp_path, input_ids):
    path, lora = _saved(tmp_path)
    expected = _logits(lora, input_ids)
    _replace_with_pickle(path, load_file(str(path / WEIGHTS)))
    loaded = lorakit.load_adapter(build_model("llama"), path)
    torch.testing.assert_close(_logits(loaded, input_ids), expected, rtol=0, atol=0)


def test_pickle_is_refused_unread_on_torch_before_2_10(tmp_path, monkeypatch):
    """torch < 2.10's weights_only unpickler is not safe (CVE-2026-24747): the .bin is never opened there."""
    path, _ = _saved(tmp_path)
    _replace_with_pickle(path, load_file(str(path / WEIGHTS)))

    def never(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "__version__", "2.9.1+cpu")
    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(AdapterError, match=r"adapter_model.bin: refused; .* needs torch>=2.10 .this is torch 2.9.1"):
        lorakit.load_adapter(build_model("llama"), path)


# ---- bad tensors ---------------------------------------------------------------------------------------------
KEY = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(str(path / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(path / WEIGHTS))


def _nan(t):
    t[KEY][0, 0] = float("nan")


def _wrong_shape(t):
    t[KEY] = torch.zeros(16, 4)


def _missing(t):
    del t[KEY]


def _unexpected(t):
    t["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"] = torch.zeros(8, 32)


def _integer(t):
    t[KEY] = t[KEY].to(torch.int32)


def _float8(t):
    t[KEY] = t[KEY].to(torch.float8_e4m3fn)  # a float dtype torch.isfinite cannot handle


BAD_TENSORS = {
    "nan": (_nan, rf"{KEY}.*NaN"),
    "wrong_shape": (_wrong_shape, rf"{KEY}.*shape \(16, 4\).*expects \(16, 8\)"),
    "missing_key": (_missing, rf"missing tensor '{KEY}'"),
    "unexpected_key": (_unexpected, r"'base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight' does not belong"),
    "integer_dtype": (_integer, rf"{KEY}.*int32.*must be dense float16, bfloat16, float32 or float64"),
    "float8_dtype": (_float8, rf"{KEY}.*float8_e4m3fn.*must be dense float16"),
}


@pytest.mark.parametrize("case", BAD_TENSORS)
def test_bad_tensor_is_refused_and_a_plain_model_is_left_unchanged(case, tmp_path):
    edit, message = BAD_TENSORS[case]
    path, _ = _saved(tmp_path)
    _edit_tensors(path, edit)
    model = build_model("llama")
    before = _plain_state(model)
    with pytest.raises(AdapterError, match=message):
        lorakit.load_adapter(model, path)
    _assert_plain_unchanged(model, before)
    assert _no_lorakit_modules(model)


@pytest.mark.parametrize("case", BAD_TENSORS)
def test_bad_tensor_is_refused_and_a_lora_model_gets_no_adapter(case, tmp_path, input_ids):
    edit, message = BAD_TENSORS[case]
    path, _ = _saved(tmp_path)
    _edit_tensors(path, edit)
    lora = wrap(build_model("llama"), LoraConfig(target_modules=["q_proj"]))
    randomize_lora(lora)
    expected = _logits(lora, input_ids)
    with pytest.raises(AdapterError, match=message):
        lora.load_adapter(path, "other")
    assert list(lora.adapter_configs) == ["default"]
    assert not any("other" in layer.lora_A for _, layer in lora.lora_layers())
    assert not any(".other" in n for n, _ in lora.named_parameters())
    torch.testing.assert_close(_logits(lora, input_ids), expected, rtol=0, atol=0)


def test_corrupt_safetensors_is_refused(tmp_path):
    path, _ = _saved(tmp_path)
    (path / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(AdapterError, match="not a valid safetensors file"):
        lorakit.load_adapter(build_model("llama"), path)


def test_oversize_safetensors_is_refused_before_reading(tmp_path, monkeypatch):
    path, _ = _saved(tmp_path)
    os.truncate(path / WEIGHTS, 20 * 2**30)  # sparse: 20 GiB on paper, nothing on disk

    def never(*args, **kwargs):
        raise AssertionError("the oversize file was read")

    monkeypatch.setattr(lora_io, "load_file", never)
    model = build_model("llama")
    with pytest.raises(AdapterError, match="refusing to read it"):
        lorakit.load_adapter(model, path)
    assert _no_lorakit_modules(model)


def test_missing_weights_file_is_refused(tmp_path):
    path, _ = _saved(tmp_path)
    (path / WEIGHTS).unlink()
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        lorakit.load_adapter(build_model("llama"), path)


# ---- bad configs ---------------------------------------------------------------------------------------------
def test_invalid_json_config_names_the_file(tmp_path):
    path, _ = _saved(tmp_path)
    (path / CONFIG).write_text("{ this is not json")
    with pytest.raises(AdapterError, match=rf"{path / CONFIG}: not valid JSON"):
        lorakit.load_adapter(build_model("llama"), path)


def _set_config(path: Path, **changes) -> None:
    data = json.loads((path / CONFIG).read_text())
    data.update(changes)
    (path / CONFIG).write_text(json.dumps(data))


BAD_CONFIGS = {
    "other_peft_type": (dict(peft_type="PREFIX_TUNING"), r"PREFIX_TUNING adapter; lorakit loads LoRA adapters only"),
    "unsupported_option": (dict(use_qalora=True), r"does not support: use_qalora=True"),
    "invalid_value": (dict(r=0), r"r must be a positive integer"),
    "target_not_in_model": (dict(target_modules=["query"]), r"matched no module"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_is_refused_and_a_plain_model_is_left_unchanged(case, tmp_path):
    changes, message = BAD_CONFIGS[case]
    path, _ = _saved(tmp_path)
    _set_config(path, **changes)
    model = build_model("llama")
    before = _plain_state(model)
    with pytest.raises(lorakit.LorakitError, match=message):
        lorakit.load_adapter(model, path)
    _assert_plain_unchanged(model, before)
    assert _no_lorakit_modules(model)


def test_not_a_directory_is_refused(tmp_path):
    with pytest.raises(AdapterError, match="not a directory"):
        lorakit.load_adapter(build_model("llama"), tmp_path / "nowhere")


def test_base_model_mismatch_warns(tmp_path):
    path, _ = _saved(tmp_path)
    _set_config(path, base_model_name_or_path="org/llama-a")
    model = build_model("llama")
    model.config._name_or_path = "other-org/llama-b"
    with pytest.warns(UserWarning, match=r"trained on base model 'org/llama-a'.*'other-org/llama-b'"):
        lorakit.load_adapter(model, path)
    same = build_model("llama")
    same.config._name_or_path = "/local/copy/of/llama-a"  # same model name, other location: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.load_adapter(same, path)


def test_saving_a_pissa_adapter_warns_that_it_needs_the_residual_base(tmp_path):
    """A PiSSA adapter only reproduces outputs on the residual base, so saving it alone warns."""
    lora = lorakit.wrap(build_model("llama"), lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    with pytest.warns(UserWarning, match="PiSSA"):
        lora.save_adapter(tmp_path)


def test_failed_load_into_a_lora_model_leaves_its_modules_and_weights_as_they_were(tmp_path):
    """The rollback removes the wrappers the failed load created, not only its tensors."""
    path, _ = _saved(tmp_path, "gpt2", target_modules=["c_fc"], modules_to_save=["lm_head"])
    _edit_tensors(path, lambda t: t.__setitem__(
        "base_model.model.transformer.h.0.mlp.c_fc.lora_B.weight",
        torch.full_like(t["base_model.model.transformer.h.0.mlp.c_fc.lora_B.weight"], float("nan"))))
    lora = wrap(build_model("gpt2"), LoraConfig(target_modules=["c_attn"]))
    keys_before = list(lora.state_dict())
    with pytest.raises(AdapterError, match="NaN"):
        lora.load_adapter(path, "x")
    assert list(lora.state_dict()) == keys_before
    assert "x" not in lora.adapter_configs


@pytest.mark.parametrize("saved_with_other_adapter", [True, False])
def test_bias_all_file_loads_whatever_other_adapters_wrap(saved_with_other_adapter, tmp_path):
    """A bias is spelled X.bias or X.base_layer.bias depending on wrapping by *other* adapters; loading accepts
    both, so a bias="all" file moves between a plain model and one where X is wrapped, both ways."""
    def two_adapter_model():
        lora = wrap(build_model("gpt2"), LoraConfig(target_modules=["c_fc"]), adapter_name="a")
        lora.add_adapter("d", LoraConfig(target_modules=["c_attn"], bias="all"))
        return lora

    if saved_with_other_adapter:
        source = two_adapter_model()
    else:
        source = wrap(build_model("gpt2"), LoraConfig(target_modules=["c_attn"], bias="all"), adapter_name="d")
    randomize_lora(source)
    with torch.no_grad():
        for n, p in source.model.named_parameters():
            if n.endswith("bias"):
                p.add_(0.3)
    source.save_adapter(tmp_path, ["d"])
    path = tmp_path / "d"
    target = lorakit.load_adapter(build_model("gpt2"), path) if saved_with_other_adapter else two_adapter_model()
    if not saved_with_other_adapter:
        target.delete_adapter("d")
        target.load_adapter(path, "d")
    source_biases = {n.replace(".base_layer", ""): p for n, p in source.model.named_parameters() if n.endswith("bias")}
    for n, p in target.model.named_parameters():
        if n.endswith("bias") and ".original_module." not in n:
            torch.testing.assert_close(p, source_biases[n.replace(".base_layer", "")], rtol=0, atol=0, msg=n)


def test_oversize_pickle_file_is_refused_before_reading(tmp_path):
    """The size check covers adapter_model.bin too (the pickle is never opened)."""
    path, _ = _saved(tmp_path)
    (path / WEIGHTS).unlink()
    with open(path / "adapter_model.bin", "wb") as f:
        f.truncate(50 << 20)
    with pytest.raises(AdapterError, match="refusing to read"):
        lorakit.load_adapter(build_model("llama"), path)


def test_unknown_config_key_set_to_zero_is_refused(tmp_path):
    """0 is a setting, not "feature off": an unknown option with value 0 is not silently dropped."""
    path, _ = _saved(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["some_future_option"] = 0
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="some_future_option=0"):
        lorakit.load_adapter(build_model("llama"), path)


def test_saving_onto_a_file_path_gives_a_clear_error(tmp_path):
    lora = wrap(build_model("llama"), LoraConfig(target_modules=["q_proj"]), adapter_name="other")
    (tmp_path / "other").write_text("in the way")
    with pytest.raises(AdapterError, match="not a directory"):
        lora.save_adapter(tmp_path)


def test_bias_keys_in_the_other_spelling_load(tmp_path):
    """A file that spells a bias X.bias where we write X.base_layer.bias (or the reverse), as a PEFT model
    wrapped by other adapters would, loads into the same parameters."""
    path, source = _saved(tmp_path, "gpt2", target_modules=["c_attn"], bias="all")
    with torch.no_grad():
        for n, p in source.model.named_parameters():
            if n.endswith("bias"):
                p.add_(0.3)
    source.save_adapter(path)

    def swap(t):
        for key in [k for k in t if k.endswith(".bias")]:
            alt = key.replace(".base_layer.bias", ".bias") if ".base_layer." in key else key[: -len(".bias")] + ".base_layer.bias"
            t[alt] = t.pop(key)

    _edit_tensors(path, swap)
    loaded = lorakit.load_adapter(build_model("gpt2"), path)
    expected = {n: p for n, p in source.model.named_parameters() if n.endswith("bias")}
    for n, p in loaded.model.named_parameters():
        if n.endswith("bias"):
            torch.testing.assert_close(p, expected[n], rtol=0, atol=0, msg=n)


# ---- numbers in adapter_config.json ----------------------------------------------------------------------------
def _set_raw(path: Path, where: tuple, token: str) -> None:
    """Put the raw JSON text `token` (NaN, 1e999, "16", ...) at key path `where` of adapter_config.json."""
    data = json.loads((path / CONFIG).read_text())
    node = data
    for key in where[:-1]:
        node = node.setdefault(key, {})
    node[where[-1]] = "__TOKEN__"
    (path / CONFIG).write_text(json.dumps(data).replace('"__TOKEN__"', token))


ALPHA = r"lora_alpha must be a positive number, finite and at most 1,000,000"
BAD_NUMBERS = {
    # name: (key path, raw JSON token, message regex after the file name)
    "alpha_nan": (("lora_alpha",), "NaN", rf"lora_alpha is NaN \({ALPHA}\).*JSON numbers must be finite"),
    "alpha_infinity": (("lora_alpha",), "Infinity", rf"lora_alpha is Infinity \({ALPHA}\)"),
    "alpha_minus_infinity": (("lora_alpha",), "-Infinity", rf"lora_alpha is -Infinity \({ALPHA}\)"),
    "alpha_overflowing": (("lora_alpha",), "1e999", rf"lora_alpha is 1e999 \({ALPHA}\)"),  # json reads it as inf
    "alpha_huge": (("lora_alpha",), "1e300", rf"{ALPHA}, got 1e\+300"),
    "alpha_string": (("lora_alpha",), '"16"', rf"{ALPHA}, got '16'"),
    "alpha_bool": (("lora_alpha",), "true", rf"{ALPHA}, got True"),
    "r_huge": (("r",), "1" + "0" * 30, r"r must be a positive integer, at most 65536"),
    "dropout_nan": (("lora_dropout",), "NaN", r"lora_dropout is NaN \(lora_dropout must be a number in \[0, 1\)\)"),
    "rank_pattern_nan": (("rank_pattern", "q_proj"), "NaN", r"rank_pattern\['q_proj'\] is NaN \(rank_pattern must be"),
    "alpha_pattern_inf": (("alpha_pattern", "v_proj"), "Infinity", r"alpha_pattern\['v_proj'\] is Infinity"),
    # init_lora_weights does not matter for a file (any value loads as true): NaN there must still be refused
    "init_nan": (("init_lora_weights",), "NaN", r"init_lora_weights is NaN"),
    "informational_nan": (("peft_version",), "NaN", r"peft_version is NaN"),
}


@pytest.mark.parametrize("case", BAD_NUMBERS)
def test_a_config_number_that_is_not_finite_or_in_range_is_refused_naming_file_and_field(case, tmp_path, input_ids):
    """Such files used to load (NaN alpha: NaN logits, empty completions); the loader, the server's hot-load
    (LoraModel.load_adapter) and lorakit check share read_adapter_config, so all refuse them."""
    where, token, message = BAD_NUMBERS[case]
    path, _ = _saved(tmp_path)
    _set_raw(path, where, token)
    model = build_model("llama")
    before = _plain_state(model)
    with pytest.raises(AdapterError, match=rf"{re.escape(str(path / CONFIG))}: .*{message}"):
        lorakit.load_adapter(model, path)
    _assert_plain_unchanged(model, before)
    assert _no_lorakit_modules(model)
    lora = wrap(build_model("llama"), LoraConfig(target_modules=["q_proj"]))
    expected = _logits(lora, input_ids)
    with pytest.raises(AdapterError, match=message):
        lora.load_adapter(path, "hot")
    assert list(lora.adapter_configs) == ["default"]
    torch.testing.assert_close(_logits(lora, input_ids), expected, rtol=0, atol=0)


# ---- the safetensors header ------------------------------------------------------------------------------------
def _write_safetensors(path: Path, header_text: str, data: bytes) -> None:
    raw = header_text.encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def test_a_duplicate_tensor_name_in_the_header_is_refused_naming_file_and_key(tmp_path):
    """Two entries for one name, here the same bytes read as float32 (16, 8) and as bfloat16 (16, 16): which
    one a reader keeps decides what loads (safetensors itself accepted the file). The spec forbids it."""
    path, _ = _saved(tmp_path)
    tensors = load_file(str(path / WEIGHTS))
    entries, data = [], b""
    for key, tensor in tensors.items():
        raw = tensor.contiguous().numpy().tobytes()
        entries.append(f'"{key}": {{"dtype": "F32", "shape": {list(tensor.shape)}, '
                       f'"data_offsets": [{len(data)}, {len(data) + len(raw)}]}}')
        if key == KEY:
            entries.append(f'"{key}": {{"dtype": "BF16", "shape": [16, 16], '
                           f'"data_offsets": [{len(data)}, {len(data) + len(raw)}]}}')
        data += raw
    _write_safetensors(path / WEIGHTS, "{" + ", ".join(entries) + "}", data)
    model = build_model("llama")
    with pytest.raises(AdapterError, match=rf"{re.escape(str(path / WEIGHTS))}: not a valid safetensors file "
                                           rf"\(its header names '{KEY}' twice"):
        lorakit.load_adapter(model, path)
    assert _no_lorakit_modules(model)


def test_a_header_over_safetensors_100_mb_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from lorakit.safetensors_header import read_header

    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write((200 << 20).to_bytes(8, "little"))
        f.truncate(300 << 20)  # sparse: room for the claimed header, nothing on disk
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("the oversize header was parsed"))
    with pytest.raises(AdapterError, match=r"header length 209715200 does not fit the file or safetensors' 100 MB"):
        read_header(path, error=AdapterError)


def test_a_header_that_leaves_a_hole_in_the_data_is_refused(tmp_path):
    from lorakit.safetensors_header import read_header

    path = tmp_path / "hole.safetensors"
    _write_safetensors(path, '{"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}', b"\0" * 16)
    with pytest.raises(AdapterError, match="leaves a hole before it"):
        read_header(path, error=AdapterError)
