"""The CLI in-process: `lorakit.cli.main([...])` on a tiny model saved to disk, as a user would run it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit
from data_helpers import save_chat_llama, save_random_adapter
from lorakit.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama with a real (in-process trained) tokenizer and chat template, saved like a hub model."""
    return save_chat_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    return save_random_adapter(model_dir, tmp_path_factory.mktemp("adapter"))


def _adapted(model_dir, adapter_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return lorakit.load_adapter(model, adapter_dir)


def test_merge_writes_a_plain_transformers_model_with_the_adapted_outputs(model_dir, adapter_dir, tmp_path):
    out = tmp_path / "merged"
    code = main(["merge", "--model", str(model_dir), "--adapter", str(adapter_dir), "--out", str(out),
                 "--dtype", "float32", "--max-shard-size", "20KB"])
    assert code == 0
    assert (out / "model.safetensors.index.json").is_file()  # sharded, with an index
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        expected = _adapted(model_dir, adapter_dir)(input_ids=ids).logits
        assert not torch.allclose(expected, base(ids).logits, atol=1e-4), "adapter had no effect"
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no staging directory left behind


def test_merge_refuses_to_overwrite_and_says_how(model_dir, adapter_dir, tmp_path, capsys):
    (tmp_path / "merged").mkdir()
    code = main(["merge", "--model", str(model_dir), "--adapter", str(adapter_dir), "--out", str(tmp_path / "merged")])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "already exists" in err and "--overwrite" in err


def test_generate_streams_the_adapted_models_greedy_completion(model_dir, adapter_dir, capsys):
    from transformers import AutoTokenizer

    code = main(["generate", "hello world", "--model", str(model_dir), "--adapter", str(adapter_dir),
                 "--max-new-tokens", "6", "--dtype", "float32"])
    assert code == 0
    printed = capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("hello world", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = _adapted(model_dir, adapter_dir).generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                       max_new_tokens=6, do_sample=False,
                                                       pad_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert printed.strip() == expected.strip()


def test_chat_applies_the_template_and_quits_on_eof(model_dir, adapter_dir, monkeypatch, capsys):
    answers = iter(["hi there"])

    def fake_input(prompt=""):
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    code = main(["chat", "--model", str(model_dir), "--adapter", str(adapter_dir), "--max-new-tokens", "4",
                 "--dtype", "float32", "--system", "be brief"])
    assert code == 0


def test_bad_adapter_path_is_an_error_with_a_hint(model_dir, tmp_path, capsys):
    code = main(["generate", "x", "--model", str(model_dir), "--adapter", str(tmp_path / "missing")])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "not a directory" in err and "hint:" in err


def test_train_help_documents_every_config_field(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    from dataclasses import fields

    from lorakit.config import DataConfig, ModelConfig, QuantizationConfig, TrainConfig

    for cls in (ModelConfig, QuantizationConfig, DataConfig, TrainConfig, lorakit.LoraConfig):
        for f in fields(cls):
            assert f"  {f.name}:" in text, f"{cls.__name__}.{f.name} missing from --help"


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_python_dash_m_lorakit_runs():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "lorakit", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "train" in done.stdout


def _write_chat_data(path, n, seed):
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                             {"role": "assistant", "content": f"It is {a + b}."}]}) + "\n")


@pytest.fixture
def run_config(model_dir, tmp_path):
    _write_chat_data(tmp_path / "train.jsonl", 48, seed=0)
    _write_chat_data(tmp_path / "val.jsonl", 8, seed=1)
    config = tmp_path / "run.yaml"
    config.write_text(f"""\
model:
  name_or_path: {model_dir}
  dtype: float32
lora:
  r: 4
  lora_alpha: 8
  target_modules: [q_proj, k_proj, v_proj, o_proj]
data:
  train: {tmp_path / "train.jsonl"}
  validation: {tmp_path / "val.jsonl"}
  format: auto
  max_seq_len: 64
train:
  max_steps: 8
  batch_size: 4
  lr: 5.0e-3
  seed: 0
  eval_every: 4
  save_every: 4
output_dir: {tmp_path / "run"}
""")
    return config


def test_train_then_eval_through_the_cli(run_config, tmp_path, capsys):
    """`lorakit train run.yaml` writes the adapter, metrics and state; `lorakit eval run.yaml --json` scores it,
    and the trained adapter scores better than the base model on the validation data."""
    import json

    assert main(["train", str(run_config)]) == 0
    out = tmp_path / "run"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    assert any("eval_loss" in r for r in rows)
    json.loads((out / "trainer_state.json").read_text())
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the loss curve, train and validation
    capsys.readouterr()

    assert main(["eval", str(run_config), "--json"]) == 0
    adapted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(adapted) == {"loss", "perplexity", "tokens"} and adapted["tokens"] > 0
    model_dir = run_config.read_text().split("name_or_path: ")[1].split("\n")[0]
    assert main(["eval", "--model", model_dir, "--data", str(tmp_path / "val.jsonl"), "--json",
                 "--dtype", "float32"]) == 0
    base = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert adapted["loss"] < base["loss"]


