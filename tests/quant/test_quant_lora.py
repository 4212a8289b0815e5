"""LoRA on a 4-bit / 8-bit base (QLoRA): training, adapter files across bases, merging, the CPU repacking trap."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from tiny_models import VOCAB, build_model, randomize_lora
from data_helpers import build_tokenizer
from lorakit import AdapterError, ConfigError
from lorakit.base_model import load_base_model
from lorakit.config import ModelConfig, QuantizationConfig
from lorakit.lora import LoraConfig, load_adapter, wrap
from lorakit.quant import is_quantized_linear

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ql") / "llama"
    build_model("llama").save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def _base(path, bits=4, dtype="float32"):
    quantization = QuantizationConfig(bits=bits) if bits else None
    return load_base_model(ModelConfig(name_or_path=str(path), dtype=dtype, device="cpu", quantization=quantization)).model


def _ids(seed=0):
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def _quantized_tensors(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items() if "lora_" not in n}


@pytest.mark.parametrize("bits", [4, 8])
def test_a_training_step_moves_only_the_adapter(llama_dir, bits):
    lora = wrap(_base(llama_dir, bits), LoraConfig(r=4, target_modules=TARGETS))
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = _quantized_tensors(lora)
    lora.train()
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids()
    first = lora(input_ids=ids, labels=ids).loss
    first.backward()
    # B starts at 0, so only B has a gradient on the first step; every layer's B must get one.
    assert all(p.grad.abs().sum() > 0 for n, p in lora.named_parameters() if ".lora_B." in n)
    optimizer.step()
    after = _quantized_tensors(lora)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)  # packed 4-bit / int8 storage untouched
    assert lora(input_ids=ids, labels=ids).loss < first


def test_an_evaluation_pass_does_not_cut_the_gradients(llama_dir):
    """bitsandbytes repacks a 4-bit weight for inference on AVX-512-BF16 CPUs after an eval/no_grad forward,
    and that layout has no backward; lorakit keeps the training layout so training after eval is unchanged."""
    def grads(evaluate_first: bool):
        torch.manual_seed(0)  # the same A init both times
        lora = wrap(_base(llama_dir), LoraConfig(r=4, target_modules=TARGETS))
        randomize_lora(lora)
        if evaluate_first:
            lora.eval()
            with torch.no_grad():
                lora(input_ids=_ids(1))
        lora.train()
        ids = _ids()
        lora(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad}

    plain, after_eval = grads(False), grads(True)
    assert all(torch.equal(plain[n], after_eval[n]) for n in plain)
    assert all(g.abs().sum() > 0 for g in after_eval.values())


def test_the_trap_is_real_on_this_cpu():
    """Without the guard, on a CPU where bitsandbytes repacks, an eval pass leaves NO input gradient."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128, dtype=torch.bfloat16), requires_grad=False,
                                     quant_type="nf4", module=layer).to("cpu")
    if not layer.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX-512-BF16: bitsandbytes never repacks here")
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 128, dtype=torch.bfloat16))
    layer.train()
    x = torch.randn(2, 128, dtype=torch.bfloat16, requires_grad=True)
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        layer(x).float().sum().backward()
    assert x.grad is None


def test_adapters_move_between_4bit_and_16bit_bases(llama_dir, tmp_path):
    """The file is the same whichever base trained it, and it loads on either."""
    on_4bit = wrap(_base(llama_dir), LoraConfig(r=4, target_modules=TARGETS))
    randomize_lora(on_4bit)
    on_4bit.save_adapter(tmp_path / "from4")
    on_16bit = load_adapter(_base(llama_dir, bits=None), tmp_path / "from4")
    want = {n: p for n, p in on_4bit.named_parameters() if ".lora_" in n}
    got = {n: p for n, p in on_16bit.named_parameters() if ".lora_" in n}
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)
    on_16bit.save_adapter(tmp_path / "from16")
    back_on_4bit = load_adapter(_base(llama_dir), tmp_path / "from16")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(on_4bit(input_ids=ids).logits, back_on_4bit(input_ids=ids).logits)
        # 16-bit and 4-bit outputs differ by the base's rounding only: the adapter's part is the same.
        delta_4 = on_4bit(input_ids=ids).logits - _disabled(on_4bit, ids)
        delta_16 = on_16bit(input_ids=ids).logits - _disabled(on_16bit, ids)
    assert (delta_4 - delta_16).abs().max() < 0.2 * delta_16.abs().max()


def _disabled(lora, ids):
    with lora.disable_adapters():
        return lora(input_ids=ids).logits


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_swaps_in_16bit_and_unmerge_restores_the_exact_4bit_layer(llama_dir, use_dora):
    lora = wrap(_base(llama_dir), LoraConfig(r=4, target_modules=TARGETS, use_dora=use_dora))
    randomize_lora(lora)
    lora.eval()
    ids = _ids()
    before = _quantized_tensors(lora)
    with torch.no_grad():
        unmerged = lora(input_ids=ids).logits
        lora.merge(safe_merge=True)
        merged = lora(input_ids=ids).logits
    assert torch.allclose(merged, unmerged, atol=1e-5, rtol=1e-4)
    q_proj = lora.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear"  # the 16-bit stand-in
    lora.unmerge()
    assert is_quantized_linear(q_proj.base_layer)
    after = _quantized_tensors(lora)
    assert all(torch.equal(before[n], after[n]) for n in before)
    with torch.no_grad():
        assert torch.equal(lora(input_ids=ids).logits, unmerged)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: its Conv1D layers come back as Conv1D
