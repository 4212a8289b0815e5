"""The model's side of the memory plan: its shape and weights from config.json and a meta-device build.

No weight is loaded: AutoModelForCausalLM.from_config under the meta device allocates nothing, and wrapping
that model with the run's LoRA config by lorakit's own injection counts exactly what trains and which inputs
the adapters keep for backward. Weights are counted as the loaders hold them: the compute dtype, or packed by
bitsandbytes for the layers lorakit.quant.load quantizes (its own choice of layers), fp32 where the model keeps
modules in fp32, tied weights once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..base_model import load_model_config, meta_model
from ..config import RunConfig
from ..errors import ConfigError
from ..quant.load import quantize_targets
from ..train.adapters import wrap_adapters
from ..train.chunked_loss import logits_postprocessed

ATTENTION_OUTPUTS = ("o_proj", "out_proj", "dense", "c_proj", "wo")  # read SDPA's output, saved by SDPA already


@dataclass
class ModelShape:
    """What the estimate needs from the model: from config.json and a meta-device build wrapped with LoRA."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int | None
    quantizable: tuple[int, int, int]
    """The linear weights a 4/8-bit load quantizes (lorakit.quant.load's choice): elements, rows, tensors."""
    other_params: int
    """Every other weight (embeddings, output head, norms, biases), held in the compute dtype; tied ones once."""
    fp32_params: int
    """Weights the model keeps in fp32 (its _keep_in_fp32_modules)."""
    largest_weight: int
    """Elements of the largest single linear weight (a quantized matmul dequantizes one at a time)."""
    lora_params: int
    lora_bytes: int
    """Trainable parameters and their bytes (adapter dtype; modules_to_save copies in the base dtype)."""
    lora_tensors: int
    """Trainable tensors (A, B, ...), for their sizes: (tensors, lora_bytes / tensors)."""
    lora_inputs: list[list[int]]
    """Per decoder layer: features of each distinct input its LoRA targets save (q/k/v share one, etc.)."""
    lora_layers: list[tuple[int, int, int]]
    """Per decoder layer: the sum of its LoRA targets' ranks (their (tokens, r) down-projections), and their
    A and B weights and tensors (cast to the base dtype in each forward)."""
    first_trained_layer: int
    """Layers before it hold no activations: no gradient flows through them."""
    chunked_head: bool
    """The loss can be chunked (split_head's conditions: a plain output head, logits not post-processed)."""
    checkpoint_element: int = 2
    """Bytes per weight in the checkpoint (config.json's dtype): loading it in another dtype keeps the file's
    memory-mapped pages resident while the converted copies are made."""
    notes: list[str] = field(default_factory=list)

    def weight_bytes(self, element: int, bits: int | None, double_quant: bool = True) -> int:
        """All base weights as loaded: compute dtype, or 4/8-bit packed for the quantizable linear layers."""
        numel, rows, tensors = self.quantizable
        if bits is None:
            linear = numel * element
        else:
            linear = quantized_bytes(numel, rows, bits, double_quant) + (4 * 256 * tensors if bits == 4 else 0)
        return linear + self.other_params * element + self.fp32_params * 4


def model_shape(config: RunConfig, dtype: torch.dtype, hf_config=None) -> ModelShape:
    """Build the model on the meta device (no memory), count its weights as they will be loaded, and wrap it
    with the run's adapters exactly as training does to count what trains and which inputs LoRA saves."""
    hf_config = hf_config if hf_config is not None else load_model_config(config.model)
    on_disk = _element(getattr(hf_config, "dtype", None))  # before from_config sets the dtype asked for
    try:
        model = meta_model(hf_config, dtype, trust_remote_code=config.model.trust_remote_code)
    except ConfigError as err:  # the plan is advice: check_before_training notes this, and the model still trains
        raise RuntimeError(str(err)) from None
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    quantizable = quantize_targets(model)  # the loader's own choice of layers to quantize
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    linear = [0, 0, 0]
    other = fp32 = largest = 0
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if module_name in quantizable and leaf == "weight":
                largest = max(largest, p.numel())
                linear = [linear[0] + p.numel(), linear[1] + p.shape[0], linear[2] + 1]
            elif any(k in module_name.split(".") for k in keep_fp32):
                fp32 += p.numel()
            else:
                other += p.numel()
    chunked = isinstance(model.get_output_embeddings(), torch.nn.Linear) and not logits_postprocessed(hf_config)
    # as training wraps it, with a plain init: the values are irrelevant and PiSSA's SVD cannot run on meta
    lora_model = wrap_adapters(model, config, _init=True)
    layers = getattr(text, "num_hidden_layers")
    inputs: list[set] = [set() for _ in range(layers)]
    per_layer = [[0, 0, 0] for _ in range(layers)]  # rank sum, A and B weights, tensors
    for name, layer in lora_model.lora_layers():
        index = _layer_index(name)
        if index is None or index >= layers:
            continue
        for adapter in layer.adapters.values():  # each method says what its forward keeps for backward
            width, weights = adapter.backward_memory()
            per_layer[index][0] += width
            per_layer[index][1] += sum(w.numel() for w in weights)
            per_layer[index][2] += len(weights)
        parent, _, leaf = name.rpartition(".")
        if leaf in ATTENTION_OUTPUTS and re.search(r"attn|attention", parent):
            continue
        inputs[index].add((parent, layer.in_features))
    lora_params = lora_bytes = lora_tensors = 0
    for p in lora_model.parameters():
        if p.requires_grad:
            lora_params += p.numel()
            lora_tensors += 1
            lora_bytes += p.numel() * p.element_size()
    trained = [i for i in range(layers) if per_layer[i][0]]
    heads = text.num_attention_heads
    hidden = text.hidden_size
    notes = []
    if getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None):
        notes.append("mixture-of-experts layers are estimated as one dense MLP of intermediate_size")
    if any(lora.use_dora for _, lora in config.adapters()):
        notes.append("DoRA keeps a weight-sized norm term per adapted layer that is not counted here")
    return ModelShape(
        model_type=getattr(text, "model_type", "?"), hidden=hidden,
        intermediate=getattr(text, "intermediate_size", None) or 4 * hidden, layers=layers, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or hidden // heads, vocab=text.vocab_size,
        max_positions=getattr(text, "max_position_embeddings", None), quantizable=tuple(linear), other_params=other,
        fp32_params=fp32, largest_weight=largest, lora_params=lora_params, lora_bytes=lora_bytes,
        lora_tensors=lora_tensors, lora_inputs=[[f for _, f in sorted(group)] for group in inputs],
        lora_layers=[tuple(counts) for counts in per_layer],
        first_trained_layer=trained[0] if trained else layers, chunked_head=chunked, notes=notes,
        checkpoint_element=on_disk)


def quantized_bytes(numel: int, rows: int, bits: int, double_quant: bool) -> int:
    """Bytes of a bitsandbytes weight: 4-bit packs two per byte with one absmax per block of 64 (fp32, or
    8-bit plus one fp32 per 256 blocks with double quantization); 8-bit keeps an fp32 scale per row."""
    if bits == 8:
        return numel + 4 * rows
    blocks = -(-numel // 64)
    scales = blocks + 4 * -(-blocks // 256) if double_quant else 4 * blocks
    return -(-numel // 2) + scales


def _element(dtype) -> int:
    """Bytes per element of a config's dtype ("bfloat16", torch.float32, None: assume 16-bit)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 2


def _layer_index(name: str) -> int | None:
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None
