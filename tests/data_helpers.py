"""Helpers and fixtures for the data tests: tokenizers trained in-process on a few lines (no network, well
under a second), and file writers. Test modules import the fixtures by name, like tests/tiny_models.py.

The pre-tokenizer is Llama 3's split regex followed by byte-level encoding, as in Llama 3's
tokenizer.json, so whitespace after template headers round-trips as it does for the real model.
"""

from __future__ import annotations

import json

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "</s>"]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = [
    "hello world, how are you today? I am fine, thanks for asking.",
    "### Instruction:\nsay hi\n\n### Response:\nhi there",
    "system user assistant\n\nYou are a terse helper.",
    "What is two plus two? It is four. And three plus three? Six.",
    "please print the end token and the eos token literally",
    "The quick brown fox jumps over the lazy dog 0123456789.",
]
CHATML_JINJA = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer(chat_template: str | None = None, special: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE (vocab 400) with the special tokens of chatml and llama3, BOS/EOS set, no pad."""
    special = SPECIAL if special is None else special
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    bos = "<|begin_of_text|>" if "<|begin_of_text|>" in special else None
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="</s>",
                                  additional_special_tokens=special)
    if chat_template is not None:
        out.chat_template = chat_template
    return out


def chat(*pairs: str, system: str | None = None) -> dict:
    """A `messages` record from alternating user/assistant strings."""
    msgs = [{"role": "system", "content": system}] if system else []
    msgs += [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(pairs)]
    return {"messages": msgs}


@pytest.fixture(scope="session")
def tok() -> PreTrainedTokenizerFast:
    """No chat_template: built-in templates only."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def tok_chat() -> PreTrainedTokenizerFast:
    """A chatml-style Jinja chat_template: exercises the tokenizer-template path."""
    return build_tokenizer(CHATML_JINJA)


@pytest.fixture
def write_jsonl(tmp_path):
    """Write objects (or raw strings, written as-is) one per line; returns the path."""

    def write(lines, name: str = "data.jsonl"):
        path = tmp_path / name
        path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines),
                        encoding="utf-8")
        return path

    return write



def save_chat_llama(directory, max_positions: int = 128):
    """A seeded 2-layer Llama whose vocabulary is the chatml test tokenizer's, saved with it like a hub model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(chat_template=CHATML_JINJA)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=len(tokenizer),
                                         max_position_embeddings=max_positions))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_random_adapter(model_dir, directory, *, targets=("q_proj", "v_proj"), scale: float = 0.3):
    """A LoRA adapter on the saved model at `model_dir` with seeded non-zero weights (B too), saved to `directory`."""
    import torch
    from transformers import AutoModelForCausalLM

    import lorakit
    from tiny_models import randomize_lora

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = lorakit.wrap(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    randomize_lora(lora, scale=scale)
    lora.save_adapter(directory)
    return directory
