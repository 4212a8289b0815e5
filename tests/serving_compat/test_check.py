"""`lorakit check` and `deploy_targets:`: adapters that a server would refuse or mishandle are named, with the
`lora:` field that fixes them, before anyone deploys (or trains) them.

Adapters are written by lorakit itself (and one by PEFT) on tiny random Llama and GPT-2 models saved to disk,
so the check reads real files: adapter_config.json, the safetensors header and the base's config.json.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit
from data_helpers import save_chat_llama
from lorakit.cli import main
from lorakit.config import run_config_from_dict
from lorakit.serving_compat import MISHANDLED, NOTE, REFUSED, AdapterFacts, check, check_run_config
from tiny_models import build_model

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 96}
GPT2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    build_model("llama").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """A one-layer Llama 128 wide, so ranks up to 128 fit its q/v projections (lorakit caps r at min(in, out))."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wide-llama")
    LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
                                 num_key_value_heads=1, vocab_size=96)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def save(llama_dir, tmp_path_factory):
    """save(name, base_dir=llama_dir, **lora options) -> an adapter directory written by lorakit. The base is
    loaded from disk, so the adapter records it as base_model_name_or_path (a local directory)."""
    def write(name: str, base_dir=None, **options):
        model = AutoModelForCausalLM.from_pretrained(base_dir or llama_dir, dtype=torch.float32)
        options.setdefault("target_modules", ["q_proj", "v_proj"])
        path = tmp_path_factory.mktemp(name)
        lorakit.wrap(model, lorakit.LoraConfig(**options)).save_adapter(path)
        return path
    return write


def _run(capsys, *args):
    capsys.readouterr()  # drop what building the adapter printed
    code = main(["check", *map(str, args)])
    return code, capsys.readouterr()


def _check(capsys, *args) -> tuple[int, str]:
    code, captured = _run(capsys, *args)
    return code, captured.out + captured.err


def _report(capsys, *args) -> tuple[int, dict]:
    code, captured = _run(capsys, *args, "--json")
    return code, json.loads(captured.out)


def _severities(report: dict, target: str) -> set[str]:
    return {f["severity"] for f in report["findings"] if f["target"] == target}


# ---- lorakit check on adapters lorakit wrote ------------------------------------------------------------
def test_plain_r8_adapter_is_clean_for_every_target(save, capsys):
    """A plain r=8 q/v adapter on a Llama base: nothing refused or mishandled anywhere; the base's architecture
    is found through the adapter's base_model_name_or_path."""
    code, report = _report(capsys, save("plain", r=8, lora_alpha=16))
    assert code == 0 and report["refused"] == []
    assert report["architecture"] == "LlamaForCausalLM"
    assert report["targets"] == {"vllm": "ok", "llama.cpp": "ok", "ollama": "ok", "peft": "note"}


def test_rank_128_is_refused_by_vllm_at_the_default_limit_and_accepted_at_128(save, wide_dir, capsys):
    adapter = save("r128", base_dir=wide_dir, r=128, lora_alpha=128)
    code, out = _check(capsys, adapter, "--for", "vllm")
    assert code == 1
    assert "LoRA rank 128 is greater than max_lora_rank 16" in out
    assert "lora.r" in out and "--max-lora-rank 128" in out  # the fix: the field, or the server flag
    code, out = _check(capsys, adapter, "--for", "vllm", "--max-lora-rank", "128")
    assert code == 0 and "no target refuses" in out


def test_rank_between_allowed_limits_needs_the_next_allowed_max_lora_rank(save, wide_dir, capsys):
    """vLLM's max_lora_rank takes only 1, 8, 16, 32, 64, 128, 256, 320, 512: r=24 needs 32, and 24 itself is
    no value vLLM accepts (a bad input: exit 2)."""
    adapter = save("r24", base_dir=wide_dir, r=24)
    code, out = _check(capsys, adapter, "--for", "vllm")
    assert code == 1 and "--max-lora-rank 32" in out
    code, out = _check(capsys, adapter, "--for", "vllm", "--max-lora-rank", "24")
    assert code == 2 and "error:" in out and "320" in out


def test_rank_pattern_ranks_count_too(save, wide_dir, capsys):
    """The largest rank in the file decides, not r: a rank_pattern layer at 32 is refused at the default 16."""
    code, out = _check(capsys, save("pattern", base_dir=wide_dir, r=8, rank_pattern={"v_proj": 32}), "--for", "vllm")
    assert code == 1 and "LoRA rank 32" in out and "mishandled" in out  # old releases scale it by alpha / r


