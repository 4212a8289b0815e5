"""LoRA on a bitsandbytes 4-bit or 8-bit base layer (QLoRA, Dettmers et al. 2023).

The forward is the usual base(x) + s * x A^T B^T; bitsandbytes dequantizes inside its own matmul.
Merging cannot write into 4-bit storage without rounding the result to 4 bits again, and then unmerge
could not give the original back. So merge() swaps in a 16-bit copy of the layer (dequantized weight plus
the adapters' delta) and keeps the quantized layer aside; unmerge() puts the untouched quantized layer
back, bit for bit. merge_and_unload() therefore yields 16-bit layers, which is what a merged export wants.

lora imports nothing of quant: every bitsandbytes layer lorakit loads carries `lora_base_kind` = BITSANDBYTES
(lora.inject.BaseKind), through which lora wraps it and turns what is left quantized back into plain layers.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..lora.inject import is_quantized_linear
from ..lora.layer import LoraLayer, LoraLinear
from .bnb import dequantize_model, dequantized_weight, keep_training_layout, quantized_dtype, to_plain_layer


class LoraQuantLinear(LoraLinear):
    def __init__(self, base_layer: nn.Module):
        LoraLayer.__init__(self, base_layer)  # not LoraLinear's: it reads sizes from the weight, packed here
        self.fan_in_fan_out = False  # bitsandbytes layers are (out, in) even when they replaced a Conv1D
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self._quantized: nn.Module | None = None  # the quantized layer while a 16-bit merged copy stands in

    def base_weight(self) -> torch.Tensor:
        if self._quantized is not None:  # merged: the 16-bit stand-in (nn.Linear, or Conv1D stored (in, out))
            weight = self.base_layer.weight
            return weight.T if type(self.base_layer).__name__ == "Conv1D" else weight
        return dequantized_weight(self.base_layer).to(quantized_dtype(self.base_layer))

    def base_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        return quantized_dtype(self.base_layer), self.base_layer.weight.device

    def _set_base_weight(self, weight_out_in: torch.Tensor) -> None:
        raise NotImplementedError("quantized base weights are never written in place; see _store_merged")

    def _pissa_init(self, A: torch.Tensor, B: torch.Tensor, s: float, init: str) -> None:
        raise ConfigError("init_lora_weights='pissa' rewrites the base weight, which is stored quantized here; "
                          "use the default init with a quantized base (or PiSSA on a 16-bit base)")

    def _store_merged(self, merged_out_in: torch.Tensor) -> None:
        # (out, in) in the compute dtype, from the dequantized weight: a 16-bit stand-in, the original kept aside.
        self._quantized = self.base_layer
        self.base_layer = to_plain_layer(self._quantized, merged_out_in)

    def _restore_unmerged(self) -> None:
        self.base_layer = self._quantized  # exactly the original quantized weights
        self._quantized = None


class Bitsandbytes:
    """lora.inject.BaseKind for bitsandbytes Linear4bit / Linear8bitLt layers."""

    def wrap(self, layer: nn.Module) -> LoraQuantLinear:
        return LoraQuantLinear(layer)

    def unload(self, model: nn.Module) -> None:
        dequantize_model(model)


BITSANDBYTES = Bitsandbytes()


def prepare_for_lora(model: nn.Module) -> nn.Module:
    """Mark every bitsandbytes layer of `model` as one LoRA can wrap, and keep it in its training layout
    (bnb.keep_training_layout). quant.load does this for every model it loads; a bitsandbytes model loaded
    another way needs it before lorakit.lora.wrap."""
    keep_training_layout(model)
    for module in model.modules():
        if is_quantized_linear(module):
            module.lora_base_kind = BITSANDBYTES
    return model