def test_bad_data_stops_the_run_naming_file_and_line(run_config, tmp_path, capsys):
    with open(tmp_path / "train.jsonl", "a") as f:
        f.write('{"messages": [oops\n')
    assert main(["train", str(run_config)]) == 2
    err = capsys.readouterr().err
    assert "train.jsonl:49:" in err and "hint:" in err


def test_bad_config_value_is_reported_before_loading_anything(run_config, capsys):
    assert main(["train", str(run_config), "--set", "train.batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size: must be a positive integer" in err and "hint:" in err


def test_tensorboard_logs_are_written_when_asked(run_config, tmp_path):
    """train.tensorboard: true writes event files with the train and eval scalars."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["train", str(run_config), "--set", "train.tensorboard=true", "--set", "train.max_steps=4"]) == 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "eval/loss"} <= set(tags)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_quickstart_runs_every_stage_offline(tmp_path, capsys):
    """`lorakit quickstart` on the shipped model and data: before answers, training with evaluation, after
    answers, a merged model that loads with plain transformers. (A few steps here; the real run is longer.)"""
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--steps", "4"]) == 0
    printed = capsys.readouterr().out
    for stage in ("1/4", "2/4", "3/4", "4/4", "validation loss:", "before:", "after:"):
        assert stage in printed
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "qs" / "merged")
    assert merged.config.model_type == "llama"
    assert (tmp_path / "qs" / "adapter" / "adapter_config.json").is_file()
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--steps", "4"]) == 2  # never over the earlier run
    assert "--overwrite" in capsys.readouterr().err


def test_train_with_packing_and_gradient_checkpointing(run_config, tmp_path):
    """The memory and padding levers run through the real workflow: packed rows and checkpointed layers train
    the adapter (finite, falling loss) and save it."""
    import json

    assert main(["train", str(run_config), "--set", "data.packing=true", "--set", "train.gradient_checkpointing=true",
                 "--set", "train.max_steps=6", "--set", "train.eval_every=null"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and all(loss == loss for loss in losses)  # no NaN
    assert losses[-1] < losses[0]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_qlora_train_eval_and_merge_through_the_cli(run_config, tmp_path, capsys):
    """A 4-bit run end to end: train with model.quantization, eval on the same 4-bit base, then merge into a
    16-bit model that plain transformers loads and that computes what the 4-bit base + adapter computes."""
    import json

    pytest.importorskip("bitsandbytes")
    from lorakit.base_model import load_base_model
    from lorakit.config import ModelConfig, QuantizationConfig

    assert main(["train", str(run_config), "--set", "model.quantization={bits: 4, type: nf4}",
                 "--set", "model.adapter_dtype=bfloat16"]) == 0
    printed = capsys.readouterr().out
    assert "4-bit NF4 + double quantization" in printed
    adapter = tmp_path / "run" / "adapter"
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(adapter / "adapter_model.safetensors").values()} == {torch.bfloat16}
    model_dir = run_config.read_text().split("name_or_path: ")[1].split("\n")[0]
    assert main(["eval", "--model", model_dir, "--adapter", str(adapter), "--data", str(tmp_path / "val.jsonl"),
                 "--json", "--dtype", "float32", "--quantize", "4"]) == 0
    adapted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", "--model", model_dir, "--data", str(tmp_path / "val.jsonl"), "--json", "--dtype", "float32",
                 "--quantize", "4"]) == 0
    base = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert adapted["loss"] < base["loss"]

    out = tmp_path / "merged"
    assert main(["merge", "--model", model_dir, "--adapter", str(adapter), "--out", str(out), "--dtype", "float32",
                 "--quantize", "4"]) == 0
    assert "Quantizing it again rounds the adapter" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    quantized = load_base_model(ModelConfig(name_or_path=model_dir, dtype="float32", device="cpu",
                                            quantization=QuantizationConfig(bits=4))).model
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        expected = lorakit.load_adapter(quantized, adapter).eval()(input_ids=ids).logits
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)


# ---- eval never prints invalid JSON --------------------------------------------------------------------------
def _strict_json(text: str):
    import json

    return json.loads(text, parse_constant=lambda token: pytest.fail(f"invalid JSON token {token}"))


def test_eval_fails_on_a_non_finite_loss_instead_of_printing_nan(model_dir, tmp_path, capsys):
    """A model whose logits are NaN made `eval --json` print {"loss": NaN, ...} (not JSON) and exit 0."""
    import shutil

    broken = tmp_path / "nan-model"
    shutil.copytree(model_dir, broken)
    model = AutoModelForCausalLM.from_pretrained(broken, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")  # every logit row gets NaN in one entry
    model.save_pretrained(broken)
    _write_chat_data(tmp_path / "val.jsonl", 4, seed=1)
    capsys.readouterr()
    code = main(["eval", "--model", str(broken), "--data", str(tmp_path / "val.jsonl"), "--json", "--dtype", "float32"])
    captured = capsys.readouterr()
    assert code == 2
    assert "NaN" not in captured.out and "nan" not in captured.out.lower().replace("nan-model", "")
    assert "error: the loss is nan" in captured.err and "non-finite logits" in captured.err
    # and a healthy model's report is strict JSON
    assert main(["eval", "--model", str(model_dir), "--data", str(tmp_path / "val.jsonl"), "--json",
                 "--dtype", "float32"]) == 0
    report = _strict_json(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["tokens"] > 0 and report["loss"] > 0


# ---- merge: --overwrite replaces only an earlier merge; the dtype is the checkpoint's -------------------------
def _merge(model_dir, adapter_dir, out, *extra):
    return main(["merge", "--model", str(model_dir), "--adapter", str(adapter_dir), "--out", str(out), *extra])


def test_merge_overwrite_replaces_an_earlier_merge_and_nothing_else(model_dir, adapter_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert _merge(model_dir, adapter_dir, out, "--dtype", "float32") == 0
    marker = __import__("json").loads((out / "lorakit_merge.json").read_text())
    assert marker["adapter"] == str(adapter_dir) and marker["dtype"] == "float32"
    assert set(marker["files"]) | {"lorakit_merge.json"} == {p.name for p in out.iterdir()}
    assert _merge(model_dir, adapter_dir, out, "--dtype", "bfloat16", "--overwrite") == 0  # an earlier merge
    assert __import__("json").loads((out / "lorakit_merge.json").read_text())["dtype"] == "bfloat16"

    (out / "notes.txt").write_text("mine")  # a file the merge did not write: now the directory is not replaceable
    capsys.readouterr()
    assert _merge(model_dir, adapter_dir, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "would be lost" in err and "new --out" in err
    assert (out / "notes.txt").read_text() == "mine"

    mine = tmp_path / "my-project"  # any directory of the user's, a model directory included
    (mine / "src").mkdir(parents=True)
    (mine / "config.json").write_text("{}")
    assert _merge(model_dir, adapter_dir, mine, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "config.json, src/" in err and "no lorakit_merge.json" in err
    assert (mine / "config.json").read_text() == "{}" and (mine / "src").is_dir()

    assert _merge(model_dir, adapter_dir, model_dir, "--overwrite") == 2  # the base itself
    assert "is (or holds) the input" in capsys.readouterr().err
    assert (model_dir / "config.json").is_file()


def test_merge_of_a_float32_base_is_float32_with_the_adapted_logits(model_dir, adapter_dir, tmp_path, monkeypatch):
    """--dtype auto picked the compute dtype: bf16 on CPUs with bf16 units (forced here), so a float32 base came
    out bf16 with logits ~3e-3 off. Now auto is the checkpoint's dtype, merged in float32 and rounded once."""
    from safetensors import safe_open

    monkeypatch.setattr("lorakit.base_model.cpu_has_bf16_matmul", lambda: True)
    out = tmp_path / "merged"
    assert _merge(model_dir, adapter_dir, out) == 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.float32
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        expected = _adapted(model_dir, adapter_dir)(input_ids=ids).logits
        torch.testing.assert_close(merged(ids).logits, expected, rtol=0, atol=1e-5)


def test_export_overwrite_replaces_only_gguf_files_and_ollama_directories(model_dir, adapter_dir, tmp_path, capsys):
    """Refused before any model loads; an earlier export is replaced (export/outputs.py rules)."""
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("my notes")
    code = main(["export", "--model", str(model_dir), "--adapter", str(adapter_dir), "--format", "gguf",
                 "--out", str(not_gguf), "--overwrite"])
    assert code == 2 and "model.gguf (not a GGUF file)" in capsys.readouterr().err
    assert not_gguf.read_text() == "my notes"
    from lorakit.export.outputs import check_out

    gguf_file = tmp_path / "old.gguf"
    gguf_file.write_bytes(b"GGUF\x03\x00\x00\x00")
    check_out(gguf_file, "gguf", overwrite=True)  # an earlier export: replaceable
    ollama = tmp_path / "ollama"
    ollama.mkdir()
    (ollama / "Modelfile").write_text("FROM ./model.gguf\n")
    (ollama / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    check_out(ollama, "ollama", overwrite=True)
    (ollama / "params.txt").write_text("mine")
    code = main(["export", "--model", str(model_dir), "--adapter", str(adapter_dir), "--format", "ollama",
                 "--out", str(ollama), "--overwrite"])
    assert code == 2 and "params.txt" in capsys.readouterr().err
    assert sorted(p.name for p in ollama.iterdir()) == ["Modelfile", "model.gguf", "params.txt"]
