"""LoraConfig: which layers get adapters and how, with PEFT's field names and meanings.

A config that PEFT writes (`adapter_config.json`) loads here and one we write loads in PEFT,
so every field below keeps PEFT's name, type and default.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import ConfigError

BIAS_CHOICES = ("none", "all", "lora_only")
INIT_CHOICES = "true, false, 'gaussian', 'pissa' or 'pissa_niter_<N>'"
ALL_LINEAR = "all-linear"
# Upper bounds for the numbers of an adapter config (a file is a trust boundary, lora/io.py). No layer of a
# released model is wider than MAX_RANK, and alpha / r beyond MAX_ALPHA only overflows the activations.
MAX_RANK = 65536
MAX_ALPHA = 1e6
# What each numeric field allows, as every message about it says it.
ALLOWED = {
    "r": f"a positive integer, at most {MAX_RANK}",
    "lora_alpha": f"a positive number, finite and at most {MAX_ALPHA:,.0f}",
    "lora_dropout": "a number in [0, 1)",
    "rank_pattern": f"a positive integer, at most {MAX_RANK}",
    "alpha_pattern": f"a positive number, finite and at most {MAX_ALPHA:,.0f}",
    "layers_to_transform": "a non-negative integer or a list of them",
}

# Targets used when `target_modules` is not given, by `model.config.model_type` (PEFT's defaults).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "deepseek_v2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
}


@dataclass(kw_only=True)
class LoraConfig:
    """How to adapt a model with LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

    Every field has PEFT's name and meaning, so configs move between PEFT and lorakit unchanged.
    """

    peft_type: ClassVar[str] = "LORA"
    """PEFT's kind of adapter, not a field: io.py writes it to adapter_config.json and picks the config class by it."""

    r: int = 8
    """Rank of the update B @ A. Typical values 4 to 64."""
    lora_alpha: float = 8
    """Scale numerator: the update is multiplied by lora_alpha / r (or lora_alpha / sqrt(r) with use_rslora)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input during training, in [0, 1). 0 skips dropout entirely."""
    target_modules: list[str] | str | None = None
    """Modules to adapt: a list of names matched exactly or as a dotted suffix ("q_proj"), a regex string
    matched against the full module name, or "all-linear" (every linear layer but the output head).
    None picks a default for known model types (q_proj and v_proj for Llama-style models)."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted, in the same forms as target_modules."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt targets inside these layer indices (e.g. [0, 1] for the first two decoder layers)."""
    layers_pattern: list[str] | str | None = None
    """Name of the module list holding the layers (e.g. "layers", "h"), used with layers_to_transform."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: {regex matched against the end of the module name: rank}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module lora_alpha overrides, matched like rank_pattern."""
    bias: str = "none"
    """Which biases train: "none", "all" (every bias in the model) or "lora_only" (biases of adapted layers)."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. a classification head "score")."""
    init_lora_weights: bool | str = True
    """True: A kaiming-uniform, B zeros (no change at start). "gaussian": A normal(0, 1/r), B zeros.
    False: A and B both random (tests only). "pissa": A, B from the top-r SVD of W, W replaced by its residual."""
    use_rslora: bool = False
    """Rank-stabilised LoRA (Kalajdzievski 2023): scale by lora_alpha / sqrt(r) instead of lora_alpha / r."""
    use_dora: bool = False
    """DoRA (Liu et al. 2024): a learnable magnitude per output feature times the normalised direction W + BA."""
    fan_in_fan_out: bool = False
    """True when the base weight is stored (in, out), like GPT-2's Conv1D. Set automatically for Conv1D."""
    base_model_name_or_path: str | None = None
    """The base model the adapter was trained on (informational; a mismatch on load warns)."""
    task_type: str | None = None
    """PEFT task type, e.g. "CAUSAL_LM" (informational)."""
    inference_mode: bool = False
    """When true, adapter weights are created frozen."""

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set)):
                setattr(self, name, list(dict.fromkeys(sorted(value) if isinstance(value, set) else value)))
        if isinstance(self.modules_to_save, (tuple, set)):
            self.modules_to_save = list(self.modules_to_save)
        problems = self.problems()
        if problems:
            raise ConfigError(problems, where="LoraConfig")

    # ---- validation -------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every problem with this config, each naming the field and what is allowed."""
        out: list[str] = []
        # Written so that NaN fails every comparison (`not x <= 0` would let NaN through).
        if not (_is_int(self.r) and 0 < self.r <= MAX_RANK):
            out.append(f"r must be {ALLOWED['r']}, got {self.r!r}")
        if not (_is_number(self.lora_alpha) and 0 < self.lora_alpha <= MAX_ALPHA):
            out.append(f"lora_alpha must be {ALLOWED['lora_alpha']}, got {self.lora_alpha!r}")
        if not (_is_number(self.lora_dropout) and 0.0 <= self.lora_dropout < 1.0):
            out.append(f"lora_dropout must be {ALLOWED['lora_dropout']}, got {self.lora_dropout!r}")
        for name in ("target_modules", "exclude_modules", "layers_pattern"):
            out += _check_names(name, getattr(self, name))
        ltt = self.layers_to_transform
        if ltt is not None:
            items = [ltt] if _is_int(ltt) else ltt
            if not isinstance(items, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in items):
                out.append(f"layers_to_transform must be {ALLOWED['layers_to_transform']}, got {ltt!r}")
        # PEFT refuses these combinations; refusing them here keeps every saved config loadable there.
        # ("all-linear" is fine: it is saved as the list of layers it resolved to.)
        regex_targets = isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR
        if regex_targets and (self.layers_to_transform is not None or self.layers_pattern is not None):
            out.append("layers_to_transform and layers_pattern cannot be used with a regex target_modules; "
                       "put the layer index in the regex, or give target_modules as a list of names")
        if self.layers_pattern and self.layers_to_transform is None:
            out.append("layers_pattern needs layers_to_transform: name the layer indices to adapt")
        for name, kind in (("rank_pattern", "rank"), ("alpha_pattern", "alpha")):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict):
                out.append(f"{name} must be a mapping of module-name regex to {kind}, got {pattern!r}")
                continue
            for key, value in pattern.items():
                out += _check_regex(f"{name} key", key)
                ok = (_is_int(value) and 0 < value <= MAX_RANK) if kind == "rank" else (
                    _is_number(value) and 0 < value <= MAX_ALPHA)
                if not ok:
                    out.append(f"{name}[{key!r}] must be {ALLOWED[name]}, got {value!r}")
        if self.bias not in BIAS_CHOICES:
            out.append(f"bias must be one of {', '.join(BIAS_CHOICES)}; got {self.bias!r}")
        mts = self.modules_to_save
        if mts is not None and not (isinstance(mts, list) and all(isinstance(m, str) and m for m in mts)):
            out.append(f"modules_to_save must be a list of module names, got {mts!r}")
        if not valid_init(self.init_lora_weights):
            out.append(f"init_lora_weights must be {INIT_CHOICES}; got {self.init_lora_weights!r}")
        for flag in ("use_rslora", "use_dora", "fan_in_fan_out", "inference_mode"):
            if not isinstance(getattr(self, flag), bool):
                out.append(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        return out

    # ---- per-module values -----------------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        return int(_pattern_value(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    # ---- dict round trip ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str = "LoraConfig") -> "LoraConfig":
        """Build from a plain mapping (YAML, JSON); unknown keys are an error with a suggestion."""
        if not isinstance(values, dict):
            raise ConfigError(f"expected a mapping of LoRA options, got {type(values).__name__}", where=where)
        known = field_names()
        problems = [_unknown_key_message(k, known) for k in values if k not in known]
        try:
            config = cls(**{k: v for k, v in values.items() if k in known})
        except ConfigError as err:
            problems += err.problems
        if problems:  # unknown keys and bad values reported together
            raise ConfigError(problems, where=where)
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "LoraConfig":
        return dataclasses.replace(self, **changes)


# Unknown keyword arguments get the same helpful message as unknown YAML keys (did-you-mean and the
# list of options) instead of dataclass's bare TypeError, so wrap the generated __init__.
_generated_init = LoraConfig.__init__


def _checked_init(self: LoraConfig, **kwargs: Any) -> None:
    unknown = [k for k in kwargs if k not in field_names()]
    if unknown:
        raise ConfigError([_unknown_key_message(k, field_names()) for k in unknown], where="LoraConfig")
    _generated_init(self, **kwargs)


_checked_init.__doc__ = _generated_init.__doc__
LoraConfig.__init__ = _checked_init  # type: ignore[method-assign]


def field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(LoraConfig)}


def _unknown_key_message(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{key}: unknown option{hint}; known options: {', '.join(sorted(known))}"


def _pattern_value(pattern: dict[str, Any], module_name: str, default: Any) -> Any:
    # PEFT semantics: the first key whose regex matches the end of the name at a dot boundary wins.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def valid_init(value: Any) -> bool:
    """Whether `value` is an init_lora_weights this config accepts (io.py also asks, of values read from files)."""
    if isinstance(value, bool):
        return True
    if not isinstance(value, str):
        return False
    return value == "gaussian" or value == "pissa" or re.fullmatch(r"pissa_niter_[1-9]\d*", value) is not None


def _check_names(name: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return _check_regex(name, value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        if name == "target_modules" and len(value) == 0:
            return ["target_modules must not be empty; name at least one module, e.g. ['q_proj', 'v_proj']"]
        return []
    return [f"{name} must be a list of module names or a regex string, got {value!r}"]


def _check_regex(name: str, value: str) -> list[str]:
    if value == ALL_LINEAR:
        return []
    try:
        re.compile(value)
    except re.error as err:
        return [f"{name} {value!r} is not a valid regular expression ({err})"]
    return []


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
