"""An adapter alone as a GGUF LoRA file, for llama.cpp's `--lora` on a GGUF of the same base.

For each adapted linear layer llama.cpp reads `<gguf weight name>.lora_a` (r x in) and `.lora_b` (out x r)
and adds (alpha / r) * B A x, with one alpha for the file and r read from each A. lorakit's scaling differs
per layer where rank_pattern, alpha_pattern or rsLoRA say so, so each layer's scaling is folded into its
B (B * scaling * r) and the file's alpha set to 1: llama.cpp's alpha / r then restores exactly scaling.
On the llama architecture B's rows for q_proj and k_proj get the same per-head reordering as the base
weights in gguf.py. DoRA, modules_to_save, trained biases and embedding adapters have no GGUF LoRA form and
are refused by name.
"""

from __future__ import annotations

from pathlib import Path

from ..lora import LoraModel
from ..errors import ExportError
from ..lora.layer import LoraLinear
from ..lora.methods import Lora, method_for
from .gguf import ARCHITECTURES, gguf_file, gguf_module, interleave_rope, model_arch
from .outputs import check_out


def write_lora_gguf(model: LoraModel, out_file: str | Path, *, adapter: str = "default", overwrite: bool = False) -> Path:
    """Write adapter `adapter` of `model` (a LoraModel on its transformers base) as one GGUF LoRA file;
    `overwrite` replaces an existing GGUF file, and nothing else."""
    check_out(out_file, "gguf", overwrite=overwrite)
    gguf = gguf_module()
    config = model.model.config
    architecture = (getattr(config, "architectures", None) or [type(model.model).__name__])[0]
    if architecture not in ARCHITECTURES:
        raise ExportError(f"GGUF export supports {', '.join(sorted(ARCHITECTURES))}; the base is {architecture}")
    arch = ARCHITECTURES[architecture]
    lora_config = model.adapter_configs[adapter]
    method = method_for(lora_config)
    unsupported = [what for what, present in ((f"{method.__name__} adapters", method is not Lora),
                                              ("modules_to_save", bool(lora_config.modules_to_save)),
                                              ("trained biases (bias != none)", lora_config.bias != "none"))
                   if present]
    if unsupported:
        raise ExportError(f"a GGUF LoRA file cannot hold {', '.join(unsupported)}; export the merged model "
                          "(--format gguf) instead")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    names = gguf.get_tensor_name_map(model_arch(gguf, arch), config.num_hidden_layers)

    out = Path(out_file)
    with gguf_file(out, gguf.MODEL_ARCH_NAMES[model_arch(gguf, arch)], overwrite=overwrite) as writer:
        writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 1.0)
        written = 0
        for module_name, layer in model.lora_layers():
            lora = layer.adapters.get(adapter)
            if lora is None:
                continue
            if not isinstance(layer, LoraLinear) or getattr(layer, "fan_in_fan_out", False):
                raise ExportError(f"{module_name}: a {type(layer).__name__} adapter has no GGUF LoRA form; only "
                                  "linear layers do")
            target = names.get_name(f"{module_name}.weight", try_suffixes=(".weight",))
            if target is None:
                raise ExportError(f"{module_name} has no GGUF tensor name for {arch}")
            A = lora.A.detach().float()  # (r, in)
            B = lora.B.detach().float() * (lora.scaling * lora.rank)  # (out, r)
            if arch == "llama" and module_name.endswith(("q_proj", "k_proj")):
                B = interleave_rope(B, heads if module_name.endswith("q_proj") else kv_heads)
            writer.add_tensor(f"{target}.lora_a", A.numpy())
            writer.add_tensor(f"{target}.lora_b", B.numpy())
            written += 1
        if not written:
            raise ExportError(f"adapter {adapter!r} adapts no layer")
    return out
