"""LoRA layers: a frozen base layer plus named low-rank adapters.

    y = base(x) + scaling * dropout(x) @ A^T @ B^T        A: (r, in), B: (out, r)

We wrap the base layer (`self.base_layer`) rather than subclass it, and keep adapters in dicts keyed
by adapter name, so several adapters live side by side and switching between them copies nothing.
All weight algebra is written for the (out, in) orientation; each subclass says how its base weight is
laid out and how input enters A (a matmul for Linear / Conv1D, a lookup for Embedding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError, ConfigError
from .routing import current_routing


class LoraLayer(nn.Module):
    """Common bookkeeping: adapters, activation, DoRA magnitudes, merge and unmerge."""

    in_features: int
    out_features: int
    uses_dropout = True  # False where dropout on the input makes no sense (token ids)

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()  # name -> (r, in)
        self.lora_B = nn.ParameterDict()  # name -> (out, r)
        self.lora_magnitude = nn.ParameterDict()  # DoRA only: name -> (out,)
        self.lora_dropout = nn.ModuleDict()  # only adapters with p > 0: no identity op at p = 0
        self.train(base_layer.training)  # new modules say "training"; keep the model's mode (after creating them)
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False
        self._merge_norms: dict[str, torch.Tensor] = {}  # DoRA weight norms used at merge time
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

    def _down(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x -> x A^T, shape (..., r)."""
        raise NotImplementedError

    def peft_tensor_names(self, name: str) -> dict[str, nn.Parameter]:
        """PEFT's file-key suffix for each tensor of adapter `name` (e.g. "lora_A.weight")."""
        raise NotImplementedError

    # ---- adapters ----------------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        *,
        r: int,
        alpha: float,
        dropout: float,
        use_rslora: bool,
        use_dora: bool,
        init: bool | str,
        dtype: torch.dtype | None = None,
    ) -> None:
        if name in self.lora_A:
            raise AdapterError(f"adapter {name!r} already exists on this layer")
        base_dtype, device = self.base_dtype_device()
        if dtype is None:
            # Keep adapters in fp32 on a 16-bit base: their updates are tiny next to W and would round away.
            dtype = torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype
        if not base_dtype.is_floating_point:
            dtype = torch.float32
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        A = torch.empty(r, self.in_features, dtype=dtype, device=device)
        B = torch.empty(self.out_features, r, dtype=dtype, device=device)
        self._init_weights(name, A, B, init)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        if dropout > 0 and self.uses_dropout:
            self.lora_dropout[name] = nn.Dropout(p=dropout).train(self.training)
        if use_dora:
            with torch.no_grad():
                norm = self._weight_norm(name)
            self.lora_magnitude[name] = nn.Parameter(norm.to(dtype))

    def _init_weights(self, name: str, A: torch.Tensor, B: torch.Tensor, init: bool | str) -> None:
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
                self._pissa_init(name, A, B, init)
            else:
                raise ConfigError(f"init_lora_weights={init!r} is not supported")

    def _pissa_init(self, name: str, A: torch.Tensor, B: torch.Tensor, init: str) -> None:
        # PiSSA (Meng et al. 2024, sec. 3): W = U S V^T; the adapter takes the top-r singular
        # triplets, B A = U_r S_r V_r^T / scaling, and W keeps the residual, so outputs start unchanged.
        W = self.base_weight().float()
        r, s = A.shape[0], self.scaling[name]
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
        for store in (self.lora_A, self.lora_B, self.lora_magnitude, self.lora_dropout):
            if name in store:
                del store[name]
        self.scaling.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.lora_A]

    # ---- math --------------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B @ A as an (out, in) fp32 tensor."""
        A, B = self.lora_A[name], self.lora_B[name]
        return self.scaling[name] * (B.float() @ A.float())

    def _weight_norm(self, name: str) -> torch.Tensor:
        # DoRA: ||W + s B A|| per output feature (Liu et al. 2024, eq. 5), shape (out,).
        return torch.linalg.vector_norm(self.base_weight().float() + self.delta_weight(name), dim=1)

    def _dora_scale(self, name: str) -> torch.Tensor:
        # The norm is treated as a constant (DoRA sec. 4.3): it gets no gradient, so build no graph for it.
        with torch.no_grad():
            norm = self._weight_norm(name)
        return self.lora_magnitude[name] / norm

    def _delta(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """What adapter `name` adds to the base output `base_out` for input x."""
        x, dropped = self._adapter_input(name, x)
        down = self._down(x, name) * self.scaling[name]  # (..., r): scale the small tensor, not the output
        update = F.linear(down, self.lora_B[name])  # (..., out)
        if name not in self.lora_magnitude:
            return update
        # DoRA: m / ||W + sBA|| * (W + sBA) x  =  base + (scale - 1) * W x + scale * sBA x.
        # With dropout the input differs from the base layer's, so W x is recomputed from it (as PEFT does).
        scale = self._dora_scale(name).to(update.dtype)  # (out,)
        base_term = F.linear(x, self.base_weight().to(x.dtype)) if dropped else self._without_bias(base_out)
        return (scale - 1) * base_term.to(update.dtype) + scale * update

    def _adapter_input(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """x after the adapter's dropout (training only), and whether dropout was applied."""
        if name in self.lora_dropout and self.training:
            return self.lora_dropout[name](x), True
        return x, False

    def _add_adapter(self, name: str, x: torch.Tensor, base_out: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result plus adapter `name`'s contribution."""
        return result + self._delta(name, x, base_out).to(result.dtype)

    def _without_bias(self, base_out: torch.Tensor) -> torch.Tensor:
        bias = getattr(self.base_layer, "bias", None)
        return base_out - bias if bias is not None else base_out

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
            # One grouped matmul per adapter present: gather its rows, compute, add them back in place.
            # Row groups are disjoint; clone once only when autograd records (base_out may be saved).
            result = base_out.clone() if torch.is_grad_enabled() else base_out
            for name, rows in routing.groups(x.shape[0], x.device):
                if name not in self.lora_A:
                    continue
                base_rows = base_out.index_select(0, rows) if name in self.lora_magnitude else base_out  # only DoRA reads it
                delta = self._delta(name, x.index_select(0, rows), base_rows)
                result.index_add_(0, rows, delta.to(result.dtype))
            return result
        # Each adapter sees the base output, not the running sum: DoRA's term uses W x alone.
        result = base_out
        for name in self.active_adapters:
            result = self._add_adapter(name, x, base_out, result)
        return result

    # ---- merge -------------------------------------------------------------------------------------
    def _merge_terms(self, names: list[str], norms: dict[str, torch.Tensor]):
        """Row factor f (out,) and additive term D (out, in) such that merged W' = f * W + D.

        Plain LoRA adds s B A. DoRA adapter i contributes (c_i - 1) W + c_i s B_i A_i with
        c_i = m_i / ||W + s B_i A_i||, the exact sum the unmerged forward computes.
        """
        f = torch.ones(self.out_features, dtype=torch.float32, device=self.base_dtype_device()[1])
        D = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=f.device)
        for name in names:
            delta = self.delta_weight(name)
            if name in self.lora_magnitude:
                c = self.lora_magnitude[name].float() / norms[name]
                f = f + (c - 1)
                D = D + c[:, None] * delta
            else:
                D = D + delta
        return f, D

    def _merged_weight(self, names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The (out, in) base weight with `names` folded in, in the base dtype, computed in a copy."""
        W = self.base_weight()
        norms = {n: self._weight_norm(n) for n in names if n in self.lora_magnitude}
        f, D = self._merge_terms(names, norms)
        return (f[:, None] * W.float() + D).to(W.dtype), norms

    @torch.no_grad()
    def check_merge(self, names: list[str]) -> None:
        """Raise AdapterError if merging `names` would give NaN or inf weights; writes nothing."""
        names = [n for n in names if n in self.lora_A]
        if names and not torch.isfinite(self._merged_weight(names)[0]).all():
            raise AdapterError(f"merging adapter(s) {names} gives NaN or inf weights; the base weights were left unchanged")

    @torch.no_grad()
    def merge(self, names: list[str]) -> None:
        """Fold `names` into the base weight (LoraModel.merge runs check_merge first for safe_merge)."""
        names = [n for n in names if n in self.lora_A]
        if not names:
            return
        if self.merged_adapters:
            raise AdapterError(f"adapters {self.merged_adapters} are already merged; call unmerge() first")
        merged, norms = self._merged_weight(names)
        self._store_merged(merged)
        self._merge_norms = norms
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
        self._merge_norms = {}

    def _restore_unmerged(self) -> None:
        """Undo _store_merged (here: W = (W' - D) / f, within float rounding)."""
        W = self.base_weight()
        f, D = self._merge_terms(self.merged_adapters, self._merge_norms)
        self._set_base_weight(((W.float() - D) / f[:, None]).to(W.dtype))


class LoraLinear(LoraLayer):
    """LoRA on nn.Linear (weight (out, in)) or GPT-2's Conv1D (weight (in, out): fan_in_fan_out)."""

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

    def _down(self, x: torch.Tensor, name: str) -> torch.Tensor:
        A = self.lora_A[name]
        return F.linear(x.to(A.dtype), A)

    def _plain_weights(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A (r, in) and B (out, r) for plain LoRA with `dtype` outputs, or None where the generic path computes
        (DoRA; or adapter and base dtypes differ and compute_in_base_dtype is off: the adapter's dtype, PEFT's way).
        With compute_in_base_dtype the small weights are cast, not the (tokens, features) activations: no fp32
        copy of x going in, no fp32 (tokens, out) update coming out; gradients still reach the fp32 weights."""
        A, B = self.lora_A[name], self.lora_B[name]
        if name in self.lora_magnitude or (B.dtype != dtype and not self.compute_in_base_dtype):
            return None
        return (A.to(dtype), B.to(dtype)) if B.dtype != dtype else (A, B)

    def _delta(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        # The routed (per-row) path: what _add_adapter adds, as a separate tensor.
        weights = self._plain_weights(name, base_out.dtype)
        if weights is None:
            return super()._delta(name, x, base_out)
        A, B = weights
        x, _ = self._adapter_input(name, x)
        return F.linear(F.linear(x.to(A.dtype), A) * self.scaling[name], B)  # (..., r) -> (..., out)

    def _add_adapter(self, name: str, x: torch.Tensor, base_out: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        weights = self._plain_weights(name, result.dtype)
        if weights is None:
            return super()._add_adapter(name, x, base_out, result)
        A, B = weights  # (r, in), (out, r)
        x, _ = self._adapter_input(name, x)
        down = F.linear(x.to(A.dtype), A) * self.scaling[name]  # (..., r)
        # "+ down B^T" fused into the GEMM (beta=1): no separate pass over the (..., out) output to add it.
        # Taken when adapter and base share a dtype (fp32, or a model cast to bf16 whole); then in bf16 the
        # sum is rounded once. Measured ~5% faster per training step (bench/lora_step.py).
        fused = torch.addmm(result.reshape(-1, self.out_features), down.reshape(-1, down.shape[-1]), B.t())
        return fused.view(result.shape)

    def peft_tensor_names(self, name: str) -> dict[str, nn.Parameter]:
        names = {"lora_A.weight": self.lora_A[name], "lora_B.weight": self.lora_B[name]}
        if name in self.lora_magnitude:
            names["lora_magnitude_vector"] = self.lora_magnitude[name]
        return names


class LoraEmbedding(LoraLayer):
    """LoRA on nn.Embedding. In (out, in) terms out = embedding_dim and in = num_embeddings,
    so A is (r, num_embeddings) and the lookup x -> A^T[x] plays the role of x A^T."""

    uses_dropout = False  # dropout on token ids makes no sense; PEFT skips it for embeddings too

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.weight.shape

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight.T

    def _set_base_weight(self, weight_out_in: torch.Tensor) -> None:
        self.base_layer.weight.data.copy_(weight_out_in.T)

    def _init_weights(self, name: str, A: torch.Tensor, B: torch.Tensor, init: bool | str) -> None:
        # As PEFT (and the LoRA paper's code) for embeddings: A zeros and B normal, the roles swapped.
        if isinstance(init, str) and init.startswith("pissa"):
            raise ConfigError("init_lora_weights='pissa' is not supported for embedding layers; target linear layers")
        with torch.no_grad():
            if init is False:
                A.normal_()
            else:
                A.zero_()
            B.normal_()

    def _down(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        out = F.embedding(x, self.lora_A[name].T, padding_idx=base.padding_idx, max_norm=base.max_norm,
                          norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
        scale = getattr(base, "embed_scale", None)  # e.g. Gemma scales embeddings inside the layer
        return out * scale.to(out.dtype) if isinstance(scale, torch.Tensor) else out

    def _delta(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        down = self._down(x, name) * self.scaling[name]
        update = F.linear(down, self.lora_B[name])
        if name not in self.lora_magnitude:
            return update
        scale = self._dora_scale(name).to(update.dtype)
        return (scale - 1) * base_out.to(update.dtype) + scale * update

    def peft_tensor_names(self, name: str) -> dict[str, nn.Parameter]:
        names = {"lora_embedding_A": self.lora_A[name], "lora_embedding_B": self.lora_B[name]}
        if name in self.lora_magnitude:
            names["lora_magnitude_vector"] = self.lora_magnitude[name]
        return names
