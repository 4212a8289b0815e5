"""Loading a 16-bit base straight into FSDP shards, so no process ever holds the whole model.

The model is built with its parameters on the meta device, each decoder layer is sharded with FSDP2
(`fully_shard`) while still empty, and only then is memory allocated: each process's 1/N of every layer,
plus the whole of what lies outside the layers (embeddings, final norm, head). The checkpoint is read one
tensor at a time (lorakit.quant.stream: positioned reads after the header is validated); a layer weight
is cut to this process's rows and the rest dropped at once, so the peak while loading is the shards plus
one full tensor. A checkpoint that cannot be streamed (no .safetensors, tensor names that are not the
model's own) is left to the caller, who loads it whole and shards it after.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..quant.load import build_on_meta, check_shape, require_complete
from ..quant.stream import iter_tensors
from .activation_checkpointing import decoder_layers
from .distributed import fully_shard_layers
from .runtime import Torchrun


def load_into_shards(source: str, config, files: list[Path], *, dtype: torch.dtype, device: torch.device,
                     run: Torchrun, options: dict) -> nn.Module | tuple[None, str]:
    """The model of `config` with its decoder layers fully_shard-ed over `run`'s processes and every tensor
    read from `files`; or (None, reason) when the checkpoint's names are not the model's own."""
    from torch.distributed.tensor import DTensor

    built = build_on_meta(config, files, dtype=dtype, options=options)
    if isinstance(built, str):
        return None, built
    model, entries, mapping = built
    layers = decoder_layers(model)
    if not layers:
        return None, f"{type(model).__name__} has no decoder layers lorakit can shard"
    model.requires_grad_(False)
    fully_shard_layers(layers, run.world, device.type)
    # to_empty allocates every parameter (a layer's as its local shard) and every buffer, uninitialised;
    # buffers computed at construction (rotary tables) were made for real, so they are put back.
    buffers = {name: b for name, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device=device)
    for name, buffer in buffers.items():
        module_name, _, leaf = name.rpartition(".")
        model.get_submodule(module_name)._buffers[leaf] = buffer.to(device)

    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for entry, tensor in iter_tensors(files, entries):
        target = mapping[entry.name]
        param = params.get(target)
        if param is None:  # a persistent buffer
            module_name, _, leaf = target.rpartition(".")
            model.get_submodule(module_name)._buffers[leaf] = tensor.to(device)
            continue
        check_shape(entry, tensor, param.shape)
        with torch.no_grad():
            if isinstance(param, DTensor):  # Shard(0): this process keeps torch.chunk's piece `rank`
                local = param.to_local()
                pieces = torch.chunk(tensor, run.world, dim=0)
                mine = pieces[run.rank] if run.rank < len(pieces) else tensor[:0]
                local.copy_(mine)  # copy_ converts the dtype: no second full tensor
            else:
                param.copy_(tensor)
        loaded.add(target)
        del tensor
    model.tie_weights()  # to_empty gave tied parameters separate storage; tie them again
    filled = {id(model.get_parameter(name)) for name in loaded}
    require_complete(source, sorted(n for n, p in model.named_parameters(remove_duplicate=False) if id(p) not in filled))
    model.eval()
    return model