def test_dora_is_refused_by_vllm_and_only_the_adapter_routes_of_llama_cpp_and_ollama(save, capsys):
    code, report = _report(capsys, save("dora", use_dora=True))
    assert code == 1 and report["refused"] == ["vllm"]
    vllm = [f for f in report["findings"] if f["target"] == "vllm"]
    assert any("DoRA" in f["problem"] and "lora.use_dora: false" in f["fix"] for f in vllm)
    for target, export in (("llama.cpp", "--format gguf"), ("ollama", "--format ollama")):
        notes = [f for f in report["findings"] if f["target"] == target]
        assert [f["severity"] for f in notes] == [NOTE] and export in notes[0]["fix"]


def test_trained_biases_are_refused_by_vllm(save, capsys):
    code, out = _check(capsys, save("bias", bias="all"), "--for", "vllm")
    assert code == 1 and "Adapter bias is not supported" in out and "lora.bias: none" in out


def test_modules_to_save_lm_head_is_refused_by_vllm_and_seen_in_the_tensors(save, capsys):
    adapter = save("mts", modules_to_save=["lm_head"])
    code, report = _report(capsys, adapter, "--for", "vllm", "--for", "llama.cpp")
    assert code == 1 and report["refused"] == ["vllm"]
    assert any("modules_to_save" in f["problem"] and "lora.modules_to_save" in f["fix"] for f in report["findings"])
    # The full copy is found from the weights alone, whatever the config says.
    facts = AdapterFacts(shapes={k: (1,) for k in _tensor_names(adapter)})
    assert facts.modules("copy") == ["lm_head"]
    findings = check(lorakit.LoraConfig(target_modules=["q_proj"]), ["vllm"], facts=facts, base_config=LLAMA)
    assert [f.severity for f in findings if "modules_to_save" in f.problem] == [REFUSED]


def test_gpt2_base_is_refused_by_vllm_llama_cpp_and_ollama(llama_dir, save, tmp_path_factory, capsys):
    gpt2_dir = tmp_path_factory.mktemp("gpt2")
    build_model("gpt2").save_pretrained(gpt2_dir)
    adapter = save("gpt2-adapter", base_dir=gpt2_dir, target_modules=["c_attn"])
    code, report = _report(capsys, adapter)
    assert code == 1 and report["architecture"] == "GPT2LMHeadModel"
    assert report["refused"] == ["vllm", "llama.cpp", "ollama"]
    llama_cpp = next(f for f in report["findings"] if f["target"] == "llama.cpp")
    assert "GPT2LMHeadModel" in llama_cpp["problem"] and "one of those architectures" in llama_cpp["fix"]
    # --base overrides the adapter's own base_model_name_or_path: this GPT-2 adapter does not load on a Llama
    code, out = _check(capsys, adapter, "--for", "llama.cpp", "--base", llama_dir)
    assert code == 2 and "target_modules ['c_attn'] matched no module" in out


PEFT_CASES = {  # name: (PEFT LoraConfig options, targets that refuse it)
    "plain": ({}, []),
    "dora": ({"use_dora": True}, ["vllm"]),
    # PEFT also saves the full embedding as embed_tokens.base_layer.weight: not a modules_to_save copy
    "embedding": ({"target_modules": ["q_proj", "embed_tokens"]}, []),
}


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning")
def test_a_peft_written_adapter_is_checked_the_same_way(llama_dir, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    for name, (extra, refused) in PEFT_CASES.items():
        model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
        options = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **extra}
        peft.get_peft_model(model, peft.LoraConfig(**options)).save_pretrained(tmp_path / name)
        code, report = _report(capsys, tmp_path / name, "--base", llama_dir)
        assert report["refused"] == refused and code == (1 if refused else 0), name
        assert "peft" in report["targets"]


