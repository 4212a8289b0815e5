"""bitsandbytes 4-bit / 8-bit linear layers: building them from a 16-bit weight, and turning them back.

bitsandbytes runs on CPU as well as CUDA (0.48+). It is an optional extra (`pip install 'lorakit[quant]'`),
imported only when a quantized model is asked for. Quantized layers carry `source_cls` (the class they
replaced) as transformers' own bitsandbytes integration does, so GPT-2's Conv1D layers (weight stored
(in, out)) come back as Conv1D when a model is dequantized, and either loader's models are handled alike.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..lora.inject import is_quantized_linear


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: the resolved form of the run config's `model.quantization` section."""

    bits: int  # 4 or 8
    quant_type: str = "nf4"  # 4-bit only: "nf4" or "fp4"
    double_quant: bool = True  # 4-bit only: quantize the per-block scales too (~0.4 bits/param saved)
    compute_dtype: torch.dtype = torch.bfloat16

    def describe(self) -> str:
        if self.bits == 8:
            return "8-bit (LLM.int8)"
        dq = " + double quantization" if self.double_quant else ""
        return f"4-bit {self.quant_type.upper()}{dq}, compute in {str(self.compute_dtype).removeprefix('torch.')}"


def require_bitsandbytes():
    """The bitsandbytes module, or a ConfigError saying how to install it."""
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as err:
        raise ConfigError(
            f"model.quantization needs bitsandbytes, which is not importable here ({err}); "
            "install it with: pip install 'lorakit[quant]'   (or remove the quantization section)",
            where="run config",
        ) from None


def _is_conv1d_class(cls: type | None) -> bool:
    return cls is not None and cls.__name__ == "Conv1D"


def quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec, device: torch.device,
                    *, source_cls: type = nn.Linear) -> nn.Module:
    """A frozen bitsandbytes layer holding `weight` (out, in) quantized on `device`.

    The 16-bit weight is quantized during the move to `device` and dropped: only the packed form stays.
    """
    bnb = require_bitsandbytes()
    out_features, in_features = weight.shape
    with torch.device("meta"):  # no full-size placeholder weight is allocated
        if spec.bits == 4:
            layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=spec.compute_dtype,
                                      compress_statistics=spec.double_quant, quant_type=spec.quant_type)
        else:
            layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                        threshold=0.0)
    weight = weight.to(spec.compute_dtype) if weight.dtype != spec.compute_dtype else weight
    if spec.bits == 4:
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=spec.quant_type,
                                         compress_statistics=spec.double_quant, module=layer).to(device)
    else:
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(device=device, dtype=spec.compute_dtype), requires_grad=False)
    layer.source_cls = source_cls
    layer.requires_grad_(False)
    if spec.bits == 4:
        layer.support_avx512bf16_for_cpu = False  # see keep_training_layout
    return layer


def keep_training_layout(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout, and undo any repacking.

    On CPUs with AVX-512-BF16, a Linear4bit that runs in eval mode under no_grad rewrites its weight, for
    good, into a layout whose matmul has no backward: a later training step then gets NO gradient through
    that layer (bitsandbytes only warns), so every adapter below it silently stops learning. One evaluation
    during training is enough to trigger it. The repacked path is also ~3x slower for long inputs (it is
    faster for single-token decoding, which training does not do). Measured in tests/test_quant.py.
    """
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and is_quantized_linear(module):
            module.support_avx512bf16_for_cpu = False
            _unpack(module)


def _unpack(layer: nn.Module) -> None:
    state = getattr(layer.weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight a bitsandbytes layer computes with, as a fresh 16/32-bit tensor."""
    bnb = require_bitsandbytes()
    weight = layer.weight
    if type(layer).__name__ == "Linear4bit":
        _unpack(layer)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    # LLM.int8: int8 rows with one absmax scale per row; after the first forward bitsandbytes moves the
    # scales from the parameter into the layer's state.
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = layer.state.SCB
    if weight.dtype != torch.int8:  # not quantized yet (still on its way to the device)
        return weight.data.clone()
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales)


def quantized_dtype(layer: nn.Module) -> torch.dtype:
    """The 16-bit dtype a quantized layer's outputs come in (what a dequantized copy should use)."""
    dtype = getattr(layer, "compute_dtype", None)
    if dtype is None and layer.bias is not None:
        dtype = layer.bias.dtype
    return dtype if dtype is not None and dtype.is_floating_point else torch.bfloat16


def to_plain_layer(layer: nn.Module, weight_out_in: torch.Tensor) -> nn.Module:
    """A plain frozen nn.Linear (or Conv1D, if that is what the quantized layer replaced) with this weight."""
    weight_out_in = weight_out_in.detach()
    out_features, in_features = weight_out_in.shape
    bias = layer.bias.detach().to(weight_out_in.dtype) if layer.bias is not None else None
    source_cls = getattr(layer, "source_cls", nn.Linear)
    with torch.device("meta"):
        if _is_conv1d_class(source_cls):
            plain = source_cls(out_features, in_features)  # Conv1D(nf=out, nx=in) stores weight (in, out)
        else:
            plain = nn.Linear(in_features, out_features, bias=bias is not None)
    oriented = weight_out_in.T.contiguous() if _is_conv1d_class(source_cls) else weight_out_in
    plain.weight = nn.Parameter(oriented, requires_grad=False)
    if _is_conv1d_class(source_cls):
        plain.bias = nn.Parameter(bias if bias is not None else torch.zeros(out_features, dtype=oriented.dtype,
                                                                            device=oriented.device),
                                  requires_grad=False)
    elif bias is not None:
        plain.bias = nn.Parameter(bias, requires_grad=False)
    plain.train(layer.training)
    return plain


def dequantize_model(model: nn.Module) -> int:
    """Replace every bitsandbytes layer in `model` with its 16-bit equivalent, in place; returns how many.

    Also drops transformers' record of the quantization (config.quantization_config and friends), so
    `save_pretrained` writes a plain 16-bit checkpoint that loads without bitsandbytes.
    """
    names = [name for name, module in model.named_modules() if is_quantized_linear(module)]
    for name in names:
        layer = model.get_submodule(name)
        weight = dequantized_weight(layer).to(quantized_dtype(layer))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, to_plain_layer(layer, weight))
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    for attribute in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, attribute, False):
            setattr(model, attribute, False)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    return len(names)
