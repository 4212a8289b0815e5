"""Tiny random-initialised models built from transformers configs: CPU only, no network, seeded.

A plain module (not conftest.py) so test files import it by name wherever they live.
"""

from __future__ import annotations

import torch

VOCAB = 96


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                        tie_word_embeddings=False))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, tie_word_embeddings=False))


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, vocab_size=VOCAB, num_labels=3,
                                                    max_position_embeddings=64))


def _mixtral():
    """Mixture of experts, 4 experts, top 2, fused as transformers keeps them now: mlp.experts.gate_up_proj
    (experts, 2 x intermediate, hidden) and mlp.experts.down_proj (experts, hidden, intermediate)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                            max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2))


def _qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(Qwen3MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              head_dim=8, vocab_size=VOCAB, max_position_embeddings=64, num_experts=4,
                                              num_experts_per_tok=2, tie_word_embeddings=False))


BUILDERS = {"llama": _llama, "qwen2": _qwen2, "mistral": _mistral, "gpt2": _gpt2, "bert": _bert,
            "mixtral": _mixtral, "qwen3_moe": _qwen3_moe}


def build_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model of `family` with seeded random weights, in eval mode (dropout off)."""
    torch.manual_seed(seed)
    return BUILDERS[family]().eval()


def randomize_lora(lora_model, seed: int = 1, scale: float = 0.1) -> None:
    """Give every adapter weight (A, B, DoRA magnitude) random values: a fresh adapter has B = 0 and proves nothing."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_model.named_parameters():
            if ".lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
