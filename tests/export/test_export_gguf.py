"""`lorakit export`: a merged transformers checkpoint that loads alone; a GGUF file read back with the gguf
package (metadata llama.cpp needs, tokenizer, every weight equal to the merged model's after undoing the
rotary row order; q8_0 within its quantization step) and run by llama.cpp itself through llama-cpp-python
(token ids and logits against lorakit's adapted model). llama-cpp-python is in the test extra; .ci/run
builds it portably (GGML_NATIVE=OFF: the native build crashes on q8_0 models on this AMX CPU)."""

from __future__ import annotations

import json
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import lorakit
from data_helpers import CHATML_JINJA, save_chat_llama
from llama_cpp_helpers import TEXTS, run_llama_cpp as _llama_cpp
from lorakit.cli import main
from lorakit.export import ExportError, write_gguf
from lorakit.export.gguf import interleave_rope
from tiny_models import randomize_lora

gguf = pytest.importorskip("gguf")


def _byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE, trained here on a little multilingual text (non-ASCII included)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["The quick brown fox jumps over the lazy dog.", "Héllo wörld, 你好 世界! 123 456", "def f(x): return x * 2"]
    tok.train_from_iterator(text * 50, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML_JINJA
    return fast


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    tokenizer = _byte_level_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         tie_word_embeddings=False))
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    lora = lorakit.wrap(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_lora(lora, scale=0.2)
    lora.save_adapter(root / "adapter")
    return root / "base", root / "adapter"


def _adapted_logits(base, adapter, ids, **options):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **options).eval()
    with torch.no_grad():
        return lorakit.load_adapter(model, adapter)(torch.tensor([ids])).logits[0]


def test_hf_export_loads_in_plain_transformers_with_the_adapted_logits(base_and_adapter, tmp_path, capsys):
    base, adapter = base_and_adapter
    out = tmp_path / "merged"
    assert main(["export", "--base", str(base), "--adapter", str(adapter), "--format", "hf", "--out", str(out),
                 "--dtype", "float32"]) == 0
    ids = [5, 17, 42, 99, 7]
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(out).eval()(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, _adapted_logits(base, adapter, ids), rtol=1e-4, atol=1e-5)


