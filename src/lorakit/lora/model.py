"""LoraModel: a model with named LoRA adapters injected in place.

`LoraModel.model` is the wrapped model itself, so transformers features (generate, config, gradient
checkpointing) work through it. Nothing is forwarded implicitly: methods that delegate say so.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from ..errors import AdapterError
from .combine import weighted_adapter
from .config import LoraConfig
from .full_copy import FullCopy
from .inject import base_kinds, experts_left_out_warning, inject, replace_module, with_task_heads
from .io import load_adapter_into, save_adapters
from .layer import LoraLayer
from .layout import base_biases
from .routing import BASE, route_rows

# No ".": adapter names are keys of nn.ParameterDict / nn.ModuleDict, which reject dots.
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class TrainableReport:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


class LoraModel(nn.Module):
    def __init__(self, model: nn.Module, config: LoraConfig | None, adapter_name: str = "default", *, _init=None):
        """Freeze `model` and add adapter `adapter_name` from `config`; config None: no adapter yet (a server
        that loads its adapters later starts so)."""
        super().__init__()
        self.model = model
        self.train(model.training)  # a fresh nn.Module says "training"; keep the wrapped model's mode
        self.adapter_configs: dict[str, LoraConfig] = {}
        self.target_suffixes: dict[str, list[str]] = {}
        self.active_adapters: list[str] = []
        grads = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in grads:
            p.requires_grad_(False)
        if config is None:
            return
        try:
            self.add_adapter(adapter_name, config, _init=_init)
        except Exception:
            for p, requires_grad in grads:  # a rejected config or name leaves the model as it was
                p.requires_grad_(requires_grad)
            raise
        self.set_adapter(adapter_name)

    # ---- iteration ---------------------------------------------------------------------------------
    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer):
                yield name, module

    def full_copies(self) -> Iterator[tuple[str, FullCopy]]:
        for name, module in self.model.named_modules():
            if isinstance(module, FullCopy):
                yield name, module

    @property
    def merged_adapters(self) -> list[str]:
        merged: list[str] = []
        for _, layer in self.lora_layers():
            merged += [n for n in layer.merged_adapters if n not in merged]
        return merged

    # ---- adapters ----------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: LoraConfig, *, _init=None) -> None:
        """Inject a new adapter (inactive until set_adapter) into the targets of `config`."""
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a lorakit.LoraConfig, got {type(config).__name__}")
        if not isinstance(adapter_name, str) or not ADAPTER_NAME.match(adapter_name):  # also refuses "__base__"
            raise AdapterError(
                f"invalid adapter name {adapter_name!r}: use 1-64 letters, digits, '_' or '-', "
                "starting with a letter or digit"
            )
        if adapter_name in self.adapter_configs:
            raise AdapterError(f"adapter {adapter_name!r} already exists; delete_adapter() it or pick another name")
        if self.merged_adapters:
            raise AdapterError("cannot add an adapter while adapters are merged; call unmerge() first")
        config = with_task_heads(self.model, config)
        plan = inject(self.model, config, adapter_name, init=_init)
        init = config.init_lora_weights if _init is None else _init
        if isinstance(init, str) and init.startswith("pissa") and self.adapter_configs:
            warnings.warn(
                "PiSSA rewrote the base weights it targets (to the residual), so the other adapters on those "
                "layers, and the model with adapters disabled, no longer see the original weights", stacklevel=2)
        self.adapter_configs[adapter_name] = config
        self.target_suffixes[adapter_name] = plan.target_suffixes
        if plan.experts_left_out:
            warnings.warn(f"LoRA adapter {adapter_name!r}: {experts_left_out_warning(plan.experts_left_out)}",
                          stacklevel=2)
        for name, others in self.tied_targets():
            warnings.warn(f"LoRA target {name!r} shares its weight with {others} (tied weights): merging this "
                          "adapter would change those too, so merge() will refuse until the weights are untied",
                          stacklevel=2)
        self._refresh_trainable()

    def load_adapter(self, path: str | Path, adapter_name: str = "default", *, is_trainable: bool = False) -> "LoraModel":
        """Load an adapter directory (ours or PEFT's) as `adapter_name`; it becomes active only by set_adapter.

        Loaded adapters are frozen unless is_trainable=True (PEFT's default and name).
        """
        load_adapter_into(self, path, adapter_name, is_trainable=is_trainable)
        return self

    def _require(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self.adapter_configs]
        if unknown:
            loaded = ", ".join(self.adapter_configs) or "(none)"
            raise AdapterError(f"unknown adapter(s) {unknown}; loaded adapters: {loaded}")

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make one adapter, or several whose updates add up, active. Switching copies no weights."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._require(names)
        if self.merged_adapters and names != self.active_adapters:
            raise AdapterError(f"adapters {self.merged_adapters} are merged; call unmerge() before switching")
        self.active_adapters = names
        for _, module in [*self.lora_layers(), *self.full_copies()]:
            module.set_active(names)
        self._refresh_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        self._require([adapter_name])
        if adapter_name in self.merged_adapters:
            raise AdapterError(f"adapter {adapter_name!r} is merged; call unmerge() before deleting it")
        for _, module in [*self.lora_layers(), *self.full_copies()]:
            module.delete_adapter(adapter_name)
        del self.adapter_configs[adapter_name]
        del self.target_suffixes[adapter_name]
        self._drop_empty_wrappers()
        was_active = adapter_name in self.active_adapters
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]
        if was_active and not self.active_adapters and self.adapter_configs:
            fallback = next(iter(self.adapter_configs))  # as PEFT: another adapter takes over, said aloud
            warnings.warn(f"deleted the active adapter {adapter_name!r}; {fallback!r} is active now", stacklevel=2)
            self.set_adapter(fallback)
        self._refresh_trainable()

    def _drop_empty_wrappers(self) -> None:
        """Put back the original module wherever no adapter is left, so deleting undoes injecting."""
        for name, layer in list(self.lora_layers()):
            if not layer.adapters:
                replace_module(self.model, name, layer.base_layer)
        for name, module in list(self.full_copies()):
            if len(module.copies) == 0:
                replace_module(self.model, name, module.original_module)

    def tied_targets(self) -> list[tuple[str, list[str]]]:
        """LoRA layers whose base weight is also used by another module (e.g. an embedding tied to lm_head)."""
        owners: dict[int, list[str]] = {}
        for pname, param in self.model.named_parameters(remove_duplicate=False):
            owners.setdefault(id(param), []).append(pname)
        tied = []
        for name, layer in self.lora_layers():
            others = [p for p in owners.get(id(layer.base_layer.weight), []) if not p.startswith(name + ".")]
            if others:
                tied.append((name, others))
        return tied

    def _refresh_trainable(self) -> None:
        """Only the active adapters' weights (and the biases their configs name) train."""
        active = set(self.active_adapters)
        adapter_ids = set()
        for _, layer in self.lora_layers():
            for name, _, p in layer.adapter_parameters():
                p.requires_grad_(name in active and not self.adapter_configs[name].inference_mode)
                adapter_ids.add(id(p))
        for _, module in self.full_copies():
            for name, copy in module.copies.items():
                for p in copy.parameters():
                    p.requires_grad_(name in active and not self.adapter_configs[name].inference_mode)
        training = [n for n in active if not self.adapter_configs[n].inference_mode]
        bias_all = any(self.adapter_configs[n].bias == "all" for n in training)
        lora_only = [n for n in training if self.adapter_configs[n].bias == "lora_only"]
        # "lora_only": biases of the layers that adapter adapts (the ones its file saves), not of every wrapped layer.
        lora_only_biases = {
            f"{path}.base_layer.bias" for path, layer in self.lora_layers() if any(n in layer.adapters for n in lora_only)
        }
        for pname, p in base_biases(self.model, adapter_ids):  # adapter tensors were set above; originals stay frozen
            p.requires_grad_(bias_all or pname in lora_only_biases)

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator["LoraModel"]:
        """Within the block no adapter applies: the model computes with its base weights.

        Those are the original weights unless an adapter changed them on purpose: PiSSA keeps the residual
        in the base, and bias="all"/"lora_only" adapters train biases that live in the base layers.
        """
        merged = self.merged_adapters
        if merged:
            self.unmerge()
        modules = [m for _, m in [*self.lora_layers(), *self.full_copies()]]
        for m in modules:
            m.adapters_disabled = True
        try:
            yield self
        finally:
            for m in modules:
                m.adapters_disabled = False
            if merged:
                self.merge(merged)

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        """The wrapped model's forward. `adapter_names` gives one adapter (or "__base__") per batch row."""
        with route_rows(self._check_row_names(adapter_names, _batch_rows(args, kwargs))):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        """Delegates to the wrapped model's `generate`, with optional per-row adapters (one per prompt)."""
        with route_rows(self._check_row_names(adapter_names, _batch_rows(args, kwargs))):
            return self.model.generate(*args, **kwargs)

    def _check_row_names(self, adapter_names: Sequence[str] | None, rows: int | None) -> list[str] | None:
        if adapter_names is None:
            return None
        names = list(adapter_names)
        if not names:
            raise AdapterError("adapter_names is empty; give one adapter name (or '__base__') per batch row")
        if rows is not None and len(names) != rows:
            raise AdapterError(
                f"adapter_names has {len(names)} entries but the batch has {rows} rows; "
                "give exactly one adapter name per row"
            )
        self._require([n for n in dict.fromkeys(names) if n != BASE])
        if self.merged_adapters:
            raise AdapterError("adapter_names cannot be used while adapters are merged; call unmerge() first")
        return names

    # ---- combination ---------------------------------------------------------------------------------
    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
    ) -> None:
        """Add `adapter_name` built from weighted existing adapters.

        "cat" concatenates ranks (exactly sum_i w_i * delta_i), "svd" truncates that sum to `svd_rank`
        (default: the largest input rank), "linear" mixes the factors A and B themselves (same ranks needed).
        """
        self._require(list(adapters))
        weighted_adapter(self, list(adapters), list(weights), adapter_name, combination_type, svd_rank)

    # ---- merge -------------------------------------------------------------------------------------
    def merge(self, adapter_names: Sequence[str] | None = None, *, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weights; the forward then costs nothing extra.

        safe_merge computes each merged weight in a copy and refuses NaN/inf before writing anything.
        """
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        self._require(names)
        if self.model.training:
            raise AdapterError("cannot merge while the model is in training mode; call model.eval() first")
        if self.merged_adapters:
            raise AdapterError(f"adapters {self.merged_adapters} are already merged; call unmerge() first")
        tied = [(n, others) for n, others in self.tied_targets()
                if any(a in self.model.get_submodule(n).adapters for a in names)]
        if tied:
            name, others = tied[0]
            raise AdapterError(
                f"cannot merge into {name!r}: its weight is tied to {others}, which would change too; "
                f"untie it first (give {others[0].rsplit('.', 1)[0]} its own copy of the weight), or keep the adapter unmerged"
            )
        layers = [layer for _, layer in self.lora_layers()]
        if safe_merge:
            for layer in layers:  # every layer is checked before any is written
                layer.check_merge(names)
        done: list[LoraLayer] = []
        try:
            for layer in layers:
                layer.merge(names)
                done.append(layer)
        except Exception:
            for layer in done:  # all or nothing
                layer.unmerge()
            raise
        # The merged adapters become the active ones in every module, as set_adapter would make them.
        for _, module in [*self.lora_layers(), *self.full_copies()]:
            module.set_active(names)
        self.active_adapters = names
        self._refresh_trainable()

    def unmerge(self) -> None:
        """Restore the base weights (within float rounding) and compute adapters separately again."""
        for _, layer in self.lora_layers():
            layer.unmerge()

    def merge_and_unload(self, *, safe_merge: bool = False) -> nn.Module:
        """Merge the active adapters and return the plain model, with no lorakit module left in it.

        On a 4-bit / 8-bit base the result is a 16-bit model: adapted layers get the dequantized weight
        plus the delta, and every other quantized layer is dequantized too (re-quantizing would round the
        merged weights to 4 bits again).
        """
        if not self.merged_adapters:
            self.merge(safe_merge=safe_merge)
        for name, layer in list(self.lora_layers()):
            replace_module(self.model, name, layer.base_layer)
        for name, module in list(self.full_copies()):
            replace_module(self.model, name, module.active_module())
        for kind in base_kinds(self.model):  # quantized layers no adapter targets: plain too (see inject.BaseKind)
            kind.unload(self.model)
        self.adapter_configs.clear()
        self.active_adapters = []
        return self.model

    def unwrap(self) -> nn.Module:
        """Remove every adapter without merging: the model goes back to its original modules."""
        self.unmerge()
        for name, layer in list(self.lora_layers()):
            replace_module(self.model, name, layer.base_layer)
        for name, module in list(self.full_copies()):
            replace_module(self.model, name, module.original_module)
        self.adapter_configs.clear()
        self.active_adapters = []
        return self.model

    def cast_adapters(self, dtype: torch.dtype) -> None:
        """Store every adapter weight (A, B, DoRA magnitude, ...) in `dtype`, e.g. bfloat16 to halve their memory."""
        for _, layer in self.lora_layers():
            for adapter in layer.adapters.values():
                adapter.cast(dtype)

    def compute_adapters_in_base_dtype(self, enabled: bool = True) -> None:
        """Run plain LoRA's matmuls in each layer's base output dtype (bf16 on a bf16 base) while the adapter
        weights stay as they are (fp32 master copies that the optimizer updates). Faster on a 16-bit base
        (bench/train_speed.py), rounding the low-rank update to bf16 as the base output already is; off by
        default, so a fp32 adapter computes in fp32 as PEFT does. fit() turns it on (speed.adapter_compute)."""
        for _, layer in self.lora_layers():
            layer.compute_in_base_dtype = enabled

    # ---- files -------------------------------------------------------------------------------------
    def save_adapter(self, path: str | Path, adapter_names: Sequence[str] | None = None) -> None:
        """Write adapters in PEFT's layout: "default" in `path`, any other adapter in `path/<name>/`."""
        names = list(self.adapter_configs if adapter_names is None else adapter_names)
        self._require(names)
        save_adapters(self, Path(path), names)

    # ---- report ------------------------------------------------------------------------------------
    def trainable_parameters(self) -> TrainableReport:
        trainable = total = 0
        seen: set[int] = set()
        for p in self.model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return TrainableReport(trainable=trainable, total=total)

    def __repr__(self) -> str:
        return f"LoraModel(adapters={list(self.adapter_configs)}, active={self.active_adapters})\n{self.model!r}"


def _batch_rows(args: tuple, kwargs: dict) -> int | None:
    """Rows in the batch a forward/generate call was given (input_ids or inputs_embeds), if it can be told."""
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def wrap(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> LoraModel:
    """Freeze `model` and inject a fresh LoRA adapter; returns the LoraModel (the model is changed in place)."""
    if isinstance(model, LoraModel):
        raise AdapterError("this model is already wrapped; use lora_model.add_adapter(name, config)")
    return LoraModel(model, config, adapter_name)

