"""A GGUF file as the base model (`model.name_or_path: x.gguf`): the weights lorakit trains on are those
transformers' own GGUF kernels compute with, dequantized once into a cache and reused; adapters record the file
by sha256 and warn when applied to another; bad files are refused with the reason. The GGUF files are tiny
random Llamas written by lorakit's own exporter (q8_0 and f16)."""

from __future__ import annotations

import hashlib
import json
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_helpers import save_chat_llama
from lorakit.base_model import load_base_model, load_model_config
from lorakit.cli.main import main
from lorakit.config import ModelConfig
from lorakit.errors import ConfigError

gguf = pytest.importorskip("gguf")
TEXT = "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from lorakit.export import write_gguf

    root = tmp_path_factory.mktemp("gguf_base")
    save_chat_llama(root / "model")
    for quant in ("q8_0", "f16"):
        write_gguf(root / "model", root / f"model.{quant}.gguf", quant=quant)
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


def _load(path, dtype="float32", log=lambda _: None, **options):
    return load_base_model(ModelConfig(name_or_path=str(path), dtype=dtype, **options), log=log)


def _logits(model, tokenizer, text=TEXT):
    with torch.no_grad():
        return model(torch.tensor([tokenizer(text).input_ids])).logits[0]


def test_the_model_trained_on_computes_as_transformers_gguf_kernels_do(files):
    """Dequantized weights give the logits of transformers running the q8_0 file with its packed kernels, and
    logits near the original model's (q8_0 rounding); the tokenizer read from the file tokenizes as the original."""
    loaded = _load(files / "model.q8_0.gguf")
    packed = AutoModelForCausalLM.from_pretrained(files, gguf_file="model.q8_0.gguf", dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(files / "model").eval()
    original_tokenizer = AutoTokenizer.from_pretrained(files / "model")
    assert loaded.tokenizer(TEXT).input_ids == original_tokenizer(TEXT).input_ids
    ours = _logits(loaded.model, loaded.tokenizer)
    torch.testing.assert_close(ours, _logits(packed, original_tokenizer), rtol=0, atol=0)
    near = _logits(original, original_tokenizer)
    assert 0 < (ours - near).abs().max() < 0.02 * near.abs().max()  # q8_0 changed the weights, a little
    assert loaded.model.config._name_or_path == str((files / "model.q8_0.gguf").resolve())
    assert "model.q8_0.gguf" in loaded.describe()


def test_dequantized_once_per_file_and_dtype_then_reused(files, cache):
    lines = []
    _load(files / "model.q8_0.gguf", log=lines.append)
    first = lines[0]
    assert "architecture llama" in first and "16 x Q8_0" in first and "44,192 parameters" in first
    assert "dequantizing to float32 (172.6 KiB in memory and on disk)" in lines[-1]  # 44,192 x 4 bytes
    made = sorted(cache.iterdir())
    weights = next(made[0].glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    lines.clear()
    _load(files / "model.q8_0.gguf", log=lines.append)
    assert "reused from" in lines[-1] and weights.stat().st_mtime_ns == stamp
    _load(files / "model.q8_0.gguf", dtype="bfloat16")
    assert len(list(cache.iterdir())) == 2  # a dtype of its own
    # a directory left incomplete (its record is written last) is made again, not trusted
    (made[0] / "gguf_source.json").unlink()
    lines.clear()
    _load(files / "model.q8_0.gguf", log=lines.append)
    assert "dequantizing" in lines[-1]


def test_config_and_tokenizer_are_read_without_dequantizing(files, cache):
    config = ModelConfig(name_or_path=str(files / "model.q8_0.gguf"))
    assert load_model_config(config).num_hidden_layers == 2
    # Nothing dequantized: no model directory in the cache (the file's hash may be indexed there).
    assert not cache.exists() or not [p for p in cache.iterdir() if p.is_dir()]


def test_a_directory_plus_gguf_file_loads_the_same(files):
    a = _load(files / "model.f16.gguf")
    b = _load(files, gguf_file="model.f16.gguf")
    torch.testing.assert_close(_logits(a.model, a.tokenizer), _logits(b.model, b.tokenizer), rtol=0, atol=0)


def test_a_hub_repo_plus_gguf_file_is_fetched_through_the_hub_cache(files, monkeypatch):
    """model: {name_or_path: org/repo, gguf_file: F, revision: R} downloads F with huggingface_hub (its cache)
    and loads it as the local file; a failed download is a config error naming repo and file."""
    import huggingface_hub

    calls = []

    def fake_download(repo, filename, revision=None):
        calls.append((repo, filename, revision))
        return str(files / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    hub = _load("org/tiny-GGUF", gguf_file="model.f16.gguf", revision="v1")
    local = _load(files / "model.f16.gguf")
    assert calls and set(calls) == {("org/tiny-GGUF", "model.f16.gguf", "v1")}
    torch.testing.assert_close(_logits(hub.model, hub.tokenizer), _logits(local.model, local.tokenizer), rtol=0, atol=0)

    def offline(repo, filename, revision=None):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ConfigError, match=r"cannot fetch 'model\.f16\.gguf' from 'org/tiny-GGUF': no network"):
        _load("org/tiny-GGUF", gguf_file="model.f16.gguf")
    with pytest.raises(ConfigError, match="must be the directory or hub repo that holds it"):
        _load(files / "model.f16.gguf", gguf_file="model.f16.gguf")


def _write_data(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i % 7} plus 2?"},
                                             {"role": "assistant", "content": f"It is {i % 7 + 2}."}]}) + "\n")


