"""`modules_to_save`: a module trained in full (e.g. a classification head), one copy per adapter.

The original stays frozen and untouched; each adapter that names the module gets its own trainable
deep copy, used while that adapter is active (PEFT's ModulesToSaveWrapper, without the mixins).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .routing import current_routing


class FullCopy(nn.Module):
    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.copies = nn.ModuleDict()  # adapter name -> trainable copy
        self.train(original.training)  # after creating the ModuleDict, which starts in training mode
        self.active_adapters: list[str] = []
        self.adapters_disabled = False

    def add_adapter(self, name: str) -> None:
        duplicate = copy.deepcopy(self.original_module)
        for p in duplicate.parameters():
            p.requires_grad_(True)
        self.copies[name] = duplicate

    def delete_adapter(self, name: str) -> None:
        if name in self.copies:
            del self.copies[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.copies]

    def active_module(self) -> nn.Module:
        # With several active adapters, the first one that has a copy of this module is used.
        if self.adapters_disabled or not self.active_adapters:
            return self.original_module
        return self.copies[self.active_adapters[0]]

    def forward(self, x: torch.Tensor, *args, **kwargs):
        routing = current_routing()
        if routing is None or self.adapters_disabled:
            return self.active_module()(x, *args, **kwargs)
        result = self.original_module(x, *args, **kwargs)
        for name, rows in routing.groups(x.shape[0], x.device):
            if name in self.copies:
                rows_out = self.copies[name](x.index_select(0, rows), *args, **kwargs)
                result = result.index_copy(0, rows, rows_out.to(result.dtype))
        return result
