"""`lorakit verify`: each export of an adapter asked the same prompts and records as lorakit with the adapter
unmerged. The reference's perplexity is `lorakit eval`'s; the float32 merge agrees exactly; llama.cpp runs the
GGUF files (f16 close, q8_0 within its rounding); on a GGUF base the adapter runs on the user's own file."""

from __future__ import annotations

import json
import math

import pytest

from data_helpers import save_chat_llama, save_random_adapter
from lorakit.cli.main import main

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    save_chat_llama(root / "model")
    save_random_adapter(root / "model", root / "adapter", targets=("q_proj", "v_proj", "o_proj", "gate_proj"),
                        scale=0.5)
    with open(root / "val.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i + 1}?"},
                                             {"role": "assistant", "content": f"It is {2 * i + 1}."}]}) + "\n")
    return root


def _verify(capsys, *args):
    capsys.readouterr()
    assert main(["verify", *map(str, args), "--limit", "6", "--max-new-tokens", "8", "--json"]) == 0
    return {f["name"]: f for f in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["formats"]}


def test_each_format_against_lorakit(setup, capsys):
    formats = _verify(capsys, "--model", setup / "model", "--adapter", setup / "adapter", "--data",
                      setup / "val.jsonl", "--quants", "f16,q8_0")
    assert list(formats) == ["lorakit", "hf", "gguf-f16", "gguf-q8_0", "lora-gguf on base f16"]
    assert main(["eval", "--model", str(setup / "model"), "--adapter", str(setup / "adapter"), "--data",
                 str(setup / "val.jsonl"), "--json"]) == 0
    loss = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]
    reference = formats["lorakit"]
    assert reference["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)  # the tokens training scores
    assert all(f["tokens"] == reference["tokens"] for f in formats.values())
    assert formats["hf"]["same_answer"] == 1.0 and formats["hf"]["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-5)
    for name, tolerance in (("gguf-f16", 1e-3), ("lora-gguf on base f16", 1e-3), ("gguf-q8_0", 1e-2)):
        assert formats[name]["perplexity"] == pytest.approx(reference["perplexity"], rel=tolerance), name
        assert formats[name]["same_prefix"] > 0.5, name
    assert formats["gguf-f16"]["bytes"] > formats["gguf-q8_0"]["bytes"]


def test_on_a_gguf_base_the_adapter_runs_on_the_users_own_file(setup, tmp_path, capsys, monkeypatch):
    from lorakit.export import write_gguf

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    base = write_gguf(setup / "model", tmp_path / "base.q8_0.gguf", quant="q8_0")
    adapter = tmp_path / "adapter"  # made on the GGUF base, as training on it would
    import lorakit
    from lorakit.base_model import load_base_model
    from lorakit.config import ModelConfig
    from tiny_models import randomize_lora

    lora = lorakit.wrap(load_base_model(ModelConfig(name_or_path=str(base), dtype="float32")).model,
                        lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(lora, scale=0.5)
    lora.save_adapter(adapter)
    formats = _verify(capsys, "--model", base, "--adapter", adapter, "--data", setup / "val.jsonl", "--quants", "")
    assert list(formats) == ["lorakit", "hf", "lora-gguf on base.q8_0.gguf"]
    # llama.cpp on the q8_0 file the adapter was made on (it also rounds activations to 8 bits)
    assert formats["lora-gguf on base.q8_0.gguf"]["perplexity"] == pytest.approx(formats["lorakit"]["perplexity"],
                                                                                 rel=1e-2)


def test_bad_options_are_refused_before_any_work(setup, tmp_path, capsys):
    common = ["verify", "--model", str(setup / "model"), "--adapter", str(setup / "adapter"), "--data",
              str(setup / "val.jsonl")]
    assert main([*common, "--quants", "f16,q3"]) == 2
    assert "--quants q3: choose from f16, q8_0, q4_0" in capsys.readouterr().err
    (tmp_path / "kept").mkdir()
    assert main([*common, "--keep", str(tmp_path / "kept")]) == 2
    assert "exists; name a new directory (nothing is overwritten)" in capsys.readouterr().err
