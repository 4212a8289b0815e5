"""DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353): a learned magnitude per output feature times
the normalised direction W + s B A,

    W' = m / ||W + s B A|| * (W + s B A)        m: (out,), the norm taken per output feature (eq. 5)

PEFT writes it as a LoRA adapter with use_dora=True and one more tensor, lora_magnitude_vector.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoraConfig
from .lora import Lora


class Dora(Lora):
    stores = {**Lora.stores, "magnitude": "lora_magnitude"}
    uses_base_out = True

    def __init__(self, layer: nn.Module, name: str, config: LoraConfig, module_name: str, *, init: Any = None):
        super().__init__(layer, name, config, module_name, init=init)
        with torch.no_grad():
            norm = self._weight_norm()
        self._put("magnitude", norm.to(self.A.dtype))  # m starts at ||W + s B A||: the output is unchanged

    @property
    def magnitude(self) -> nn.Parameter:
        return self.tensor("magnitude")  # (out,)

    def saved_tensors(self) -> dict[str, nn.Parameter]:
        return {**super().saved_tensors(), "lora_magnitude_vector": self.magnitude}

    def _weight_norm(self) -> torch.Tensor:
        # ||W + s B A|| per output feature (eq. 5), shape (out,).
        return torch.linalg.vector_norm(self.layer.base_weight().float() + self.delta_weight(), dim=1)

    def _scale(self) -> torch.Tensor:
        # The norm is treated as a constant (DoRA sec. 4.3): it gets no gradient, so build no graph for it.
        with torch.no_grad():
            norm = self._weight_norm()
        return self.magnitude / norm  # (out,)

    def _cast_factors(self, dtype: torch.dtype) -> None:
        return None  # always the stored weights: the magnitude and the norm are in the adapter's dtype

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        # m / ||W + sBA|| * (W + sBA) x  =  base + (scale - 1) * W x + scale * sBA x.
        # With dropout the input differs from the base layer's, so W x is recomputed from it (as PEFT does).
        x, dropped = self._input(x)
        update = self._update(x, self.A, self.B)  # (..., out)
        scale = self._scale().to(update.dtype)  # (out,)
        base_term = F.linear(x, self.layer.base_weight().to(x.dtype)) if dropped else self.layer.without_bias(base_out)
        return (scale - 1) * base_term.to(update.dtype) + scale * update

    def merge_state(self) -> torch.Tensor:
        return self._weight_norm()  # (out,), of the unmerged W: unmerge cannot recompute it from W'

    def merge_terms(self, state: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # (c - 1) W + c s B A with c = m / ||W + s B A||: the exact update the unmerged forward adds.
        c = self.magnitude.float() / state  # (out,)
        return c, c[:, None] * self.delta_weight()