def test_bf16_hf_export_matches_within_bf16_rounding(base_and_adapter, tmp_path):
    base, adapter = base_and_adapter
    out = tmp_path / "merged-bf16"
    assert main(["export", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--dtype", "bfloat16"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == torch.bfloat16
    ids = [5, 17, 42, 99, 7]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    expected = _adapted_logits(base, adapter, ids)
    assert (logits - expected).abs().max() / expected.abs().max() < 3e-2  # bf16 keeps 8 bits of mantissa


def _fields(reader) -> dict:
    out = {}
    for name, field in reader.fields.items():
        kind = field.types[0] if field.types else None
        if kind == gguf.GGUFValueType.STRING:
            out[name] = bytes(field.parts[field.data[0]]).decode("utf-8")
        elif kind == gguf.GGUFValueType.ARRAY and field.types[-1] == gguf.GGUFValueType.STRING:
            out[name] = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        elif kind == gguf.GGUFValueType.ARRAY:
            out[name] = [field.parts[i][0].item() for i in field.data]
        else:
            out[name] = field.parts[field.data[0]][0].item()
    return out


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_holds_what_llama_cpp_reads_and_the_merged_weights(base_and_adapter, tmp_path, quant):
    base, adapter = base_and_adapter
    out = tmp_path / f"model-{quant}.gguf"
    assert main(["export", "--base", str(base), "--adapter", str(adapter), "--format", "gguf", "--quant", quant,
                 "--out", str(out)]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the merge work directory is gone
    reader = gguf.GGUFReader(out)
    fields = _fields(reader)
    assert fields["general.architecture"] == "llama"
    assert (fields["llama.block_count"], fields["llama.embedding_length"], fields["llama.feed_forward_length"]) == (2, 64, 128)
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (4, 2)
    assert fields["llama.rope.dimension_count"] == 16 and fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.chat_template"] == CHATML_JINJA and len(fields["tokenizer.ggml.merges"]) > 0
    for special in ("<|im_start|>", "<|im_end|>"):  # llama.cpp renders CONTROL tokens only when asked
        assert fields["tokenizer.ggml.token_type"][tokenizer.convert_tokens_to_ids(special)] == gguf.TokenType.CONTROL

    merged = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).merge_and_unload()
    expected = merged.state_dict()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == len(expected)
    for key, weight in expected.items():
        if key.endswith(("q_proj.weight", "k_proj.weight")):
            weight = interleave_rope(weight, 4 if "q_proj" in key else 2)
        t = tensors[names.get_name(key, try_suffixes=(".weight", ".bias"))]
        data = gguf.dequantize(t.data, t.tensor_type).reshape(weight.shape)
        step = 1e-3 if t.tensor_type == gguf.GGMLQuantizationType.F16 else 1 / 127  # relative to the block max
        assert np.abs(data - weight.numpy()).max() <= step * np.abs(weight.numpy()).max() + 1e-6, key
        if weight.dim() == 2:
            want = gguf.GGMLQuantizationType.Q8_0 if quant == "q8_0" else gguf.GGMLQuantizationType.F16
            assert t.tensor_type == want, key


def test_rotary_rows_become_adjacent_pairs_per_head():
    rows = torch.arange(8.0)[:, None]  # 2 heads of head_dim 4: halves (0 1 | 2 3), (4 5 | 6 7)
    assert interleave_rope(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_unsupported_architecture_and_tokenizer_are_refused_by_name(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ExportError, match="GGUF export supports .*LlamaForCausalLM.*GPT2LMHeadModel"):
        write_gguf(tmp_path / "gpt2", tmp_path / "x.gguf")
    save_chat_llama(tmp_path / "llama")
    tok = Tokenizer(models.BPE())  # neither byte-level nor SentencePiece-style: split on whitespace only
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a small corpus of words"] * 10, trainers.BpeTrainer(vocab_size=80))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path / "llama")
    with pytest.raises(ExportError, match="SentencePiece-style BPE tokenizers .* split text like GPT-2, Llama 3 or Qwen2"):
        write_gguf(tmp_path / "llama", tmp_path / "y.gguf")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_qwen2_keeps_its_rotary_layout_and_biases(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = _byte_level_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                                         tie_word_embeddings=True))
    model.save_pretrained(tmp_path / "qwen2")
    tokenizer.save_pretrained(tmp_path / "qwen2")
    reader = gguf.GGUFReader(write_gguf(tmp_path / "qwen2", tmp_path / "q.gguf"))
    assert _fields(reader)["general.architecture"] == "qwen2"
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reads the head from token_embd.weight
    for key, gguf_name in (("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight"),
                           ("model.layers.0.self_attn.k_proj.bias", "blk.0.attn_k.bias")):
        t = tensors[gguf_name]
        data = gguf.dequantize(t.data, t.tensor_type).reshape(model.state_dict()[key].shape)
        np.testing.assert_allclose(data, model.state_dict()[key].numpy(), rtol=1e-3, atol=1e-3)  # no reordering


@pytest.mark.parametrize("quant,tolerance,min_correlation", [("f16", 1e-2, 0.9999), ("q8_0", 1e-1, 0.998)])
def test_llama_cpp_runs_the_gguf_like_lorakit(base_and_adapter, tmp_path, quant, tolerance, min_correlation):
    pytest.importorskip("llama_cpp")
    base, adapter = base_and_adapter
    out = tmp_path / "model.gguf"
    assert main(["export", "--base", str(base), "--adapter", str(adapter), "--format", "gguf", "--quant", quant,
                 "--out", str(out)]) == 0
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    ids = tokenizer("The quick brown fox jumps over the lazy dog", add_special_tokens=False)["input_ids"]
    logits, tokens = _llama_cpp(out, ids, tmp_path)
    # the same ids for every string, non-ASCII and a chat-template special token included
    assert tokens == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    expected = _adapted_logits(base, adapter, ids).numpy()
    error = np.abs(logits - expected).max() / np.abs(expected).max()
    agree = float((logits.argmax(-1) == expected.argmax(-1)).mean())
    correlation = float(np.corrcoef(logits.ravel(), expected.ravel())[0, 1])
    # Measured with llama.cpp built portably (GGML_NATIVE=OFF): f16 4.8e-3 of the largest logit, every argmax
    # equal; q8_0 (llama.cpp also rounds activations to 8 bits) 6.0e-2, correlation 0.9993, 8 of 9 argmaxes
    # (this random model's logits are nearly flat, so a rounding can swap the top two).
    assert error < tolerance and correlation > min_correlation, (quant, float(error), correlation, agree)
    if quant == "f16":
        assert agree == 1.0


def test_lora_gguf_on_the_base_gguf_runs_like_the_unmerged_adapter(base_and_adapter, tmp_path):
    pytest.importorskip("llama_cpp")
    base, adapter = base_and_adapter
    write_gguf(base, tmp_path / "base.gguf")
    assert main(["export", "--base", str(base), "--adapter", str(adapter), "--format", "lora-gguf",
                 "--out", str(tmp_path / "adapter.gguf")]) == 0
    fields = _fields(gguf.GGUFReader(tmp_path / "adapter.gguf"))
    assert (fields["general.type"], fields["adapter.type"]) == ("adapter", "lora")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    ids = tokenizer("The quick brown fox jumps over the lazy dog", add_special_tokens=False)["input_ids"]
    logits, _ = _llama_cpp(tmp_path / "base.gguf", ids, tmp_path, lora=tmp_path / "adapter.gguf")
    expected = _adapted_logits(base, adapter, ids).numpy()
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()(torch.tensor([ids])).logits[0].numpy()
    scale = np.abs(expected).max()
    # measured: 1.9e-3 of the largest logit with the adapter, 1.53 without it
    assert np.abs(logits - expected).max() / scale < 1e-2  # the adapter applied (f16 base in llama.cpp) ...
    assert np.abs(plain - expected).max() / scale > 5e-2  # ... and it matters: without it the logits differ


def _render_go(template: str, messages: list[dict]) -> str:
    """The subset of Go's text/template the Modelfile templates use: range .Messages, .Role, .Content, and
    if / else if eq .Role "..." inside the range. (No whitespace precedes a {{- here, so trimming is moot.)"""
    import re

    head, each, tail = re.fullmatch(r"(.*?)\{\{- range \.Messages \}\}(.*)\{\{-? end \}\}(.*)", template, re.S).groups()
    branches = re.fullmatch(r'\{\{- if eq \.Role "(\w+)" \}\}(.*?)\{\{- else if eq \.Role "(\w+)" \}\}(.*?)\{\{- end \}\}',
                            each, re.S)

    def one(message: dict) -> str:
        body = each
        if branches:
            role_a, body_a, role_b, body_b = branches.groups()
            body = {role_a: body_a, role_b: body_b}.get(message["role"], "")
        return body.replace("{{ .Role }}", message["role"]).replace("{{ .Content }}", message["content"])

    return head + "".join(one(m) for m in messages) + tail


def test_ollama_directory_has_the_gguf_and_a_modelfile_speaking_the_chat_template(base_and_adapter, tmp_path):
    base, adapter = base_and_adapter
    out = tmp_path / "ollama"
    assert main(["export", "--base", str(base), "--adapter", str(adapter), "--format", "ollama", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    assert _fields(gguf.GGUFReader(out / "model.gguf"))["general.architecture"] == "llama"
    text = (out / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n")
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert 'PARAMETER stop "<|im_end|>"' in text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo?"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "2 + 2?"}]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    # Ollama's prompt is the tokenizer's own chat template with the generation prompt
    assert _render_go(template, messages) == tokenizer.apply_chat_template(messages, tokenize=False,
                                                                         add_generation_prompt=True)


def test_an_unknown_chat_template_gets_no_ollama_template_and_a_note(tmp_path):
    from lorakit.export.ollama import chat_family, modelfile

    assert chat_family("{{ bos_token }}{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}{% endfor %}") is None
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}')
    text, note = modelfile("model.gguf", tmp_path)
    assert text == "FROM ./model.gguf\n" and "no TEMPLATE" in note


def _gguf_with_tokenizer(tokenizer, tmp_path):
    """A 1-layer Llama sized to `tokenizer`, saved with it and written as GGUF (for tokenizer checks)."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128)
                     ).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    return write_gguf(tmp_path / "m", tmp_path / "m.gguf")


TRICKY = ["I'm here, you'RE there 12345 6", "héllo\n\n  world\t!", "你好世界 ☃ ok", "x=1;y=22 {\"a\": [3]}  ", "<|im_start|>hi"]


@pytest.mark.parametrize("name", ["gpt-2", "llama-bpe", "qwen2"])
def test_llama_cpp_splits_text_like_each_supported_pre_tokenizer(tmp_path, name):
    pytest.importorskip("llama_cpp")
    from tokenizers import Regex

    from lorakit.export.gguf import SPLIT_PATTERNS

    tok = Tokenizer(models.BPE())
    if name == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:  # as Llama 3's and Qwen2's tokenizer.json have it: split by the pattern, then map bytes
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERNS[name]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRICKY * 20 + ["The quick brown fox 1234567 jumps; it's 99 degrees"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>")
    model_file = _gguf_with_tokenizer(fast, tmp_path)
    assert _fields(gguf.GGUFReader(model_file))["tokenizer.ggml.pre"] == name
    _, tokens = _llama_cpp(model_file, [1, 2], tmp_path, texts=TRICKY)
    assert tokens == [fast(t, add_special_tokens=False)["input_ids"] for t in TRICKY]


def test_mistral_exports_as_llama_and_runs_in_llama_cpp(tmp_path):
    pytest.importorskip("llama_cpp")
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = _byte_level_tokenizer()
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                                             sliding_window=None, rope_theta=1e6)).eval()
    model.save_pretrained(tmp_path / "mistral")
    tokenizer.save_pretrained(tmp_path / "mistral")
    model_file = write_gguf(tmp_path / "mistral", tmp_path / "mistral.gguf")
    fields = _fields(gguf.GGUFReader(model_file))
    assert fields["general.architecture"] == "llama" and fields["llama.rope.freq_base"] == pytest.approx(1e6)
    ids = tokenizer("The quick brown fox jumps over the lazy dog", add_special_tokens=False)["input_ids"]
    logits, _ = _llama_cpp(model_file, ids, tmp_path)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(logits - expected).max() / np.abs(expected).max() < 1e-2


def test_gguf_from_a_4_bit_base_holds_the_dequantized_merge(base_and_adapter, tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("bitsandbytes")
    from lorakit.base_model import load_base_model
    from lorakit.config import ModelConfig, QuantizationConfig

    base, adapter = base_and_adapter
    out = tmp_path / "q4.gguf"
    assert main(["export", "--base", str(base), "--adapter", str(adapter), "--format", "gguf", "--quantize", "4",
                 "--out", str(out)]) == 0
    loaded = load_base_model(ModelConfig(name_or_path=str(base), dtype="float32", device="cpu",
                                         quantization=QuantizationConfig(bits=4)))
    adapted = lorakit.load_adapter(loaded.model, adapter).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    ids = tokenizer("The quick brown fox jumps over the lazy dog", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = adapted(torch.tensor([ids])).logits[0].float().numpy()
        full = _adapted_logits(base, adapter, ids).numpy()
    logits, _ = _llama_cpp(out, ids, tmp_path)
    scale = np.abs(expected).max()
    assert np.abs(logits - expected).max() / scale < 1e-2  # the 4-bit model lorakit trains, adapter merged
    assert np.abs(full - expected).max() / scale > 1e-2  # (and 4 bits do differ from the 16-bit base)


def test_llama_cpp_tokenizes_like_a_sentencepiece_tokenizer(tmp_path):
    """Llama 2 / Mistral style: BPE with byte fallback and the ▁ word marker, converted by transformers from a
    sentencepiece model trained here. (llama.cpp always puts ▁ before the text; transformers' converted
    tokenizers skip it when the text starts with a space, so such texts tokenize differently: not tested.)"""
    pytest.importorskip("llama_cpp")
    spm = pytest.importorskip("sentencepiece")
    import json
    import shutil

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["The quick brown fox jumps over the lazy dog.", "Héllo wörld, 你好 世界! 123 456",
                                 "I'm here, you're there"] * 100))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(tmp_path / "sp.model", source / "tokenizer.model")
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                             "eos_token": "</s>", "unk_token": "<unk>"}))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model_file = _gguf_with_tokenizer(tokenizer, tmp_path)
    assert _fields(gguf.GGUFReader(model_file))["tokenizer.ggml.model"] == "llama"
    texts = ["Héllo wörld 你好", "I'm here, you're there 123", "two  spaces\nand a newline", "The quick brown fox ☃"]
    _, tokens = _llama_cpp(model_file, [1, 2], tmp_path, texts=texts)
    assert tokens == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]  # ☃: byte fallback
    assert tokenizer.convert_ids_to_tokens(tokens[0])[0].startswith("▁")  # Llama 2 style: ▁ before the text

    # Gemma style: the same kind of model without the leading ▁ (add_dummy_prefix off, GemmaTokenizer's converter)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "gemma"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, add_dummy_prefix=False,
                                   unk_id=3, bos_id=2, eos_id=1, pad_id=0, minloglevel=2)
    gemma = tmp_path / "gemma-source"
    gemma.mkdir()
    shutil.copy(tmp_path / "gemma.model", gemma / "tokenizer.model")
    (gemma / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer", "bos_token": "<s>",
                                                            "eos_token": "</s>", "unk_token": "<unk>",
                                                            "pad_token": "<pad>"}))
    tokenizer = AutoTokenizer.from_pretrained(gemma)
    (tmp_path / "g").mkdir()
    model_file = _gguf_with_tokenizer(tokenizer, tmp_path / "g")
    _, tokens = _llama_cpp(model_file, [1, 2], tmp_path / "g", texts=texts)
    assert tokens == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert not tokenizer.convert_ids_to_tokens(tokens[0])[0].startswith("▁")


LLAMA3_CHAT = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
               "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
               "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
               "{{ content }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")  # Llama 3 Instruct's


def _modelfile_for_chat_template(directory, chat_template: str, bos: str, eos: str, specials: list[str]):
    """(Modelfile's Go template, its text, the saved tokenizer) for a small tokenizer with `chat_template`."""
    from lorakit.export.ollama import modelfile

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["hello world"], trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    fast.chat_template = chat_template
    fast.save_pretrained(directory)
    text, note = modelfile("model.gguf", directory)
    assert note is None and f'PARAMETER stop "{eos}"' in text
    return text.split('TEMPLATE """', 1)[1].split('"""', 1)[0], text, fast


def test_the_llama3_ollama_template_renders_like_the_tokenizers_own_without_a_second_bos(tmp_path):
    template, _, fast = _modelfile_for_chat_template(tmp_path, LLAMA3_CHAT, "<|begin_of_text|>", "<|eot_id|>",
                                                     ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                                                      "<|end_header_id|>"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo?"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "2 + 2?"}]
    own = fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert own.startswith("<|begin_of_text|>")  # llama.cpp adds BOS when it tokenizes the prompt
    assert _render_go(template, messages) == own[len("<|begin_of_text|>"):]


MISTRAL_CHAT = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
                "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
                "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
                "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")


def test_the_mistral_ollama_template_renders_like_mistral_instructs_own(tmp_path):
    from lorakit.export.ollama import chat_family

    template, _, fast = _modelfile_for_chat_template(tmp_path, MISTRAL_CHAT, "<s>", "</s>", ["<s>", "</s>"])
    messages = [{"role": "user", "content": "Héllo?"}, {"role": "assistant", "content": "Hi."},
                {"role": "user", "content": "2 + 2?"}]
    own = fast.apply_chat_template(messages, tokenize=False)
    assert _render_go(template, messages) == own[len("<s>"):]  # BOS comes from the runner
    assert chat_family("[INST] <<SYS>>\n{{ system }}\n<</SYS>>") is None  # Llama 2's system prompt: not Mistral's


def test_a_gguf_lora_file_holds_plain_lora_only_and_the_method_is_named(tmp_path):
    """llama.cpp's LoRA GGUF has A and B per tensor: a DoRA adapter (or any other method) is refused by name."""
    from lorakit.export import write_lora_gguf
    from tiny_models import build_model

    model = lorakit.wrap(build_model("llama"), lorakit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ExportError, match="cannot hold Dora adapters"):
        write_lora_gguf(model, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_k_quants_come_from_llama_cpps_quantizer_and_cost_what_their_bits_say(tmp_path):
    """--quant q4_0 / q4_k_m / q5_k_m / q6_k: llama.cpp's own quantizer picks each tensor's type (Q4_K_M keeps a
    few in Q6_K), llama.cpp runs the file, and fewer bits cost more: the logits' error against the model grows
    from q6_k to q4_k_m. A 256-wide model, so that rows fill the k-quants' 256-value blocks."""
    pytest.importorskip("llama_cpp")
    tokenizer = _byte_level_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                         max_position_embeddings=128)).eval()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    ids = tokenizer("The quick brown fox jumps over the lazy dog", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    # measured: relative error 0.17 / 0.17 / 0.077 / 0.045, correlation 0.980 / 0.985 / 0.997 / 0.999
    wanted = {"q4_0": ("Q4_0", 0.97), "q4_k_m": ("Q4_K", 0.975), "q5_k_m": ("Q5_K", 0.99), "q6_k": ("Q6_K", 0.995)}
    errors = {}
    for quant, (main_type, min_correlation) in wanted.items():
        out = tmp_path / f"model.{quant}.gguf"
        write_gguf(tmp_path / "model", out, quant=quant)
        types = {t.tensor_type.name for t in gguf.GGUFReader(out).tensors if len(t.shape) == 2}
        assert main_type in types and "F32" not in types, (quant, types)
        (tmp_path / quant).mkdir()
        logits, _ = _llama_cpp(out, ids, tmp_path / quant, texts=[])
        errors[quant] = np.abs(logits - expected).max() / np.abs(expected).max()
        assert np.corrcoef(logits.ravel(), expected.ravel())[0, 1] > min_correlation, quant
    assert errors["q6_k"] < errors["q5_k_m"] < errors["q4_k_m"], errors
    assert not list(tmp_path.glob(".*f32-*"))  # the f32 intermediate is gone


def _tiny(family: str, vocab: int):
    """A tiny random model of `family` (its config and transformers class), shaped like the real ones in what
    llama.cpp reads: an own head_dim, grouped-query attention, soft-caps, sliding windows, fused projections."""
    import transformers

    shared = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=vocab, max_position_embeddings=128)
    if family == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            **shared, num_hidden_layers=2, head_dim=32, tie_word_embeddings=False))
    if family == "gemma2":  # query_pre_attn_scalar = head_dim, as llama.cpp assumes below 46 layers
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            **shared, num_hidden_layers=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=64,
            attn_logit_softcapping=5.0, final_logit_softcapping=3.0, attn_implementation="eager"))
    if family == "gemma3":  # 7 layers: five sliding, one full, one sliding again
        return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            **shared, num_hidden_layers=7, head_dim=32, query_pre_attn_scalar=32, sliding_window=4))
    if family == "phi3":  # partial rotary: llama.cpp rotates the first half of each head only
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(
            **shared, num_hidden_layers=2, partial_rotary_factor=0.5, pad_token_id=0, tie_word_embeddings=False))
    raise AssertionError(family)


