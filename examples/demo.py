"""A two-minute tour of the lorakit Python API on a tiny model, offline, on a CPU.

1. build a small Llama-shaped model from a config (random weights; no download),
2. wrap it with a LoRA adapter and train a few steps on a toy task,
3. save the adapter in PEFT's format and load it back,
4. merge the adapter into the weights and check merged output == unmerged output.

Run: python examples/demo.py
"""

from __future__ import annotations

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit


def toy_batch(batch_size: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    # Task: each sequence counts upward from a random start (mod vocab). A random model can't predict
    # the next token; a few LoRA steps teach it.
    start = torch.randint(0, vocab, (batch_size, 1), generator=generator)
    return (start + torch.arange(length)) % vocab


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=64, max_position_embeddings=64)
    model = LlamaForCausalLM(config)

    lora = lorakit.wrap(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    print(lora.trainable_parameters())

    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    lora.train()
    for step in range(1, 31):
        batch = toy_batch(16, 24, config.vocab_size, generator)
        loss = lora(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    lora.eval()

    probe = toy_batch(4, 24, config.vocab_size, torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = lora(input_ids=probe).logits
        with lora.disable_adapters():
            base = lora(input_ids=probe).logits

    with tempfile.TemporaryDirectory() as directory:
        lora.save_adapter(directory)  # adapter_config.json + adapter_model.safetensors (PEFT layout)
        lora.load_adapter(directory, adapter_name="reloaded")
        lora.set_adapter("reloaded")
        with torch.no_grad():
            reloaded = lora(input_ids=probe).logits
    lora.set_adapter("default")

    merged_model = lora.merge_and_unload()  # a plain transformers model again
    with torch.no_grad():
        merged = merged_model(input_ids=probe).logits

    print(f"adapter changes the output by    {(adapted - base).abs().max().item():.4f} (max |logit diff| vs base)")
    print(f"saved -> loaded adapter differs  {(reloaded - adapted).abs().max().item():.2e}")
    print(f"merged vs unmerged output differs {(merged - adapted).abs().max().item():.2e}")
    assert torch.allclose(merged, adapted, atol=1e-4), "merged output must equal unmerged output"
    print("ok: merged output equals unmerged output")


if __name__ == "__main__":
    main()