# ---- rules on configs alone -----------------------------------------------------------------------------
def test_rules_that_depend_on_the_architecture():
    qwen2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
    gemma2 = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2"}
    embed = lorakit.LoraConfig(target_modules=["q_proj", "embed_tokens"])
    # vLLM's Qwen2 takes no LoRA on embeddings; its Llama does.
    assert [f.severity for f in check(embed, ["vllm"], base_config=qwen2)] == [REFUSED]
    assert check(embed, ["vllm"], base_config=LLAMA) == []
    # Ollama's ADAPTER reads lora_alpha as an integer: 16.0 is refused there; lorakit's export (Llama, Gemma 2)
    # avoids it, and a base lorakit cannot export has no way around it.
    float_alpha = lorakit.LoraConfig(target_modules=["q_proj"], lora_alpha=16.0)
    assert [f.severity for f in check(float_alpha, ["ollama"], base_config=gemma2)] == [NOTE]
    assert [f.severity for f in check(float_alpha, ["ollama"], base_config=LLAMA)] == [NOTE]
    assert REFUSED in {f.severity for f in check(float_alpha, ["ollama"], base_config=GPT2)}
    # Ollama runs qwen3 and gemma3 on its own engine, which refuses adapters: only the merged export works there.
    findings = check(lorakit.LoraConfig(target_modules=["q_proj"]), ["ollama"],
                     base_config={"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"})
    assert REFUSED not in {f.severity for f in findings}
    (engine,) = [f for f in findings if "own engine" in f.problem]
    assert engine.severity == NOTE and "loras are not yet implemented" in engine.problem and "merged" in engine.fix
    assert check(lorakit.LoraConfig(target_modules=["q_proj"], lora_alpha=16), ["ollama"], base_config=gemma2) == []
    # Without a base config the architecture rules are skipped, and said so.
    assert {f.severity for f in check(lorakit.LoraConfig(), ["vllm", "llama.cpp", "ollama"])} == {NOTE}


def test_rslora_and_alpha_pattern_are_mishandled_by_one_alpha_gguf_converters():
    rs = lorakit.LoraConfig(target_modules=["q_proj"], use_rslora=True)
    findings = check(rs, ["llama.cpp", "ollama"], base_config=LLAMA)
    assert [(f.target, f.severity) for f in findings] == [("llama.cpp", MISHANDLED), ("ollama", MISHANDLED)]
    assert all("lora-gguf" in f.fix for f in findings)
    assert check(lorakit.LoraConfig(target_modules=["q_proj"], rank_pattern={"q_proj": 4}), ["llama.cpp"],
                 base_config=LLAMA) == []  # llama.cpp reads each layer's rank from its tensor


def test_a_rank_no_vllm_limit_allows_says_to_lower_r():
    finding, = check(lorakit.LoraConfig(r=600, target_modules=["q_proj"]), ["vllm"], base_config=LLAMA)
    assert finding.severity == REFUSED and "LoRA rank 600" in finding.problem
    assert "to 512 or less with vLLM started with --max-lora-rank 512" in finding.fix


# ---- bad inputs ---------------------------------------------------------------------------------------
def test_bad_inputs_are_errors_with_hints(tmp_path, capsys):
    code, out = _check(capsys, tmp_path / "missing")
    assert code == 2 and "error:" in out and "not a directory" in out and "hint:" in out
    (tmp_path / "empty").mkdir()
    code, out = _check(capsys, tmp_path / "empty")
    assert code == 2 and "no adapter_config.json" in out
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    code, out = _check(capsys, tmp_path / "bad")
    assert code == 2 and "not valid JSON" in out
    with pytest.raises(SystemExit):
        main(["check", str(tmp_path), "--for", "tgi"])