def test_merge_and_unload_gives_a_plain_16bit_model_that_saves_and_reloads(tmp_path, family):
    from transformers import AutoModelForCausalLM

    path = tmp_path / family
    build_model(family).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    targets = TARGETS if family == "llama" else ["c_attn", "mlp.c_proj"]  # attn.c_proj stays 4-bit, untargeted
    lora = wrap(_base(path, dtype="bfloat16"), LoraConfig(r=4, target_modules=targets))
    randomize_lora(lora)
    lora.eval()
    ids = _ids()
    with torch.no_grad():
        adapted = lora(input_ids=ids).logits.float()
    plain = lora.merge_and_unload(safe_merge=True)
    assert not any(is_quantized_linear(m) for m in plain.modules())  # untargeted layers dequantized too
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
    assert getattr(plain.config, "quantization_config", None) is None
    assert type(plain.lm_head).__name__ == "Linear"
    plain.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16)
    with torch.no_grad():
        got = reloaded(ids).logits.float()
    # bf16 end to end on both sides: within bf16 rounding of the logits' scale.
    assert (got - adapted).abs().max() < 0.02 * adapted.abs().max()


def test_pissa_is_refused_on_a_quantized_base(llama_dir):
    with pytest.raises(ConfigError, match="pissa"):
        wrap(_base(llama_dir), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa"))


def test_adapters_can_be_kept_in_bfloat16(llama_dir):
    lora = wrap(_base(llama_dir), LoraConfig(r=4, target_modules=TARGETS, use_dora=True))
    lora.cast_adapters(torch.bfloat16)
    params = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    assert params and all(p.dtype == torch.bfloat16 for p in params.values())
    lora.train()
    ids = _ids()
    lora(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in params.values())


def test_fit_on_a_bf16_4bit_base_keeps_no_fp32_copy_of_frozen_weights(llama_dir, tmp_path):
    """After training with fit (checkpointing + chunked loss), every frozen weight is still 4-bit or bf16, and
    the optimizer holds state for the adapter weights only."""
    from lorakit.config import TrainConfig
    from lorakit.data import DataSummary, Example, PreparedData
    from lorakit.train import fit

    lora = wrap(_base(llama_dir, dtype="bfloat16"), LoraConfig(r=4, target_modules=TARGETS))
    examples = [Example(input_ids=list(range(1 + i, 13 + i)), labels=[-100] + list(range(2 + i, 13 + i)),
                        source=f"toy:{i}") for i in range(8)]
    data = PreparedData(examples=examples, summary=DataSummary(source="toy", records_read=8, kept=8), packing=False,
                        max_seq_len=12, pad_token_id=0)
    optimizers = []
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        optimizers.append(self)
        return real_step(self, *args, **kwargs)

    torch.optim.AdamW.step = spy
    try:
        result = fit(lora, data, TrainConfig(max_steps=2, batch_size=2, lr=1e-3, gradient_checkpointing=True,
                                             loss_chunk_tokens=5), tmp_path / "run", log=lambda _: None)
    finally:
        torch.optim.AdamW.step = real_step
    assert len(result.losses) == 2
    frozen = {n: p.dtype for n, p in lora.named_parameters() if not p.requires_grad}
    assert set(frozen.values()) == {torch.bfloat16, torch.uint8}  # embeddings/norms/head bf16, linear layers 4-bit
    trainable = {id(p) for p in lora.parameters() if p.requires_grad}
    assert optimizers and optimizers[0].state and {id(p) for p in optimizers[0].state} <= trainable


def test_a_bitsandbytes_model_lorakit_did_not_load_is_refused_until_prepared():
    """lora knows bitsandbytes layers only through the lora_base_kind that lorakit.quant gives the ones it loads
    (prepare_for_lora); then it wraps them, and merge_and_unload turns every one, adapted or not, into nn.Linear."""
    from lorakit.quant import QuantSpec, prepare_for_lora
    from lorakit.quant.bnb import quantize_linear

    gen = torch.Generator().manual_seed(0)
    spec = QuantSpec(bits=4, compute_dtype=torch.float32)
    model = torch.nn.Sequential(*(quantize_linear(torch.randn(out, inp, generator=gen), None, spec, torch.device("cpu"))
                                  for inp, out in ((128, 64), (64, 32))))
    with pytest.raises(ConfigError, match="not loaded by lorakit.*prepare_for_lora"):
        wrap(model, LoraConfig(r=4, target_modules=["0"]))
    lora = wrap(prepare_for_lora(model), LoraConfig(r=4, target_modules=["0"], init_lora_weights=False)).eval()
    x = torch.randn(2, 128, generator=gen)
    with torch.no_grad():
        adapted = lora(x)
        plain = lora.merge_and_unload()
        assert [type(m) for m in plain] == [torch.nn.Linear, torch.nn.Linear]
        torch.testing.assert_close(plain(x), adapted, rtol=1e-4, atol=1e-4)
