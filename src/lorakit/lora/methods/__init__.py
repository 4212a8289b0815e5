"""Adapter methods, one module each, and the registry that picks one for a config.

A method is an Adapter subclass (base.py): how it computes its update, merges, and names the tensors it
saves. A new method configured by LoraConfig's fields is one module plus one line in METHODS; layers,
routing, merge, save/load, multi-task training and the memory planner ask the adapter objects and need no
change, and the GGUF LoRA export refuses anything but plain LoRA. A method with its own config class also
needs io.read_adapter_config and inject.plan_injection to learn that class's fields.
"""

from __future__ import annotations

from typing import Any, Mapping

from ...errors import ConfigError
from .base import Adapter
from .dora import Dora
from .lora import Lora

METHODS: dict[tuple[str, bool], type[Adapter]] = {
    # (PEFT's peft_type, use_dora): PEFT has DoRA as a LoRA config with use_dora=True.
    ("LORA", False): Lora,
    ("LORA", True): Dora,
}


def method_for(config: Any) -> type[Adapter]:
    """The method a config asks for, from its class's `peft_type` and its use_dora flag."""
    key = (config.peft_type, bool(getattr(config, "use_dora", False)))
    if key not in METHODS:
        known = ", ".join(f"{t}{' + use_dora' if dora else ''}" for t, dora in METHODS)
        raise ConfigError(f"no adapter method for peft_type {key[0]!r}{' with use_dora' if key[1] else ''}; "
                          f"known: {known}")
    return METHODS[key]


def config_class_for(peft_type: str) -> type | None:
    """The config class that files of this `peft_type` are read into, or None if no method has it."""
    return next((m.config_class for (t, _), m in METHODS.items() if t == peft_type), None)


def parameter_roles(params: Mapping[str, Any]) -> dict[str, str]:
    """Parameter name -> role ("A", "B", "magnitude", ...) for every adapter tensor among `params` (names as
    named_parameters() gives them); other parameters (modules_to_save copies, biases) are left out.

    An adapter tensor's name is `<layer path>.<store>.<adapter name>` (adapter names hold no dots), and each
    method declares which role its stores hold, so the role is read from the store, for every layer kind."""
    roles = {store: role for method in METHODS.values() for role, store in method.stores.items()}
    found = {}
    for name in params:
        parts = name.rsplit(".", 2)
        if len(parts) == 3 and parts[1] in roles:
            found[name] = roles[parts[1]]
    return found


__all__ = ["METHODS", "Adapter", "Dora", "Lora", "config_class_for", "method_for", "parameter_roles"]