def test_a_pickled_adapter_is_refused_without_unpickling_it(save, tmp_path, monkeypatch, capsys):
    adapter = save("pickled")
    (tmp_path / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    (tmp_path / "adapter_model.bin").write_bytes(b"not even a pickle")

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", no_load)
    code, out = _check(capsys, tmp_path)
    assert code == 2 and "safetensors only" in out


def test_a_corrupt_weights_file_is_an_error(save, tmp_path, capsys):
    adapter = save("corrupt")
    (tmp_path / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\xff" * 16)
    code, out = _check(capsys, tmp_path)
    assert code == 2 and "not a valid safetensors file" in out


# ---- deploy_targets in the run config ---------------------------------------------------------------------
def _raw(**extra) -> dict:
    return {"model": {"name_or_path": "some/hub-id"}, "data": {"train": "train.jsonl"}, **extra}


def test_deploy_targets_are_validated_with_the_allowed_list():
    assert run_config_from_dict(_raw()).deploy_targets == []
    assert run_config_from_dict(_raw(deploy_targets=["vllm", "ollama"])).deploy_targets == ["vllm", "ollama"]
    for bad in (["vlm"], "vllm"):
        with pytest.raises(lorakit.ConfigError) as err:
            run_config_from_dict(_raw(deploy_targets=bad))
        assert "deploy_targets" in str(err.value) and "vllm, llama.cpp, ollama, peft" in str(err.value)


def test_mishandled_options_are_logged_and_do_not_stop_the_run():
    logged: list[str] = []
    config = run_config_from_dict(_raw(deploy_targets=["llama.cpp"], lora={"use_rslora": True}))
    findings = check_run_config(config, logged.append)
    assert [f.severity for f in findings if f.target == "llama.cpp"] == [NOTE, MISHANDLED]  # hub id: arch unknown
    assert any("mishandled" in line and "rsLoRA" in line for line in logged)


def test_train_stops_before_loading_the_model_when_vllm_would_refuse(tmp_path, monkeypatch, capsys):
    model_dir = save_chat_llama(tmp_path / "base")
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n")
    (tmp_path / "run.yaml").write_text(f"""\
model: {{name_or_path: {model_dir}, dtype: float32}}
lora: {{r: 128, lora_alpha: 128, target_modules: [q_proj, v_proj]}}
data: {{train: {tmp_path / "train.jsonl"}}}
train: {{max_steps: 1}}
deploy_targets: [vllm]
output_dir: {tmp_path / "run"}
""")

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load when a deploy target refuses the adapter")

    monkeypatch.setattr("lorakit.recipes.sft.load_base_model", no_load)
    assert main(["train", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err
    assert "vllm would refuse" in err and "LoRA rank 128" in err
    assert "lora.r" in err and "--max-lora-rank 128" in err and "deploy_targets" in err
    assert not (tmp_path / "run").exists()


def _tensor_names(adapter) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        return list(f.keys())


# ---- the loader's own checks ----------------------------------------------------------------------------
V_B = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


def _edit_weights(adapter, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))


def _rename(tensors, old, new):
    tensors[new] = tensors.pop(old)


BAD_ADAPTERS = {  # name: edit of the tensors; each is refused by lorakit.load_adapter
    "missing_tensor": lambda t: t.pop(V_B),
    "extra_tensor": lambda t: t.__setitem__(V_B.replace("v_proj", "k_proj"), torch.zeros(16, 8)),
    "int32_weights": lambda t: t.__setitem__(V_B, t[V_B].to(torch.int32)),
    "lora_B_of_the_wrong_shape": lambda t: t.__setitem__(V_B, torch.zeros(32, 8)),  # v_proj has 16 outputs
    "path_traversal_name": lambda t: _rename(t, V_B, "base_model.model.model.layers.1/../../../etc.lora_B.weight"),
    "nan_values": lambda t: t[V_B].fill_(float("nan")),
}


@pytest.mark.parametrize("base_given", [False, True], ids=["base_from_adapter_config", "base_flag"])
@pytest.mark.parametrize("case", BAD_ADAPTERS)
def test_an_adapter_the_loader_refuses_is_bad_input_with_the_loaders_message(case, base_given, save, llama_dir,
                                                                            tmp_path, capsys):
    """`lorakit check` said "ok" to these; now it runs the loader's checks (names, dtypes and shapes against
    the base built on the meta device from its config.json, values) and exits 2 with the loader's message.
    The base directory holds its config.json only: no base weight is needed (or read)."""
    adapter = save(f"bad-{case}")
    _edit_weights(adapter, BAD_ADAPTERS[case])
    with pytest.raises(lorakit.AdapterError) as loader:
        lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32), adapter)
    config_only = tmp_path / "base-config-only"
    config_only.mkdir()
    (config_only / "config.json").write_bytes((llama_dir / "config.json").read_bytes())
    if base_given:
        _set_config(adapter, base_model_name_or_path="org/a-hub-id")  # never downloaded: --base gives the base
    else:
        _set_config(adapter, base_model_name_or_path=str(config_only))
    code, out = _check(capsys, adapter, *(["--base", config_only] if base_given else []))
    assert code == 2 and "Traceback" not in out
    assert f"error: {loader.value}" in out


def _set_config(adapter, **changes) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_nan_lora_alpha_is_bad_input_not_a_crash(save, capsys):
    """`lorakit check` crashed on NaN alpha (`cannot convert float NaN to integer`, in the Ollama rule)."""
    adapter = save("nan-alpha")
    path = adapter / "adapter_config.json"
    path.write_text(path.read_text().replace('"lora_alpha": 8', '"lora_alpha": NaN'))
    code, out = _check(capsys, adapter)
    assert code == 2 and "lora_alpha is NaN" in out and str(path) in out and "hint:" in out


def test_without_a_base_names_dtypes_and_values_are_still_checked(save, capsys):
    """With no base at hand (a hub id), shapes cannot be checked, and the report says so; the checks that need
    no base still run."""
    adapter = save("no-base")
    _set_config(adapter, base_model_name_or_path="org/a-hub-id")
    code, report = _report(capsys, adapter)
    assert code == 0 and "shapes not checked against a base (pass --base)" in report["tensors"]
    _edit_weights(adapter, lambda t: _rename(t, V_B, "base_model.model.model/../../x.lora_B.weight"))
    code, out = _check(capsys, adapter)
    assert code == 2 and "is not PEFT's form" in out
