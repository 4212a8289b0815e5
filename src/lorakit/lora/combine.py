"""Building a new adapter from a weighted combination of existing ones (add_weighted_adapter).

With delta_i = s_i B_i A_i (out, in) for adapter i and weights w_i, per adapted layer:
  cat:    A = [w_1 s_1 A_1; ...; w_n s_n A_n], B = [B_1 ... B_n]     -> B A = sum_i w_i delta_i exactly
          (where the summed rank exceeds min(out, in), the full-rank svd below, equally exact)
  svd:    U S V^T = sum_i w_i delta_i, truncated to rank k; B = U_k sqrt(S_k), A = sqrt(S_k) V_k^T
  linear: A = sum_i sqrt(|w_i|) s_i A_i, B = sum_i sign(w_i) sqrt(|w_i|) B_i   (needs equal ranks;
          mixes the factors, so B A has cross terms unless the adapters share subspaces)
The new adapter has scaling 1 (lora_alpha = r per layer).
"""

from __future__ import annotations

import math
import re
import torch

from ..errors import AdapterError
from .config import LoraConfig
from .layer import LoraLayer
from .layout import WrappedModel
from .methods import Lora, method_for

COMBINATIONS = ("linear", "cat", "svd")


def _combine_layer(layer: LoraLayer, adapters, weights, kind, svd_rank):
    present = [(layer.adapters[a], w) for a, w in zip(adapters, weights) if a in layer.adapters]
    full_rank = min(layer.out_features, layer.in_features)
    if kind == "cat" and sum(a.rank for a, _ in present) > full_rank:
        # More rank than the layer has: a full-rank SVD of the same sum is just as exact, and a legal rank.
        kind, svd_rank = "svd", full_rank
    if kind == "cat":
        A = torch.cat([w * a.scaling * a.A.float() for a, w in present], dim=0)  # (sum r_i, in)
        B = torch.cat([a.B.float() for a, _ in present], dim=1)  # (out, sum r_i)
        return A, B
    if kind == "linear":
        ranks = {a.rank for a, _ in present}
        if len(ranks) > 1:
            raise AdapterError(
                f"combination_type='linear' needs adapters of equal rank, got ranks {sorted(ranks)}; use 'cat' or 'svd'"
            )
        A = sum(math.sqrt(abs(w)) * a.scaling * a.A.float() for a, w in present)
        B = sum(math.copysign(math.sqrt(abs(w)), w) * a.B.float() for a, w in present)
        return A, B
    delta = sum(w * a.delta_weight() for a, w in present)  # (out, in)
    k = svd_rank or max(a.rank for a, _ in present)
    k = min(k, *delta.shape)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    root = torch.sqrt(S[:k])
    return root[:, None] * Vh[:k], U[:, :k] * root[None, :]


def weighted_adapter(
    model: WrappedModel,
    adapters: list[str],
    weights: list[float],
    new_name: str,
    kind: str,
    svd_rank: int | None,
) -> None:
    if kind not in COMBINATIONS:
        raise AdapterError(f"combination_type must be one of {', '.join(COMBINATIONS)}; got {kind!r}")
    if len(adapters) != len(weights) or not adapters:
        raise AdapterError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank <= 0):
        raise AdapterError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    configs = [model.adapter_configs[a] for a in adapters]
    if any(c.use_dora for c in configs):
        raise AdapterError("DoRA adapters cannot be combined: their magnitude vectors do not add; merge them instead")
    other = next(((a, c) for a, c in zip(adapters, configs) if method_for(c) is not Lora), None)
    if other is not None:  # the combinations mix LoRA's A and B factors
        raise AdapterError(f"only plain LoRA adapters can be combined; {other[0]!r} is a {other[1].peft_type} adapter")
    if any(c.modules_to_save for c in configs):
        raise AdapterError("adapters with modules_to_save cannot be combined: full module copies do not add")

    with torch.no_grad():
        factors = {
            name: _combine_layer(layer, adapters, weights, kind, svd_rank)
            for name, layer in model.lora_layers()
            if any(a in layer.adapters for a in adapters)
        }
    ranks = {name: A.shape[0] for name, (A, _) in factors.items()}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    others = {re.escape(n): r for n, r in ranks.items() if r != common}
    config = LoraConfig(
        r=common,
        lora_alpha=common,
        target_modules=sorted(factors),
        rank_pattern=others,
        alpha_pattern=dict(others),
        bias=configs[0].bias,
        base_model_name_or_path=configs[0].base_model_name_or_path,
        task_type=configs[0].task_type,
    )
    model.add_adapter(new_name, config, _init=False)
    with torch.no_grad():
        for name, layer in model.lora_layers():
            if name in factors:
                A, B = factors[name]  # (r, in), (out, r)
                adapter = layer.adapters[new_name]
                adapter.A.copy_(A)
                adapter.B.copy_(B)
