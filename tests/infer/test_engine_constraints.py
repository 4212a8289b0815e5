"""Constrained decoding in the engine: with a grammar (llguidance's, from a JSON schema) every sampled output of a
random model parses and validates, whatever the seed and temperature; an invalid grammar is refused at submit."""

from __future__ import annotations

import json

import jsonschema
import pytest

import torch
from data_helpers import build_tokenizer
from engine_support import build_lora, build_tok, prompts
from lorakit.infer import Engine, SamplingParams
from lorakit.infer.constraints import json_schema_grammar
from lorakit.infer.engine import InvalidRequest

SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "color": {"enum": ["red", "green"]}, "ok": {"type": "boolean"}},
          "required": ["answer", "color", "ok"], "additionalProperties": False}


def _full_vocab_llama():
    """A random tiny Llama over the whole test tokenizer (JSON's characters are past engine_support's 96 ids)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=len(tok), eos_token_id=tok.eos_token_id))
    return model.eval(), tok


def test_every_sampled_output_follows_the_schema():
    model, tok = _full_vocab_llama()
    grammar = json_schema_grammar(SCHEMA)
    with Engine(model, tok) as engine:
        free = [engine.submit(p, None, SamplingParams(max_tokens=40, temperature=1.0, seed=i)).result(timeout=60)
                for i, p in enumerate(prompts(6, seed=1))]
        held = [engine.submit(p, None, SamplingParams(max_tokens=40, temperature=1.0, seed=i, grammar=grammar))
                .result(timeout=60) for i, p in enumerate(prompts(6, seed=1))]
    for text, *_ in free:  # the random model alone writes no JSON, so the grammar is what makes it valid
        with pytest.raises(ValueError):
            json.loads(text)
    for text, finish, _ in held:
        jsonschema.validate(json.loads(text), SCHEMA)
        assert finish == "stop"


def test_an_invalid_grammar_is_refused_at_submit():
    lora, tok = build_lora(), build_tok()
    with Engine(lora, tok) as engine, pytest.raises(InvalidRequest, match="grammar: .*objec"):
        engine.submit(prompts(1)[0], "a", SamplingParams(grammar=json_schema_grammar({"type": "objec"})))
