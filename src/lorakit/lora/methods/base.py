"""What an adapter method provides: the protocol every method module (lora.py, dora.py, ...) fills in.

An adapter is one method's update on one LoRA layer (lora/layer.py). Its tensors live in the layer's
ParameterDicts keyed by adapter name, so parameter names stay `<layer>.<store>.<adapter>` (what checkpoints,
optimizer state and LoRA+ roles are keyed by). The adapter object holds the method's hyperparameters and
looks its tensors up there on every use, so a Parameter replaced in its store (cast_adapters,
load_state_dict(assign=True)) is never stale.

The layer gives every method: base_weight() (out, in), without_bias(base_out), in_features / out_features,
training, store(name) and adapter_dtype_device(). LoRA and DoRA also use what differs by layer kind:
down(x, A) (x A^T: a matmul, or a lookup for embeddings), factor_keys, init_factors, uses_dropout and
lora_dropout, matmul_input and compute_in_base_dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Adapter:
    """One adapter of one method on one layer. Subclasses set the class attributes and the methods below."""

    peft_type: str
    """PEFT's `peft_type` written to adapter_config.json (DoRA is "LORA" with use_dora, as PEFT has it)."""
    config_class: type
    """The config class whose files carry this peft_type (read_adapter_config builds it)."""
    stores: dict[str, str] = {}
    """Role ("A", "B", "magnitude", ...) -> the layer's ParameterDict attribute that holds that tensor. The
    attribute is the parameter name's second-to-last part, so one store name means one role in every method."""
    uses_base_out = False
    """True when delta() reads base_out's values. Otherwise a mixed batch passes the whole batch's base_out with
    an adapter's rows of x, and only its dtype may be read (saves a gather per adapter and layer)."""

    def __init__(self, layer: nn.Module, name: str, config: Any, module_name: str, *, init: Any = None):
        """Create this adapter's tensors in the stores of `layer` (a LoraLayer: layer.py imports this module, so
        not the reverse) from the fields of `config` the method reads, for the module at `module_name`; `init`
        overrides the config's init scheme."""
        self.layer = layer
        self.name = name

    # ---- tensors ------------------------------------------------------------------------------------
    def low_rank_factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A (r, in), B (out, r), scaling) when this adapter's update is exactly scaling * x A^T B^T for inputs of
        `dtype` (no dropout running, no use of the base output), so a mixed batch may compute it together with
        other adapters' (LoraLayer._mixed_together); None otherwise."""
        return None

    def tensor(self, role: str) -> nn.Parameter:
        return self.layer.store(self.stores[role])[self.name]

    def tensors(self) -> dict[str, nn.Parameter]:
        """Role -> parameter: what trains, what the optimizer groups by role (LoRA+), what casts."""
        return {role: self.tensor(role) for role in self.stores}

    def _put(self, role: str, value: torch.Tensor) -> None:
        self.layer.store(self.stores[role])[self.name] = nn.Parameter(value)

    def saved_tensors(self) -> dict[str, nn.Parameter]:
        """PEFT's file-key suffix ("lora_A.weight", "lora_embedding_B", ...) -> parameter, for io.py."""
        raise NotImplementedError

    def cast(self, dtype: torch.dtype) -> None:
        for role, store in self.stores.items():
            p = self.tensor(role)
            self.layer.store(store)[self.name] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)

    def delete(self) -> None:
        for store in self.stores.values():
            del self.layer.store(store)[self.name]

    # ---- math ---------------------------------------------------------------------------------------
    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """What this adapter adds to the base output `base_out` (..., out) for input x (..., in)."""
        raise NotImplementedError

    def add_to(self, x: torch.Tensor, base_out: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result + delta(x, base_out); a method may fuse the addition into its last matmul."""
        return result + self.delta(x, base_out).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The (out, in) fp32 update of the adapter's own weights, before any rescaling of W (PEFT's
        get_delta_weight: s B A for LoRA and DoRA alike)."""
        raise NotImplementedError

    def merge_state(self) -> torch.Tensor | None:
        """What merge_terms needs that changes once W does (DoRA's weight norm), taken before merging and
        kept until unmerge, so that unmerging is exact; None when nothing is needed."""
        return None

    def merge_terms(self, state: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(c (out,), D (out, in)) such that merged alone W' = c * W + D; None stands for c = 1 or D = 0.

        Several adapters merge as W' = (1 + sum_i (c_i - 1)) W + sum_i D_i, exactly the sum of the updates
        their unmerged forwards add, and unmerge solves W = (W' - D) / c."""
        raise NotImplementedError

    def backward_memory(self) -> tuple[int, list[torch.Tensor]]:
        """For the memory planner (plan/shape.py): the width w of the (tokens, w) activation this adapter
        keeps for backward, and the weights whose compute-dtype copies it keeps with compute_in_base_dtype."""
        return 0, []
