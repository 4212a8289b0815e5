"""Optimizer state keyed by parameter NAME, split into tensors (for safetensors) and JSON.

`optimizer.state_dict()` numbers parameters by their position in `param_groups`, so restoring it into an
optimizer built with the parameters in another order would silently give each parameter another one's
moments. Here every per-parameter entry carries the parameter's name, and loading maps names back to the
positions of the optimizer being restored. Param groups themselves stay positional (group 0 is group 0),
because LR schedulers keep per-group lists (`base_lrs`) by position too; a group must hold the same set
of names as when it was saved.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from ..errors import CheckpointError


def _names_in_order(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> list[list[str]]:
    """Parameter names per param group, in the optimizer's order."""
    by_id = {id(p): name for name, p in params.items()}
    groups = []
    for index, group in enumerate(optimizer.param_groups):
        names = []
        for p in group["params"]:
            if id(p) not in by_id:
                raise CheckpointError(
                    f"optimizer param group {index} holds a parameter of shape {list(p.shape)} that is not among the "
                    "named parameters given; pass every parameter the optimizer updates (e.g. trainable_parameters(model))"
                )
            names.append(by_id[id(p)])
        groups.append(names)
    return groups


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]
                            ) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer`'s state into tensors keyed `"<param name>/<state key>"` and a JSON-able description."""
    groups = _names_in_order(optimizer, params)
    position_to_name = [name for names in groups for name in names]
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    per_param: dict[str, dict] = {}
    for position, entry in sd["state"].items():
        name = position_to_name[position]
        record: dict = {"tensors": [], "values": {}}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                # clone: safetensors refuses tensors that share storage, and the optimizer keeps stepping.
                tensors[f"{name}/{key}"] = value.detach().to("cpu").contiguous().clone()
                record["tensors"].append(key)
            else:
                record["values"][key] = value
        per_param[name] = record
    meta = {
        "class": type(optimizer).__name__,
        "param_groups": [
            {"params": names, "hyper": {k: v for k, v in group.items() if k != "params"}}
            for names, group in zip(groups, sd["param_groups"])
        ],
        "state": per_param,
    }
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"the optimizer state has a value JSON cannot hold ({err}); "
                              "tensor-valued hyper-parameters (e.g. a tensor lr) are not supported") from None
    return tensors, meta


def optimizer_state_from_names(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter],
                               tensors: dict[str, torch.Tensor], meta: dict, source: str) -> dict:
    """Check a saved state against `optimizer` and build the positional state_dict it loads.

    Nothing is changed here; the caller calls `optimizer.load_state_dict(result)` once every part of the
    checkpoint has been checked, so a refused checkpoint leaves the optimizer as it was.
    """
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list) or not isinstance(meta.get("state"), dict):
        raise CheckpointError(f"{source}: the optimizer state is malformed (expected 'param_groups' and 'state')")
    if meta.get("class") != type(optimizer).__name__:
        raise CheckpointError(f"{source}: the checkpoint holds {meta.get('class')} state; the optimizer now is "
                              f"{type(optimizer).__name__}")
    groups = _names_in_order(optimizer, params)
    saved_groups = meta["param_groups"]
    if len(saved_groups) != len(groups):
        raise CheckpointError(f"{source}: the checkpoint has {len(saved_groups)} optimizer param group(s), "
                              f"the optimizer now has {len(groups)}")
    for index, (names, saved) in enumerate(zip(groups, saved_groups)):
        saved_names = saved.get("params", []) if isinstance(saved, dict) else []
        missing = [n for n in names if n not in saved_names]
        if missing:
            raise CheckpointError(f"{source}: parameter {missing[0]!r} is in optimizer param group {index} but not in "
                                  "that group in the checkpoint")
        extra = [n for n in saved_names if n not in names]
        if extra:
            raise CheckpointError(f"{source}: the checkpoint's optimizer param group {index} has parameter {extra[0]!r}, "
                                  "which that group does not have now")

    position = {name: i for i, name in enumerate(n for names in groups for n in names)}
    expected_keys = set()
    state: dict[int, dict] = {}
    for name, record in meta["state"].items():
        if name not in position:
            raise CheckpointError(f"{source}: optimizer state for unknown parameter {name!r}")
        if not isinstance(record, dict):
            raise CheckpointError(f"{source}: the optimizer state of {name!r} is malformed")
        entry = dict(record.get("values", {}))
        for key in record.get("tensors", []):
            tensor = tensors.get(f"{name}/{key}")
            if tensor is None:
                raise CheckpointError(f"{source}: missing optimizer tensor {name + '/' + key!r}")
            # Adam-family and SGD moments have their parameter's shape; "step" is a scalar.
            if key != "step" and tensor.shape != params[name].shape:
                raise CheckpointError(f"{source}: optimizer tensor {name + '/' + key!r} has shape {list(tensor.shape)}, "
                                      f"the parameter has {list(params[name].shape)}")
            entry[key] = tensor
            expected_keys.add(f"{name}/{key}")
        state[position[name]] = entry
    unexpected = sorted(set(tensors) - expected_keys)
    if unexpected:
        raise CheckpointError(f"{source}: unexpected optimizer tensor {unexpected[0]!r}")

    param_groups = []
    for names, saved, live in zip(groups, saved_groups, optimizer.param_groups):
        hyper = dict(saved.get("hyper", {}))
        for key, value in hyper.items():
            if isinstance(live.get(key), tuple) and isinstance(value, list):
                hyper[key] = tuple(value)  # JSON turned (beta1, beta2) into a list; keep the optimizer's own type
        param_groups.append({**hyper, "params": [position[n] for n in names]})
    return {"state": state, "param_groups": param_groups}
