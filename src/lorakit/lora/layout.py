"""PEFT's layout of one adapter of a LoraModel: file key -> parameter, and the config dict PEFT reads.

Keys are `base_model.model.<module path>.<suffix>`. The suffixes of adapter tensors come from the adapter's
method (Adapter.saved_tensors: `lora_A.weight`, `lora_embedding_A`, `lora_magnitude_vector`, ...); full
`modules_to_save` copies keep the module's own parameter names; the biases an adapter trains are added as
its config's `bias` says. io.py writes and checks files by these names.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Protocol

from torch import nn

from .config import ALL_LINEAR, LoraConfig
from .full_copy import FullCopy
from .layer import LoraEmbedding, LoraLayer, LoraLinear

PREFIX = "base_model.model."
# PEFT's tensor names: the prefix, then module path and tensor name in dotted parts; no '/', '..' or spaces.
KEY_FORM = re.compile(r"base_model\.model(\.[\w-]+)+")


class WrappedModel(Protocol):
    """What the modules below lora.model (layout, io, combine) use of a LoraModel: it imports them, so they
    describe it here instead of importing it."""

    model: nn.Module
    adapter_configs: dict[str, LoraConfig]
    target_suffixes: dict[str, list[str]]

    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]: ...

    def full_copies(self) -> Iterator[tuple[str, FullCopy]]: ...

    def add_adapter(self, adapter_name: str, config: LoraConfig, *, _init: Any = None) -> None: ...

    def delete_adapter(self, adapter_name: str) -> None: ...


def adapter_tensors(model: WrappedModel, name: str) -> dict[str, nn.Parameter]:
    """PEFT file key -> the live parameter, for every tensor adapter `name` saves."""
    out: dict[str, nn.Parameter] = {}
    for path, layer in model.lora_layers():
        if name in layer.adapters:
            for suffix, param in layer.adapters[name].saved_tensors().items():
                out[f"{PREFIX}{path}.{suffix}"] = param
    for path, module in model.full_copies():
        if name in module.copies:
            for pname, param in module.copies[name].named_parameters():
                out[f"{PREFIX}{path}.{pname}"] = param
    for key, _, param in bias_tensors(model, name):
        out[key] = param
    return out


def base_biases(model: nn.Module, adapter_ids: set[int]) -> Iterator[tuple[str, nn.Parameter]]:
    """The base model's bias parameters: not adapter tensors (told by identity: an adapter may be named "bias"),
    not modules_to_save copies, not their frozen originals."""
    for pname, param in model.named_parameters():
        if pname.endswith("bias") and id(param) not in adapter_ids and ".original_module." not in pname \
                and ".copies." not in pname:
            yield pname, param


def bias_tensors(model: WrappedModel, name: str) -> list[tuple[str, str, nn.Parameter]]:
    """(file key, alternative spelling, parameter) for the biases adapter `name` trains.

    A bias is spelled `X.base_layer.bias` when this adapter adapts layer X (as PEFT writes it) and `X.bias`
    otherwise, whatever other adapters happen to wrap; loading accepts either spelling, so a file does not
    depend on which unrelated adapters were present when it was written or are present when it is read.
    """
    bias = model.adapter_configs[name].bias
    if bias == "none":
        return []
    wrapped = {path: layer for path, layer in model.lora_layers()}
    own = {path for path, layer in wrapped.items() if name in layer.adapters}
    adapter_ids = {id(p) for layer in wrapped.values() for _, _, p in layer.adapter_parameters()}
    found = []
    for pname, param in base_biases(model.model, adapter_ids):
        module_path = pname.removesuffix(".bias")
        layer_path = module_path.removesuffix(".base_layer")
        if layer_path == module_path or layer_path not in wrapped:
            layer_path = module_path  # not the base of a LoRA wrapper
        if bias == "lora_only" and layer_path not in own:
            continue
        long_key, short_key = f"{PREFIX}{layer_path}.base_layer.bias", f"{PREFIX}{layer_path}.bias"
        found.append((long_key, short_key, param) if layer_path in own else (short_key, long_key, param))
    return found


def optional_tensors(model: WrappedModel, name: str) -> dict[str, nn.Parameter]:
    """Keys PEFT may add that we accept: full embedding weights (PEFT's save_embedding_layers) and, with
    bias="all", the biases PEFT also picks up inside its modules_to_save wrapper: the copy's again (as
    `<module>.modules_to_save.bias`, equal to `<module>.bias`) and the original's (`<module>.original_module.bias`)."""
    out = {
        f"{PREFIX}{path}.base_layer.weight": layer.base_layer.weight
        for path, layer in model.lora_layers()
        if isinstance(layer, LoraEmbedding) and name in layer.adapters
    }
    if model.adapter_configs[name].bias == "all":
        for path, module in model.full_copies():
            if name not in module.copies:
                continue
            for prefix, part in (("modules_to_save", module.copies[name]), ("original_module", module.original_module)):
                for pname, param in part.named_parameters():
                    if pname == "bias" or pname.endswith(".bias"):
                        out[f"{PREFIX}{path}.{prefix}.{pname}"] = param
    return out


def peft_config_dict(model: WrappedModel, name: str) -> dict:
    config = model.adapter_configs[name]
    data = config.to_dict()
    if config.target_modules == ALL_LINEAR:
        # Full module names, as PEFT writes all-linear: last components alone could also select layers
        # all-linear leaves out (a head sharing a name with an adapted layer). Unlike PEFT we list only the
        # layers adapted (exclude_modules already applied), so readers that ignore exclude_modules agree too.
        data["target_modules"] = sorted(path for path, layer in model.lora_layers() if name in layer.adapters)
    elif config.target_modules is None:
        data["target_modules"] = model.target_suffixes[name]  # the default names, resolved: every reader understands them
    data["fan_in_fan_out"] = any(
        isinstance(layer, LoraLinear) and layer.fan_in_fan_out and name in layer.adapters
        for _, layer in model.lora_layers()
    )
    if not data["base_model_name_or_path"]:
        data["base_model_name_or_path"] = getattr(getattr(model.model, "config", None), "_name_or_path", None) or None
    data.update(peft_type=config.peft_type, inference_mode=True, lora_bias=False, revision=None)
    return dict(sorted(data.items()))
