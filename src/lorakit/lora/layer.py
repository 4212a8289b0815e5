"""LoRA layers: a frozen base layer plus named adapters, each an object of its method (lora/methods/).

    y = base(x) + sum over active adapters of adapter.delta(x, base(x))

We wrap the base layer (`self.base_layer`) rather than subclass it, and keep adapter tensors in
ParameterDicts keyed by adapter name (`lora_A.<name>`, PEFT's layout), so several adapters live side by side
and switching between them copies nothing. All weight algebra is written for the (out, in) orientation;
each subclass says how its base weight is laid out and how input enters A (a matmul for Linear / Conv1D, a
lookup for Embedding).
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError, ConfigError
from .methods.base import Adapter
from .routing import current_routing


class LoraLayer(nn.Module):
    """Common bookkeeping: adapters, activation, merge and unmerge; the math is the adapters' own."""

    in_features: int
    out_features: int
    uses_dropout = True  # False where dropout on the input makes no sense (token ids)
    matmul_input = False  # True where down(x, A) is a matmul, so A and B may be cast to the input's dtype
    factor_keys = ("lora_A.weight", "lora_B.weight")  # PEFT's file keys for LoRA's A and B on this kind of layer

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        # LoRA's and DoRA's stores, made up front: their order in the state dict stays as it always was, and
        # code that reads layer.lora_magnitude finds it empty. Other methods' stores are made on first use.
        self.lora_A = nn.ParameterDict()  # name -> (r, in)
        self.lora_B = nn.ParameterDict()  # name -> (out, r)
        self.lora_magnitude = nn.ParameterDict()  # DoRA only: name -> (out,)
        self.lora_dropout = nn.ModuleDict()  # only adapters with p > 0: no identity op at p = 0
        self.train(base_layer.training)  # new modules say "training"; keep the model's mode (after creating them)
        self.adapters: dict[str, Adapter] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False
        self._merge_states: dict[str, Any] = {}  # what each merged adapter needs to unmerge exactly (merge_state)
        # Run plain LoRA's matmuls in the base output's dtype (LoraModel.compute_adapters_in_base_dtype).
        self.compute_in_base_dtype = False

    # ---- what subclasses provide ----------------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        """The base weight as an (out, in) tensor (a view where the layout allows)."""
        raise NotImplementedError

    def _set_base_weight(self, weight_out_in: torch.Tensor) -> None:
        """Overwrite the base weight in place from an (out, in) tensor."""
        raise NotImplementedError

    def base_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        """dtype and device of the base weight (cheaper than base_weight() where that dequantizes)."""
        weight = self.base_weight()
        return weight.dtype, weight.device

    def down(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """x -> x A^T for A (r, in), shape (..., r)."""
        raise NotImplementedError

    # ---- adapters ----------------------------------------------------------------------------------
    def store(self, attr: str) -> nn.ParameterDict:
        """The ParameterDict `attr` (adapter name -> tensor), made on first use; `attr` is the parameter
        names' `<layer>.<attr>.<adapter>` part."""
        if attr not in self._modules:
            self.add_module(attr, nn.ParameterDict().train(self.training))
        return self._modules[attr]

    def adapter_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        """dtype and device for new adapter tensors."""
        base_dtype, device = self.base_dtype_device()
        # Keep adapters in fp32 on a 16-bit base: their updates are tiny next to W and would round away.
        if base_dtype in (torch.float16, torch.bfloat16) or not base_dtype.is_floating_point:
            return torch.float32, device
        return base_dtype, device

    def add_adapter(self, name: str, method: type[Adapter], config: Any, module_name: str, *, init: Any = None) -> None:
        """Add adapter `name` of `method`, configured by `config` for the module at `module_name`."""
        if name in self.adapters:
            raise AdapterError(f"adapter {name!r} already exists on this layer")
        self.adapters[name] = method(self, name, config, module_name, init=init)

    def adapter_parameters(self) -> Iterator[tuple[str, str, nn.Parameter]]:
        """(adapter name, role, parameter) for every tensor of every adapter on this layer."""
        for name, adapter in self.adapters.items():
            for role, p in adapter.tensors().items():
                yield name, role, p

    @property
    def scaling(self) -> dict[str, float]:
        """Adapter name -> s of its s B A, for the adapters that have one (LoRA, DoRA)."""
        return {n: a.scaling for n, a in self.adapters.items() if hasattr(a, "scaling")}

    def init_factors(self, A: torch.Tensor, B: torch.Tensor, scaling: float, init: bool | str) -> None:
        """Fill LoRA's A (r, in) and B (out, r) in place as init_lora_weights says."""
        r = A.shape[0]
        with torch.no_grad():
            if init is True:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # as nn.Linear, as in the LoRA paper's code
                nn.init.zeros_(B)
            elif init == "gaussian":
                nn.init.normal_(A, std=1 / r)
                nn.init.zeros_(B)
            elif init is False:  # both random: a non-trivial adapter for tests
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                nn.init.kaiming_uniform_(B, a=math.sqrt(5))
            elif isinstance(init, str) and init.startswith("pissa"):
                self._pissa_init(A, B, scaling, init)
            else:
                raise ConfigError(f"init_lora_weights={init!r} is not supported")

    def _pissa_init(self, A: torch.Tensor, B: torch.Tensor, s: float, init: str) -> None:
        # PiSSA (Meng et al. 2024, sec. 3): W = U S V^T; the adapter takes the top-r singular
        # triplets, B A = U_r S_r V_r^T / scaling, and W keeps the residual, so outputs start unchanged.
        W = self.base_weight().float()
        r = A.shape[0]
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        else:
            niter = int(init.rsplit("_", 1)[1])
            U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
            Vh = V.T
        root = torch.sqrt(S[:r] / s)
        A.copy_(root[:, None] * Vh[:r])  # (r, in)
        B.copy_(U[:, :r] * root[None, :])  # (out, r)
        self._set_base_weight((W - s * (B.float() @ A.float())).to(self.base_weight().dtype))

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise AdapterError(f"adapter {name!r} is merged into the weights; call unmerge() before deleting it")
        adapter = self.adapters.pop(name, None)
        if adapter is not None:
            adapter.delete()
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapters]

    # ---- math --------------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """Adapter `name`'s (out, in) fp32 update of its own weights (s B A for LoRA and DoRA)."""
        return self.adapters[name].delta_weight()

    def without_bias(self, base_out: torch.Tensor) -> torch.Tensor:
        bias = getattr(self.base_layer, "bias", None)
        return base_out - bias if bias is not None else base_out

    def _delta(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """What adapter `name` adds for the routed rows x: one call per adapter present in the batch."""
        return self.adapters[name].delta(x, base_out)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        routing = current_routing()
        if self.adapters_disabled or (not self.active_adapters and routing is None):
            return self.base_layer(x, *args, **kwargs)
        if self.merged_adapters:
            if routing is not None:
                raise AdapterError("adapter_names cannot be used while adapters are merged; call unmerge() first")
            if self.training and torch.is_grad_enabled():
                raise AdapterError(
                    "cannot train while adapters are merged into the base weights; call unmerge() first "
                    "(or model.eval() / torch.no_grad() for inference)"
                )
            return self.base_layer(x, *args, **kwargs)
        base_out = self.base_layer(x, *args, **kwargs)
        if routing is not None:
            groups = routing.groups(x.shape[0], x.device)
            if len(groups) > 1 and not torch.is_grad_enabled():
                together = self._mixed_together(groups, x, base_out)
                if together is not None:
                    return together
            # One grouped matmul per adapter present: gather its rows, compute, add them back in place.
            # Row groups are disjoint; clone once only when autograd records (base_out may be saved).
            result = base_out.clone() if torch.is_grad_enabled() else base_out
            for name, rows in groups:
                adapter = self.adapters.get(name)
                if adapter is None:
                    continue
                base_rows = base_out.index_select(0, rows) if adapter.uses_base_out else base_out
                delta = self._delta(name, x.index_select(0, rows), base_rows)
                result.index_add_(0, rows, delta.to(result.dtype))
            return result
        # Each adapter sees the base output, not the running sum: DoRA's term uses W x alone.
        result = base_out
        for name in self.active_adapters:
            result = self.adapters[name].add_to(x, base_out, result)
        return result

    def _mixed_together(self, groups: list[tuple[str, torch.Tensor]], x: torch.Tensor, base_out: torch.Tensor) \
            -> torch.Tensor | None:
        """A mixed batch's LoRA updates in two matmuls for all its adapters (inference): x against every present
        adapter's A stacked (batch, ..., sum r), each row's columns of other adapters zeroed and its own scaled,
        then against the B's side by side, added to base_out in the same GEMM. Instead of a gather, two small
        matmuls and a scatter per adapter: at a decode step of a few rows per adapter those are mostly overhead.
        None when some adapter's update is not plain LoRA (DoRA, dropout running): the grouped loop does it."""
        present = [(name, rows, self.adapters[name]) for name, rows in groups if name in self.adapters]
        factors = [adapter.low_rank_factors(base_out.dtype) for _, _, adapter in present]
        if not present or any(f is None for f in factors):
            return None
        A = torch.cat([f[0] for f in factors])  # (R, in)
        B = torch.cat([f[1] for f in factors], dim=1)  # (out, R)
        column_scale = torch.zeros(x.shape[0], A.shape[0], dtype=A.dtype, device=x.device)  # (batch, R)
        start = 0
        for (_, rows, _), (A_i, _, scaling) in zip(present, factors):
            column_scale[rows, start:start + A_i.shape[0]] = scaling
            start += A_i.shape[0]
        down = self.down(x, A)  # (batch, ..., R)
        down = down * column_scale.view(x.shape[0], *([1] * (down.dim() - 2)), A.shape[0])
        out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), down.reshape(-1, A.shape[0]).to(B.dtype), B.t())
        return out.view(base_out.shape)

    # ---- merge -------------------------------------------------------------------------------------
    def _merge_terms(self, names: list[str], states: dict[str, Any]):
        """Row factor f (out,) and additive term D (out, in) such that merged W' = f * W + D.

        Each adapter gives its own (c_i, D_i) (Adapter.merge_terms); together f = 1 + sum_i (c_i - 1) and
        D = sum_i D_i, the exact sum the unmerged forward computes.
        """
        f = torch.ones(self.out_features, dtype=torch.float32, device=self.base_dtype_device()[1])
        D = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=f.device)
        for name in names:
            c, added = self.adapters[name].merge_terms(states[name])
            if c is not None:
                f = f + (c - 1)
            if added is not None:
                D = D + added
        return f, D

    def _merged_weight(self, names: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The (out, in) base weight with `names` folded in, in the base dtype, computed in a copy."""
        W = self.base_weight()
        states = {n: self.adapters[n].merge_state() for n in names}
        f, D = self._merge_terms(names, states)
        return (f[:, None] * W.float() + D).to(W.dtype), states

    @torch.no_grad()
    def check_merge(self, names: list[str]) -> None:
        """Raise AdapterError if merging `names` would give NaN or inf weights; writes nothing."""
        names = [n for n in names if n in self.adapters]
        if names and not torch.isfinite(self._merged_weight(names)[0]).all():
            raise AdapterError(f"merging adapter(s) {names} gives NaN or inf weights; the base weights were left unchanged")

    @torch.no_grad()
    def merge(self, names: list[str]) -> None:
        """Fold `names` into the base weight (LoraModel.merge runs check_merge first for safe_merge)."""
        names = [n for n in names if n in self.adapters]
        if not names:
            return
        if self.merged_adapters:
            raise AdapterError(f"adapters {self.merged_adapters} are already merged; call unmerge() first")
        merged, states = self._merged_weight(names)
        self._store_merged(merged)
        self._merge_states = states
        self.merged_adapters = list(names)

    def _store_merged(self, merged_out_in: torch.Tensor) -> None:
        """Make the merged weight the one the base layer computes with (here: written in place)."""
        self._set_base_weight(merged_out_in)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        self._restore_unmerged()
        self.merged_adapters = []
        self._merge_states = {}

    def _restore_unmerged(self) -> None:
        """Undo _store_merged (here: W = (W' - D) / f, within float rounding)."""
        W = self.base_weight()
        f, D = self._merge_terms(self.merged_adapters, self._merge_states)
        self._set_base_weight(((W.float() - D) / f[:, None]).to(W.dtype))


class LoraLinear(LoraLayer):
    """LoRA on nn.Linear (weight (out, in)) or GPT-2's Conv1D (weight (in, out): fan_in_fan_out)."""

    matmul_input = True

    def __init__(self, base_layer: nn.Module, *, fan_in_fan_out: bool = False):
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        rows, cols = base_layer.weight.shape
        self.in_features, self.out_features = (rows, cols) if fan_in_fan_out else (cols, rows)

    def base_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def _set_base_weight(self, weight_out_in: torch.Tensor) -> None:
        target = self.base_layer.weight
        target.data.copy_(weight_out_in.T if self.fan_in_fan_out else weight_out_in)

    def down(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(A.dtype), A)


class LoraEmbedding(LoraLayer):
    """LoRA on nn.Embedding. In (out, in) terms out = embedding_dim and in = num_embeddings,
    so A is (r, num_embeddings) and the lookup x -> A^T[x] plays the role of x A^T."""

    uses_dropout = False  # dropout on token ids makes no sense; PEFT skips it for embeddings too
    factor_keys = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.weight.shape

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight.T

    def _set_base_weight(self, weight_out_in: torch.Tensor) -> None:
        self.base_layer.weight.data.copy_(weight_out_in.T)

    def init_factors(self, A: torch.Tensor, B: torch.Tensor, scaling: float, init: bool | str) -> None:
        # As PEFT (and the LoRA paper's code) for embeddings: A zeros and B normal, the roles swapped.
        if isinstance(init, str) and init.startswith("pissa"):
            raise ConfigError("init_lora_weights='pissa' is not supported for embedding layers; target linear layers")
        with torch.no_grad():
            if init is False:
                A.normal_()
            else:
                A.zero_()
            B.normal_()

    def down(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        out = F.embedding(x, A.T, padding_idx=base.padding_idx, max_norm=base.max_norm,
                          norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
        scale = getattr(base, "embed_scale", None)  # e.g. Gemma scales embeddings inside the layer
        return out * scale.to(out.dtype) if isinstance(scale, torch.Tensor) else out