@pytest.mark.parametrize("family,change,named", [
    ("gemma2", {"query_pre_attn_scalar": 16}, r"query_pre_attn_scalar 16 \(llama.cpp scales attention by 1/sqrt\(32\)"),
    ("gemma2", {"final_logit_softcapping": None}, "no attention or final soft-capping"),
    ("gemma2", {"tie_word_embeddings": False}, "an output head apart from the embeddings"),
    ("gemma3", {"layer_types": ["full_attention"] * 7}, r"layer_types other than llama.cpp's \(one full-attention layer in 6\)"),
    ("gemma3", {"final_logit_softcapping": 30.0}, r"soft-capping \(llama.cpp's gemma3 has none\)"),
    ("gemma3", {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 5e4},
                                    "full_attention": {"rope_type": "default", "rope_theta": 1e6}}},
     "a sliding-layer rope base of 50000"),
    ("phi3", {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8,
                               "original_max_position_embeddings": 64}}, "rope scaling 'longrope' is not supported"),
])
def test_configs_llama_cpp_would_compute_differently_are_refused_by_name(tmp_path, family, change, named):
    """What llama.cpp's graph fixes per architecture instead of reading it from the file (Gemma's attention scale
    by layer count, its soft-caps, its sliding-window pattern and local rope base, Phi-3's long-context rope) is
    checked against the config: a model that differs is refused with the difference named, nothing written."""
    tokenizer = _byte_level_tokenizer()
    model = _tiny(family, len(tokenizer))
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config.update(change)
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=named):
        write_gguf(tmp_path / "base", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3", "phi3"])
def test_each_architecture_exports_merged_and_as_a_gguf_lora_and_runs_in_llama_cpp(tmp_path, family):
    """Qwen3 (per-head query/key RMSNorms, its own head_dim), Gemma 2 (norms as 1 + weight, scaled embeddings,
    soft-caps, sliding windows), Gemma 3 (query/key norms too, local and global rope bases, a window shorter
    than the prompt) and Phi-3 (fused qkv and gate/up projections, adapted as they are; partial rotary): the
    merged GGUF and the base GGUF plus the GGUF LoRA give lorakit's adapted logits in llama.cpp, and token ids
    equal the tokenizer's."""
    pytest.importorskip("llama_cpp")
    tokenizer = _byte_level_tokenizer()
    torch.manual_seed(0)
    model = _tiny(family, len(tokenizer))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # ones (zeros for Gemma) at init would hide a norm llama.cpp skipped or misread
                param += 0.2 * torch.randn_like(param)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    lora = lorakit.wrap(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_lora(lora, scale=0.2)
    lora.save_adapter(tmp_path / "adapter")
    ids = tokenizer("The quick brown fox jumps over the lazy dog", add_special_tokens=False)["input_ids"]
    eager = {"attn_implementation": "eager"}  # Gemma 2's attention soft-cap exists in eager attention only
    expected = _adapted_logits(tmp_path / "base", tmp_path / "adapter", ids, **eager).numpy()
    common = ["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")]
    assert main(["export", *common, "--format", "gguf", "--out", str(tmp_path / "merged.gguf")]) == 0
    assert main(["export", *common, "--format", "lora-gguf", "--out", str(tmp_path / "adapter.gguf")]) == 0
    write_gguf(tmp_path / "base", tmp_path / "base.gguf")
    assert _fields(gguf.GGUFReader(tmp_path / "merged.gguf"))["general.architecture"] == family
    scale = np.abs(expected).max()
    (tmp_path / "m").mkdir()
    merged, tokens = _llama_cpp(tmp_path / "merged.gguf", ids, tmp_path / "m")
    assert tokens == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    # f16 weights and llama.cpp's f16 KV cache: ~1e-3 per layer (f32 weights alone leave 1e-3 after 7 layers)
    tolerance = 1e-2 if family != "gemma3" else 2e-2  # gemma3 has 7 layers here
    assert np.abs(merged - expected).max() / scale < tolerance
    (tmp_path / "l").mkdir()
    with_lora, _ = _llama_cpp(tmp_path / "base.gguf", ids, tmp_path / "l", lora=tmp_path / "adapter.gguf")
    assert np.abs(with_lora - expected).max() / scale < tolerance
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base", **eager).eval()(torch.tensor([ids])).logits[0]
    assert np.abs(plain.numpy() - expected).max() / scale > 5e-2  # the adapter matters