def test_an_adapter_trained_on_a_gguf_records_the_file_and_warns_on_another(files, tmp_path, capsys):
    _write_data(tmp_path / "train.jsonl", 8)
    gguf_path = (files / "model.q8_0.gguf").resolve()
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent(f"""\
        model: {{name_or_path: {gguf_path}, dtype: float32}}
        lora: {{r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}}
        data: {{train: {tmp_path / "train.jsonl"}, max_seq_len: 64}}
        train: {{max_steps: 3, batch_size: 2, lr: 1.0e-2}}
        output_dir: {tmp_path / "run"}
        """))
    assert main(["train", str(config)]) == 0
    adapter = tmp_path / "run" / "adapter"
    record = json.loads((adapter / "base_file.json").read_text())
    assert record["sha256"] == hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    assert record["path"] == str(gguf_path) and record["tensor_types"]["Q8_0"] == 16
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(gguf_path)
    capsys.readouterr()
    assert main(["check", str(adapter)]) == 0  # the base's config read from the GGUF file the adapter names
    assert main(["plan", str(config)]) == 0
    out = capsys.readouterr().out
    assert "base LlamaForCausalLM" in out and f"loads as lorakit loads it onto {gguf_path}" in out
    assert "llama, 2 layers x 32 wide" in out  # the planner read the shapes from the file's header

    import lorakit

    same = _load(gguf_path)
    lorakit.load_adapter(same.model, adapter)  # the file it was trained on: no warning (warnings are errors here)
    other = _load(files / "model.f16.gguf")
    with pytest.warns(UserWarning, match=r"trained on .*model\.q8_0\.gguf .*applied to .*model\.f16\.gguf"):
        lorakit.load_adapter(other.model, adapter)


