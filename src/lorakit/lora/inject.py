"""Finding target modules by name, checking them, and swapping in LoRA wrappers.

Matching follows PEFT exactly (so a PEFT config selects the same layers here): a list entry matches a
module whose name equals it or ends with "." + it; a string is a regex matched against the whole name.
Everything is checked before the first module is replaced, so a bad config leaves the model untouched.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Callable, Protocol

from torch import nn

from ..errors import ConfigError, TargetNotFoundError
from .config import ALL_LINEAR, DEFAULT_TARGETS, LoraConfig
from .full_copy import FullCopy
from .layer import LoraEmbedding, LoraLayer, LoraLinear
from .methods import method_for


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D: a linear layer whose weight is stored (in, out).
    return type(module).__name__ == "Conv1D" and hasattr(module, "weight") and module.weight.dim() == 2


def is_quantized_linear(module: nn.Module) -> bool:
    # bitsandbytes Linear4bit / Linear8bitLt (subclasses of nn.Linear, so they must be matched first);
    # recognised by name so that the core never imports bitsandbytes.
    kind = type(module)
    return kind.__name__ in ("Linear4bit", "Linear8bitLt") and kind.__module__.startswith("bitsandbytes")


class BaseKind(Protocol):
    """A kind of base layer that LoRA cannot treat as plain torch (bitsandbytes' packed 4/8-bit layers). The
    package that makes such layers puts one in each layer's `lora_base_kind` attribute (lorakit.quant does),
    so that lora imports nothing of it."""

    def wrap(self, layer: nn.Module) -> LoraLayer:
        """The LoRA layer around `layer`."""
        ...

    def unload(self, model: nn.Module) -> None:
        """Turn every layer of this kind left in `model` into a plain torch layer (merge_and_unload)."""
        ...


def base_kinds(model: nn.Module) -> list[BaseKind]:
    """The kinds of the special base layers in `model`, each once."""
    kinds = {id(k): k for m in model.modules() if (k := getattr(m, "lora_base_kind", None)) is not None}
    return list(kinds.values())


def _unprepared_quantized(module: nn.Module) -> LoraLayer:
    raise ConfigError(
        f"this {type(module).__name__} (bitsandbytes) was not loaded by lorakit, so LoRA cannot read its packed "
        "weight; load the model with lorakit (model.quantization in the run config, or base_model.load_base_model), "
        "or call lorakit.quant.prepare_for_lora(model) before wrapping it",
        where="base model",
    )


# First match wins: bitsandbytes layers subclass nn.Linear, so they come before it.
WRAPPERS: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], LoraLayer]]] = [
    (lambda m: getattr(m, "lora_base_kind", None) is not None, lambda m: m.lora_base_kind.wrap(m)),
    (is_quantized_linear, _unprepared_quantized),
    (lambda m: isinstance(m, nn.Linear), lambda m: LoraLinear(m)),
    (_is_conv1d, lambda m: LoraLinear(m, fan_in_fan_out=True)),
    (lambda m: isinstance(m, nn.Embedding), lambda m: LoraEmbedding(m)),
]
LINEAR_KINDS: list[Callable[[nn.Module], bool]] = [lambda m: isinstance(m, nn.Linear), _is_conv1d]


def wrapper_for(module: nn.Module) -> Callable[[nn.Module], LoraLayer] | None:
    for accepts, make in WRAPPERS:
        if accepts(module):
            return make
    return None


@dataclass
class InjectionPlan:
    """The checked outcome of matching a config against a model, before anything changes."""

    targets: list[str]  # full module names that get the adapter
    full_copies: list[str]  # modules_to_save, full module names
    target_suffixes: list[str]  # the matched names' last components, for the saved config
    # fused expert weights (fused_expert_weights) that all-linear or a regex matching them passed over: warned of
    experts_left_out: dict[str, tuple[int, ...]] = field(default_factory=dict)


def resolve_target_modules(model: nn.Module, config: LoraConfig) -> list[str] | str:
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    raise ConfigError(
        f"target_modules is not set and there is no default for model type {model_type!r}; "
        "name the layers to adapt, e.g. target_modules=['q_proj', 'v_proj'] or 'all-linear'",
        where="LoraConfig",
    )


def _name_matches(spec: list[str] | str, name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _layer_index_ok(config: LoraConfig, name: str) -> bool:
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:
        return True
    patterns = config.layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == wanted if isinstance(wanted, int) else index in wanted


def fused_expert_weights(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Mixture-of-experts weights stored fused, one 3-D parameter (experts, ., .) per projection, as transformers
    now keeps Mixtral's, Qwen3-MoE's, DeepSeek's, GPT-OSS's and Llama 4's experts: no module holds one expert's
    matrix, so targeting modules by name cannot reach them. Full parameter name -> shape."""
    found = {}
    for module_name, module in model.named_modules():
        experts = getattr(module, "num_experts", None)
        if not isinstance(experts, int) or isinstance(module, LoraLayer):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.dim() == 3 and param.shape[0] == experts:
                found[f"{module_name}.{name}" if module_name else name] = tuple(param.shape)
    return found


def _shape(shape: tuple[int, ...]) -> str:
    return " x ".join(map(str, shape))


def experts_left_out_warning(left_out: dict[str, tuple[int, ...]]) -> str:
    """What a user whose all-linear adapter skipped the experts needs to know, in one message."""
    tails = sorted({".".join(name.split(".")[-2:]) for name in left_out})
    example = next(iter(left_out))
    return (f"this model keeps its experts' weights as fused parameters, one matrix per expert ({', '.join(tails)}; "
            f"e.g. {example}, shape {_shape(left_out[example])}), which are not linear modules: the "
            f"adapter leaves these {len(left_out)} out and trains only the linear layers it matched (attention and "
            "any dense MLP). lorakit cannot put LoRA on fused experts yet (PEFT: target_parameters); to silence "
            "this, name the linear layers in target_modules")


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Named modules as the user sees them: LoRA wrappers count as their base layer, internals hidden."""
    found: dict[str, nn.Module] = {}
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(module, (LoraLayer, FullCopy)):
            skip_prefixes.append(name + ".")
        found[name] = module
    return found


def _base_of(module: nn.Module) -> nn.Module:
    if isinstance(module, LoraLayer):
        return module.base_layer
    if isinstance(module, FullCopy):
        return module.original_module
    return module


def plan_injection(model: nn.Module, config: LoraConfig, *, init: bool | str | None = None) -> InjectionPlan:
    """Match and check `config` against `model`; `init` overrides config.init_lora_weights as in inject()."""
    init = config.init_lora_weights if init is None else init
    targets_spec = resolve_target_modules(model, config)
    modules = candidate_modules(model)
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    saved = config.modules_to_save or []

    def is_saved(name: str) -> bool:
        return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in saved)

    targets: list[str] = []
    problems: list[str] = []
    experts = fused_expert_weights(model)
    if isinstance(targets_spec, list):  # a name of a fused expert weight targets a parameter, not a module
        for wanted in targets_spec:
            named = [n for n in experts if n == wanted or n.endswith("." + wanted)]
            if named and not any(_name_matches([wanted], m) for m in modules):
                problems.append(f"target_modules {wanted!r} names a fused expert weight ({named[0]}, shape "
                                f"{_shape(experts[named[0]])}, one matrix per expert), a parameter, not "
                                "a module; lorakit cannot put LoRA on fused experts yet (PEFT: target_parameters). "
                                "Target the linear layers (attention and any dense MLP) instead")
    for name, module in modules.items():
        base = _base_of(module)
        if is_saved(name):
            continue
        if targets_spec == ALL_LINEAR:
            hit = any(kind(base) for kind in LINEAR_KINDS) and base is not output_head
        else:
            hit = _name_matches(targets_spec, name)
        if not hit or (config.exclude_modules and _name_matches(config.exclude_modules, name)):
            continue
        if not _layer_index_ok(config, name):
            continue
        if isinstance(module, FullCopy):  # saved in full by another adapter: wrapping it would drop those copies
            if targets_spec != ALL_LINEAR and not isinstance(targets_spec, str):
                problems.append(f"target {name!r} is in another adapter's modules_to_save; it cannot also get LoRA")
            continue
        if wrapper_for(base) is None:
            if targets_spec == ALL_LINEAR or isinstance(targets_spec, str):
                continue  # a regex may also match containers; only wrappable modules count
            problems.append(
                f"target {name!r} is a {type(base).__name__}, which LoRA cannot wrap "
                "(supported: nn.Linear, transformers Conv1D, nn.Embedding)"
            )
            continue
        targets.append(name)
    if problems:
        raise ConfigError(problems, where="LoraConfig")
    if not targets:
        raise TargetNotFoundError(_not_found_message(targets_spec, modules))

    for name in targets:
        layer = modules[name]
        base = _base_of(layer)
        probe = layer if isinstance(layer, LoraLayer) else wrapper_for(base)(base)
        r = config.rank_for(name)
        limit = min(probe.in_features, probe.out_features)
        if r > limit:
            problems.append(
                f"r={r} is larger than layer {name!r} allows ({probe.in_features} in, {probe.out_features} out: "
                f"at most {limit}); lower r or set rank_pattern for this layer"
            )
        if isinstance(probe, LoraEmbedding) and isinstance(init, str) and init.startswith("pissa"):
            # Checked here, not only in the layer: PiSSA rewrites base weights of layers wrapped before it.
            problems.append(
                f"init_lora_weights={init!r} is not supported for embedding layers ({name!r}); target linear layers"
            )
    full_copies = [name for name in modules if saved and is_saved(name) and not _inside_any(name, is_saved)]
    missing = [m for m in saved if not any(n == m or n.endswith("." + m) for n in full_copies)]
    if missing:
        problems.append(f"modules_to_save names {missing} that are not in the model")
    for name in full_copies:  # a full copy of LoRA layers would duplicate other adapters' weights inside it
        if any(isinstance(m, LoraLayer) for m in modules[name].modules()):
            problems.append(f"modules_to_save {name!r} holds LoRA layers of another adapter; it cannot also be saved in full")
    if problems:
        raise ConfigError(problems, where="LoraConfig")
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in targets})
    if targets_spec == ALL_LINEAR:
        left_out = experts
    elif isinstance(targets_spec, str):  # a regex that matches an expert weight or the module holding it
        left_out = {n: shape for n, shape in experts.items()
                    if _name_matches(targets_spec, n) or _name_matches(targets_spec, n.rsplit(".", 1)[0])}
    else:
        left_out = {}  # a list naming an expert weight was refused above
    return InjectionPlan(targets=targets, full_copies=full_copies, target_suffixes=suffixes,
                         experts_left_out=left_out)


def _inside_any(name: str, is_saved: Callable[[str], bool]) -> bool:
    """True when an enclosing module is itself saved in full (only the outermost one is copied)."""
    parts = name.split(".")
    return any(is_saved(".".join(parts[:i])) for i in range(1, len(parts)))


def _not_found_message(spec: list[str] | str, modules: dict[str, nn.Module]) -> str:
    wrappable = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if wrapper_for(_base_of(m))})
    lines = [f"target_modules {spec!r} matched no module LoRA can wrap in the base model."]
    if isinstance(spec, list):
        for target in spec:
            close = difflib.get_close_matches(target, wrappable, n=3)
            if close:
                lines.append(f"  {target!r}: did you mean {', '.join(map(repr, close))}?")
    lines.append(f"Modules that can be targeted: {', '.join(wrappable) if wrappable else '(none)'}")
    return "\n".join(lines)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject(model: nn.Module, config: LoraConfig, adapter_name: str, *, init: bool | str | None = None) -> InjectionPlan:
    """Add adapter `adapter_name` to every target of `config` (wrapping layers on first use)."""
    plan = plan_injection(model, config, init=init)
    method = method_for(config)
    for name in plan.targets:
        module = model.get_submodule(name)
        if not isinstance(module, LoraLayer):
            base = module
            module = wrapper_for(base)(base)
            replace_module(model, name, module)
        module.add_adapter(adapter_name, method, config, name, init=init)
    for name in plan.full_copies:
        module = model.get_submodule(name)
        if not isinstance(module, FullCopy):
            module = FullCopy(module)
            replace_module(model, name, module)
        module.add_adapter(adapter_name)
    return plan


CLASSIFICATION_TASKS = ("SEQ_CLS", "TOKEN_CLS")
# PEFT's CLASSIFIER_MODULE_NAMES (peft_model.py; pre_classifier since PEFT 0.22: DistilBERT's head starts random too)
CLASSIFIER_HEADS = ("classifier", "score", "pre_classifier")


def with_task_heads(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """For classification task types, train and save the new head in full, as PEFT does.

    A classifier head starts random, so an adapter is useless without it; PEFT adds it to
    modules_to_save for these task types and expects its weights in every such file.
    """
    if config.task_type not in CLASSIFICATION_TASKS:
        return config
    saved = list(config.modules_to_save or [])
    heads = [h for h in CLASSIFIER_HEADS if h not in saved and isinstance(getattr(model, h, None), nn.Module)]
    return config.replace(modules_to_save=saved + heads) if heads else config
