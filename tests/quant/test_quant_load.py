"""Loading a 16-bit checkpoint as a 4-bit / 8-bit base: the streaming loader, its fallbacks, its checks."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("bitsandbytes")

from tiny_models import VOCAB, build_model
from data_helpers import build_tokenizer
from lorakit import ConfigError, LoraConfig, LoraModel
from lorakit.base_model import load_base_model
from lorakit.config import ModelConfig, QuantizationConfig, run_config_from_dict
from lorakit.errors import CheckpointError
from lorakit.quant import load as quant_load

QUANTIZED = ("Linear4bit", "Linear8bitLt")


def _save(model, path):
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _save(build_model("llama"), tmp_path_factory.mktemp("q") / "llama")


def _load(path, bits=4, log=None, **quant):
    config = ModelConfig(name_or_path=str(path), dtype="float32", device="cpu",
                         quantization=QuantizationConfig(bits=bits, **quant))
    return load_base_model(config, log=log or (lambda _: None))


def _kinds(model):
    return {name: type(module).__name__ for name, module in model.named_modules()}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("bits", [4, 8])
def test_linear_layers_load_quantized_and_the_model_computes_like_the_original(tmp_path, family, bits):
    original = build_model(family)
    notes = []
    loaded = _load(_save(original, tmp_path / family), bits, log=notes.append)
    kinds = _kinds(loaded.model)
    linear = [n for n, m in original.named_modules() if type(m).__name__ in ("Linear", "Conv1D")]
    head = "lm_head"
    assert all(kinds[n] in QUANTIZED for n in linear if n != head)
    assert kinds[head] == "Linear" and loaded.model.lm_head.weight.dtype == torch.float32
    assert notes == []  # the streaming path was taken, no fallback note
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    if bits == 4:
        # The exact expectation: the original with each weight rounded through NF4 and back.
        _round_trip_4bit(original, linear, head)
    with torch.no_grad():
        want, got = original(ids).logits, loaded.model(ids).logits
    # 8-bit (LLM.int8) also quantizes the activations, row by row, so it is only close to the original.
    tolerance = 1e-5 if bits == 4 else 0.05
    assert (want - got).abs().max() <= tolerance * want.abs().max()
    total = sum(p.numel() for p in original.parameters())
    assert f"{total:,} parameters" in loaded.describe() or f"{total / 1e6:.1f}M" in loaded.describe()
    assert ("4-bit NF4" if bits == 4 else "8-bit") in loaded.describe()


def _round_trip_4bit(model, names, head):
    import bitsandbytes.functional as bnbf

    with torch.no_grad():
        for name in names:
            if name == head:
                continue
            weight = model.get_submodule(name).weight
            conv1d = type(model.get_submodule(name)).__name__ == "Conv1D"
            w = weight.T.contiguous() if conv1d else weight
            packed, state = bnbf.quantize_4bit(w.data.clone(), quant_type="nf4", compress_statistics=True)
            back = bnbf.dequantize_4bit(packed, state).to(weight.dtype)
            weight.copy_(back.T if conv1d else back)


def test_streaming_never_holds_more_than_one_16bit_weight(llama_dir, monkeypatch):
    """Each weight is quantized as it is read and its 16-bit copy freed before the next is read."""
    alive: list[weakref.ref] = []
    most = []
    real = quant_load.quantize_linear

    def spy(weight, *args, **kwargs):
        alive.append(weakref.ref(weight))
        most.append(sum(r() is not None for r in alive))
        return real(weight, *args, **kwargs)

    monkeypatch.setattr(quant_load, "quantize_linear", spy)
    _load(llama_dir)
    assert len(most) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert max(most) == 1


def test_tensors_already_quantized_on_disk_load_as_they_are(tmp_path, llama_dir):
    first = _load(llama_dir)
    first.model.save_pretrained(tmp_path / "prequant")  # transformers writes the 4-bit tensors + quantization_config
    build_tokenizer().save_pretrained(tmp_path / "prequant")
    assert "quantization_config" in json.loads((tmp_path / "prequant" / "config.json").read_text())
    notes = []
    second = _load(tmp_path / "prequant", log=notes.append)
    assert "already quantized" in notes[0]
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.allclose(first.model(ids).logits, second.model(ids).logits, atol=1e-5)
    # With no quantization section transformers reads the quantization_config itself; LoRA still wraps it.
    plain = load_base_model(ModelConfig(name_or_path=str(tmp_path / "prequant"), dtype="float32", device="cpu"))
    lora = LoraModel(plain.model, LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        assert torch.allclose(lora(ids).logits, second.model(ids).logits, atol=1e-5)


def test_unknown_tensor_names_fall_back_to_transformers_with_a_note(tmp_path, llama_dir):
    from safetensors.torch import load_file

    tensors = load_file(llama_dir / "model.safetensors")
    tensors["model.some_extra_thing.weight"] = torch.zeros(3)
    path = tmp_path / "odd"
    path.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (path / f).write_bytes((llama_dir / f).read_bytes())
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    notes = []
    loaded = _load(path, log=notes.append)
    assert "transformers' bitsandbytes path" in notes[0] and "some_extra_thing" in notes[0]
    assert type(loaded.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def _copy_with(tmp_path, llama_dir, tensors):
    path = tmp_path / "edited"
    path.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (path / f).write_bytes((llama_dir / f).read_bytes())
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_a_missing_tensor_is_an_error_naming_it(tmp_path, llama_dir):
    from safetensors.torch import load_file

    tensors = load_file(llama_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        _load(_copy_with(tmp_path, llama_dir, tensors))


def test_a_wrong_shape_is_an_error_naming_the_tensor(tmp_path, llama_dir):
    from safetensors.torch import load_file

    tensors = load_file(llama_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(8, 32)
    with pytest.raises(CheckpointError, match=r"q_proj.weight.*\[8, 32\]"):
        _load(_copy_with(tmp_path, llama_dir, tensors))


def test_a_damaged_header_is_refused(tmp_path, llama_dir):
    path = _copy_with(tmp_path, llama_dir, {"x": torch.zeros(4)})
    data = bytearray((llama_dir / "model.safetensors").read_bytes())
    data[8:40] = b"{" * 32  # header JSON destroyed
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="unreadable safetensors header"):
        _load(path)


def test_header_offsets_outside_the_file_are_refused(tmp_path):
    from lorakit.quant.stream import read_header

    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    path = tmp_path / "short.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="outside the file"):
        read_header(path)


def test_shard_names_that_leave_the_directory_are_refused(tmp_path, llama_dir):
    path = _copy_with(tmp_path, llama_dir, {"x": torch.zeros(1)})
    (path / "model.safetensors").unlink()
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "../evil.safetensors"}}))
    with pytest.raises(CheckpointError, match="plain file names"):
        _load(path)


def test_the_config_section_is_typed_and_explains_itself():
    config = run_config_from_dict({"model": {"name_or_path": "m", "quantization": {"bits": 4, "type": "fp4"}},
                                   "data": {"train": "t.jsonl"}})
    assert config.model.quantization == QuantizationConfig(bits=4, type="fp4")
    with pytest.raises(ConfigError) as caught:
        run_config_from_dict({"model": {"name_or_path": "m", "quantization": {"bits": 3, "double_qaunt": True}},
                              "data": {"train": "t.jsonl"}})
    text = str(caught.value)
    assert "model.quantization.bits: must be one of 4, 8" in text
    assert "did you mean 'double_quant'" in text


def test_without_bitsandbytes_the_error_says_how_to_install_it(llama_dir, monkeypatch):
    import importlib

    real = importlib.import_module

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_bnb)
    with pytest.raises(ConfigError, match=r"pip install 'lorakit\[quant\]'"):
        _load(llama_dir)


def test_the_lean_allocator_setting_respects_the_users_own(monkeypatch):
    from lorakit.quant.load import _glibc, lean_allocator

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert lean_allocator() is False
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert lean_allocator() is False
    monkeypatch.delenv("LD_PRELOAD")
    assert lean_allocator() is (getattr(_glibc(), "mallopt", None) is not None)
