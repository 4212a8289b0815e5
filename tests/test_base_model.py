"""Loading a base model from a local directory (the real from_pretrained path), device and dtype choice."""

from __future__ import annotations

import pytest
import torch

from tiny_models import build_model
from lorakit import ConfigError
from lorakit.base_model import cpu_has_bf16_matmul, load_base_model, pick_dtype, pick_device
from lorakit.config import ModelConfig


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["hello world", "low rank adaptation"] * 4,
                            trainers.BpeTrainer(vocab_size=90, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


@pytest.fixture
def saved_model(tmp_path):
    model = build_model("llama")
    model.save_pretrained(tmp_path / "tiny")
    _tokenizer().save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny", model


def test_loads_a_saved_directory_with_the_same_weights(saved_model):
    path, original = saved_model
    loaded = load_base_model(ModelConfig(name_or_path=str(path), dtype="float32", device="cpu"))
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, original(ids).logits, rtol=0, atol=0)
    assert loaded.tokenizer.pad_token == "</s>"  # no pad token in the files: eos stands in
    assert "float32 on cpu" in loaded.describe()


def test_auto_dtype_follows_the_cpu():
    expected = torch.bfloat16 if cpu_has_bf16_matmul() else torch.float32
    assert pick_dtype("auto", torch.device("cpu")) == expected
    assert pick_dtype("float32", torch.device("cpu")) == torch.float32


def test_auto_device_is_cpu_without_accelerators():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert pick_device("auto").type in ("cpu", "mps")
    with pytest.raises(ConfigError, match="not available"):
        pick_device("cuda")


def test_a_directory_without_config_json_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json there"):
        load_base_model(ModelConfig(name_or_path=str(tmp_path / "empty")))