def _random_adapter(base_file, directory):
    """A seeded all-linear adapter with non-zero B made on the GGUF base, saved to `directory`."""
    import lorakit
    from tiny_models import randomize_lora

    loaded = _load(base_file)
    lora = lorakit.wrap(loaded.model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_lora(lora, scale=0.3)
    lora.save_adapter(directory)
    return lora, loaded.tokenizer


@pytest.mark.parametrize("quant,tolerance", [("f16", 1e-2), ("q8_0", 1e-1)])
def test_llama_cpp_runs_the_users_own_file_with_the_adapter_like_lorakit(files, tmp_path, quant, tolerance):
    """The loop closed: an adapter made on the GGUF base, exported with `lorakit export --format lora-gguf
    --base FILE.gguf`, applied by llama.cpp to that same file, gives lorakit's adapted logits."""
    pytest.importorskip("llama_cpp")
    from llama_cpp_helpers import run_llama_cpp

    base_file = files / f"model.{quant}.gguf"
    lora, tokenizer = _random_adapter(base_file, tmp_path / "adapter")
    ids = tokenizer(TEXT).input_ids
    with torch.no_grad():
        expected = lora(torch.tensor([ids])).logits[0].numpy()
        with lora.disable_adapters():
            plain = lora(torch.tensor([ids])).logits[0].numpy()
    assert main(["export", "--base", str(base_file), "--adapter", str(tmp_path / "adapter"), "--format", "lora-gguf",
                 "--out", str(tmp_path / "adapter.gguf")]) == 0
    logits, _ = run_llama_cpp(base_file, ids, tmp_path, lora=tmp_path / "adapter.gguf", texts=[])
    scale = abs(expected).max()
    # llama.cpp also rounds activations to 8 bits for q8_0 weights: hence its looser tolerance
    assert abs(logits - expected).max() / scale < tolerance
    assert abs(plain - expected).max() / scale > 5 * tolerance  # the adapter matters: without it, far off


def test_ollama_export_of_a_gguf_base_names_the_users_file_and_adds_the_adapter(files, tmp_path, capsys):
    """--format ollama on a GGUF base copies no base: FROM the user's file, ADAPTER the lora-gguf export, the
    chat template and stops as for a merged export."""
    base_file = (files / "model.q8_0.gguf").resolve()
    _random_adapter(base_file, tmp_path / "adapter")
    assert main(["export", "--base", str(base_file), "--adapter", str(tmp_path / "adapter"), "--format", "ollama",
                 "--out", str(tmp_path / "ollama")]) == 0
    assert sorted(p.name for p in (tmp_path / "ollama").iterdir()) == ["Modelfile", "adapter.gguf"]
    lines = (tmp_path / "ollama" / "Modelfile").read_text().splitlines()
    assert lines[:2] == [f"FROM {base_file}", "ADAPTER ./adapter.gguf"]
    assert lines[2].startswith('TEMPLATE """{{- range .Messages }}<|im_start|>') and 'PARAMETER stop "<|im_end|>"' in lines
    assert main(["export", "--base", str(base_file), "--adapter", str(tmp_path / "adapter"), "--format", "lora-gguf",
                 "--out", str(tmp_path / "alone.gguf")]) == 0
    assert (tmp_path / "alone.gguf").read_bytes() == (tmp_path / "ollama" / "adapter.gguf").read_bytes()


def test_a_resume_on_a_changed_gguf_file_is_refused_and_other_runs_record_nothing_new(files, tmp_path):
    """The checkpoint's fingerprint records the GGUF file's sha256: the same path with other content is a change.
    A run on a model directory records no GGUF key, so checkpoints written before GGUF bases existed resume."""
    import shutil

    from lorakit.config import load_run_config
    from lorakit.train.fingerprint import run_settings
    from lorakit.train.restore import CheckpointMismatch, compare_fingerprints

    _write_data(tmp_path / "train.jsonl", 4)
    shutil.copy(files / "model.q8_0.gguf", tmp_path / "base.gguf")

    def settings(name_or_path):
        config = tmp_path / "run.yaml"
        config.write_text(f"model: {{name_or_path: {name_or_path}}}\ndata: {{train: {tmp_path / 'train.jsonl'}}}\n"
                          f"output_dir: {tmp_path / 'run'}\n")
        return run_settings(load_run_config(str(config)))

    assert not [key for key in settings(files / "model") if "gguf" in key]
    before = settings(tmp_path / "base.gguf")
    assert before["model.gguf_sha256"] == hashlib.sha256((files / "model.q8_0.gguf").read_bytes()).hexdigest()
    shutil.copy(files / "model.f16.gguf", tmp_path / "base.gguf")  # same path, other weights
    with pytest.raises(CheckpointMismatch, match="model.gguf_sha256"):
        compare_fingerprints(before, settings(tmp_path / "base.gguf"))


def test_bad_gguf_inputs_are_refused_with_the_reason(files, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        _load(tmp_path / "missing.gguf")
    (tmp_path / "text.gguf").write_text("not a model\n")
    with pytest.raises(ConfigError, match="not a readable GGUF file"):
        _load(tmp_path / "text.gguf")
    with pytest.raises(ConfigError, match=r"'other\.gguf' is not in .*it has model\.f16\.gguf, model\.q8_0\.gguf"):
        _load(files, gguf_file="other.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "rwkv.gguf"), "rwkv6")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match=r"holds a 'rwkv6' model, which transformers cannot read from GGUF .*llama"):
        _load(tmp_path / "rwkv.gguf")


def test_check_names_the_route_to_the_users_own_file_for_llama_cpp_and_ollama(files, tmp_path, capsys):
    """`lorakit check` on an adapter trained on a GGUF file: llama.cpp and Ollama are told to run that very file
    with the adapter (lora-gguf; FROM the file + ADAPTER), the file named; nothing is refused."""
    base_file = (files / "model.q8_0.gguf").resolve()
    _random_adapter(base_file, tmp_path / "adapter")
    capsys.readouterr()
    assert main(["check", str(tmp_path / "adapter"), "--for", "llama.cpp", "--for", "ollama", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["refused"] == [] and report["architecture"] == "LlamaForCausalLM"
    notes = {f["target"]: f for f in report["findings"] if str(base_file) in f["problem"]}
    assert f"llama-cli -m {base_file} --lora adapter.gguf" in notes["llama.cpp"]["fix"]
    assert "FROM that file and ADAPTER adapter.gguf" in notes["ollama"]["problem"]


def test_a_qwen3_gguf_base_gets_a_merged_ollama_export_since_ollamas_engine_refuses_adapters(tmp_path, capsys):
    """Ollama runs qwen3 on its own engine, which refuses every ADAPTER when the model loads: for a qwen3 GGUF base
    `export --format ollama` writes the merged model (FROM ./model.gguf, no adapter line) and says why, and
    `lorakit check --for ollama` says the same before anyone tries."""
    import lorakit
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from lorakit.export import write_gguf

    save_chat_llama(tmp_path / "llama")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "llama")
    torch.manual_seed(0)
    # head_dim 128 as in every Qwen3: transformers' GGUF reader takes Qwen3Config's default, not the file's
    Qwen3ForCausalLM(Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=128, vocab_size=len(tokenizer),
                                 max_position_embeddings=128)).save_pretrained(tmp_path / "qwen3")
    tokenizer.save_pretrained(tmp_path / "qwen3")
    base_file = write_gguf(tmp_path / "qwen3", tmp_path / "qwen3.gguf").resolve()
    loaded = _load(base_file)
    lorakit.wrap(loaded.model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_adapter(
        tmp_path / "adapter")
    capsys.readouterr()
    assert main(["export", "--base", str(base_file), "--adapter", str(tmp_path / "adapter"), "--format", "ollama",
                 "--out", str(tmp_path / "ollama")]) == 0
    out = capsys.readouterr().out
    assert "Ollama runs qwen3 models on its own engine" in out and "writing the merged model" in out
    assert sorted(p.name for p in (tmp_path / "ollama").iterdir()) == ["Modelfile", "model.gguf"]
    assert (tmp_path / "ollama" / "Modelfile").read_text().splitlines()[0] == "FROM ./model.gguf"
    assert main(["check", str(tmp_path / "adapter"), "--for", "ollama", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (engine,) = [f for f in report["findings"] if "own engine" in f["problem"]]
    assert "loras are not yet implemented" in engine["problem"] and str(base_file) in engine["problem"]
    assert "merged" in engine["fix"]


def test_a_files_sha256_is_computed_once_then_read_from_the_cache_index(files, cache, monkeypatch):
    """Hashing a multi-GB file on every command would cost seconds each: the sha256 is indexed in the cache by
    path, inode, size and times, read back while the file is unchanged, and computed again once it is touched."""
    import os
    from lorakit import gguf_base

    calls = []
    real = gguf_base._hash_contents
    monkeypatch.setattr(gguf_base, "_hash_contents", lambda path: calls.append(path) or real(path))
    path = files / "model.f16.gguf"
    first = gguf_base.read_gguf(path).sha256
    assert first == hashlib.sha256(path.read_bytes()).hexdigest() and len(calls) == 1
    assert gguf_base.read_gguf(path).sha256 == first and len(calls) == 1  # from the index
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched: hashed again
    assert gguf_base.read_gguf(path).sha256 == first and len(calls) == 2
    assert len(json.loads((cache / "sha256-index.json").read_text())) == 1  # the older entry replaced
