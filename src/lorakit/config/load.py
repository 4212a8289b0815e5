"""Loading a run config: YAML and `--set` overrides in, a validated RunConfig out, every problem reported at once."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from ..errors import ConfigError
from ..lora.config import LoraConfig
from ..lora.model import ADAPTER_NAME
from ..serving_compat import TARGETS as DEPLOY_TARGETS
from .sections import RunConfig
from .sweep import expand as expand_sweep, sweep_problems


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config, apply `key.path=value` overrides, validate everything at once: the problems of
    every override and of the config they produce are reported together."""
    path = Path(path)
    raw = _read_config_file(path)
    problems: list[str] = []
    for override in overrides:
        try:
            apply_override(raw, override)
        except ConfigError as err:  # keep going: the next overrides and the config may have problems too
            problems += err.problems
    try:
        config = run_config_from_dict(raw, where=str(path))
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(problems, where=str(path))
    return config


def _read_config_file(path: Path) -> dict:
    """The file's top-level mapping; anything else is a one-line ConfigError naming the path."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file", where="run config") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; give the run config's YAML file (e.g. {path / 'run.yaml'})",
                          where="run config") from None
    except OSError as err:  # permission denied, an unreadable device, ...
        reason = err.strerror or type(err).__name__
        raise ConfigError(f"{path}: cannot read it ({reason})", where="run config") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not valid YAML (not UTF-8 text: byte offset {err.start})",
                          where="run config") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{_yaml_place(path, err)}: not valid YAML ({_one_line(err)})", where="run config") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, lora, data, train, speed, distributed, output_dir)", where="run config")
    return raw


def _yaml_place(path: Path, err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)


def _one_line(err: yaml.YAMLError) -> str:
    """PyYAML's message without its multi-line excerpt of the source (the place is given separately)."""
    parts = [getattr(err, "context", None), getattr(err, "problem", None)]
    text = ", ".join(p for p in parts if p) or str(err)
    return " ".join(text.split())


def apply_override(raw: dict, override: str) -> None:
    """Set `a.b.c=value` in a nested mapping; the value is parsed as YAML (2e-4, true, [q_proj, v_proj])."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r}: must look like section.field=value, e.g. train.lr=2e-4", where="--set")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {override!r}: the value is not valid YAML ({_one_line(err)})", where="--set") from None
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {override!r}: {part!r} is not a section", where="--set")
    node[parts[-1]] = value


def run_config_from_dict(raw: dict, *, where: str = "run config") -> RunConfig:
    problems: list[str] = []
    config = _build(RunConfig, raw, "", problems)
    if config is not None:
        problems += (sweep_problems(config) + _task_problems(config) + _preference_problems(config)
                     + _rl_problems(config) + _eval_problems(config))
    if problems:
        raise ConfigError(problems, where=where)
    return expand_sweep(config)  # a sweep's members become its tasks


def _task_problems(config: RunConfig) -> list[str]:
    """What the fields allow one by one but not together: data.train or tasks, unique valid task names."""
    if not config.tasks:
        return [] if config.data.train is not None else [f"data.train: required ({FIELD_HINTS[('DataConfig', 'train')]})"]
    problems = []
    if config.data.train is not None or config.data.validation is not None or config.data.validation_fraction:
        problems.append("data.train / data.validation / data.validation_fraction: remove them; with tasks, each task "
                        "names its own train (and validation) file")
    seen = set()
    for i, task in enumerate(config.tasks):
        if not ADAPTER_NAME.match(task.name):
            problems.append(f"tasks[{i}].name: {task.name!r} is not a valid adapter name; use 1-64 letters, digits, "
                            "'_' or '-', starting with a letter or digit")
        elif task.name in seen:
            problems.append(f"tasks[{i}].name: {task.name!r} is used twice; each task needs its own adapter name")
        seen.add(task.name)
    return problems


PREFERENCE_OBJECTIVES = ("dpo", "orpo", "kto")
REFERENCE_FREE = "simpo and orpo use no reference model"


def as_trained(config: RunConfig) -> RunConfig:
    """`config` with the lora section the run really trains: with preference.reference.adapter the policy starts
    from that adapter, so its adapter_config.json replaces the lora section (for the memory plan and the deploy
    check, which run before any model loads). A bad adapter folder raises AdapterError saying what is wrong."""
    start = config.preference.reference.adapter if config.objective in PREFERENCE_OBJECTIVES else None
    if start is None:
        return config
    from ..lora.io import read_adapter_config  # reads a file; the config itself never needs it

    return dataclasses.replace(config, lora=read_adapter_config(start).replace(inference_mode=False))  # it trains


def _preference_problems(config: RunConfig) -> list[str]:
    """What the preference fields allow one by one but not with the objective or each other."""
    if config.objective not in PREFERENCE_OBJECTIVES:
        return []
    pref, problems = config.preference, []
    if config.tasks:
        problems.append(f"tasks: objective {config.objective} trains one adapter; remove tasks and set data.train")
    if config.data.packing:
        problems.append(f"data.packing: objective {config.objective} scores each completion on its own row; set "
                        "packing: false (or leave it unset)")
    if config.objective != "dpo" and pref.loss_type != "sigmoid":
        problems.append(f"preference.loss_type: {pref.loss_type} is a dpo loss; objective {config.objective} has its "
                        "own (remove loss_type, or set objective: dpo)")
    if pref.reference.precompute and (config.objective == "orpo" or pref.loss_type == "simpo"):
        problems.append(f"preference.reference.precompute: {REFERENCE_FREE}; remove it")
    if pref.label_smoothing and pref.loss_type not in ("sigmoid", "robust", "simpo"):
        problems.append(f"preference.label_smoothing: loss_type {pref.loss_type} has no label smoothing; set it to 0")
    if pref.label_smoothing and config.objective != "dpo":
        problems.append(f"preference.label_smoothing: objective {config.objective} has no label smoothing; set it to 0")
    return problems


# Built-in rewards (train/rewards.py) and the options each takes; "required" ones must be set.
REWARD_OPTIONS = {"exact_match": ((), ("column",)), "regex_match": (("pattern",), ()), "json_valid": ((), ()),
                  "json_schema": (("schema",), ()), "numeric_equal": ((), ("column", "tolerance")),
                  "length_penalty": (("max_chars",), ())}
REWARD_OPTION_NAMES = ("column", "pattern", "schema", "max_chars", "tolerance")


def _rl_problems(config: RunConfig) -> list[str]:
    """What the rl fields allow one by one but not with the objective or each other."""
    if config.objective != "grpo":
        return []
    rl, problems = config.rl, []
    if config.tasks:
        problems.append("tasks: objective grpo trains one adapter; remove tasks and set data.train (the prompts)")
    if config.data.packing:
        problems.append("data.packing: objective grpo samples completions per prompt; set packing: false")
    if rl.epsilon_high is not None and rl.epsilon_high < rl.epsilon:
        problems.append(f"rl.epsilon_high: {rl.epsilon_high} is below rl.epsilon {rl.epsilon}; the upper clip must be "
                        "at least the lower one (or null: the same)")
    if rl.max_prompt_len is None and rl.max_completion_len >= config.data.max_seq_len:
        problems.append(f"rl.max_completion_len: {rl.max_completion_len} leaves no room for the prompt in "
                        f"data.max_seq_len {config.data.max_seq_len}; raise max_seq_len or lower max_completion_len")
    if not rl.rewards:
        problems.append("rl.rewards: objective grpo needs at least one reward function, e.g. [{function: json_valid}] "
                        "or [{function: my_rewards:correct, weight: 1}]")
    names = set()
    for i, reward in enumerate(rl.rewards):
        where, function = f"rl.rewards[{i}]", reward.function
        if function in REWARD_OPTIONS:
            required, optional = REWARD_OPTIONS[function]
            for option in required:
                if getattr(reward, option) is None:
                    problems.append(f"{where}.{option}: {function} needs it")
            for option in REWARD_OPTION_NAMES:
                if getattr(reward, option) is not None and option not in required + optional:
                    takes = ", ".join(required + optional) or "no options"
                    problems.append(f"{where}.{option}: {function} does not take it (it takes {takes}); remove it")
        elif ":" not in function:
            close = difflib.get_close_matches(function, list(REWARD_OPTIONS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{where}.function: {function!r} is not a built-in reward{hint}; built-ins: "
                            f"{', '.join(REWARD_OPTIONS)}; or name your own as module:function")
        else:
            for option in REWARD_OPTION_NAMES:
                if getattr(reward, option) is not None:
                    problems.append(f"{where}.{option}: options are for built-in rewards; your function "
                                    f"{function} reads what it needs from the record")
        name = reward.name or function
        if name in names:
            problems.append(f"{where}: two rewards are named {name!r}; give one a name: (its metrics column)")
        names.add(name)
    return problems


def _eval_problems(config: RunConfig) -> list[str]:
    """What the eval fields allow one by one but not together or with tasks."""
    ev, problems = config.eval, []
    limits = ev.max_forgetting
    if limits is not None and limits.loss_increase is None and limits.kl is None:
        problems.append("eval.max_forgetting: names no limit; give loss_increase, kl or both, e.g. "
                        "{loss_increase: 0.1, kl: 0.05} (or remove it to report the numbers only)")
    if limits is not None and ev.general_text is None:
        problems.append("eval.max_forgetting: forgetting is measured on eval.general_text; set general_text: "
                        "path/to/general.jsonl (or remove max_forgetting)")
    if ev.general_text is not None and config.tasks:
        problems.append("eval.general_text: measures one adapter against its base; with tasks (one adapter per "
                        "task) remove general_text or train the tasks in separate runs")
    return problems


def _build(cls: type, values: Any, path: str, problems: list[str]) -> Any:
    """Instantiate dataclass `cls` from `values`, appending a message per problem; None if any."""
    if cls is LoraConfig:
        try:
            return LoraConfig.from_dict(values if values is not None else {}, where="lora")
        except ConfigError as err:
            problems.extend(f"{path}.{p}" for p in err.problems)  # each LoraConfig problem starts with its field
            return None
    if not isinstance(values, dict):
        problems.append(f"{path or 'the config'}: expected a mapping, got {_describe(values)}")
        return None
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{_join(path, key)}: unknown key{hint}; known keys: {', '.join(fields)}")
    kwargs = {}
    before = len(problems)
    for name, f in fields.items():
        where = _join(path, name)
        if name not in values:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required:
                problems.append(f"{where}: required{_field_doc(cls, name)}")
            continue
        known = len(problems)
        kwargs[name] = _coerce(hints[name], values[name], where, problems)
        if len(problems) == known:  # range-check every well-typed field, not only those before the first problem
            _check_range(cls, name, kwargs[name], path, problems)
    return cls(**kwargs) if len(problems) == before else None


# Ranges beyond the type: (section class, field) -> (test, what is allowed). None passes (optional fields).
RANGES = {
    ("TrainConfig", "max_steps"): (lambda v: v > 0, "a positive integer"),
    ("TrainConfig", "epochs"): (lambda v: v > 0, "a positive number"),
    ("TrainConfig", "batch_size"): (lambda v: v > 0, "a positive integer"),
    ("TrainConfig", "grad_accum"): (lambda v: v > 0, "a positive integer"),
    ("TrainConfig", "lr"): (lambda v: v > 0, "a positive number"),
    ("TaskConfig", "lr"): (lambda v: v > 0, "a positive number (or null: train.lr)"),
    ("TrainConfig", "warmup_steps"): (lambda v: v >= 0, "0 or more"),
    ("TrainConfig", "weight_decay"): (lambda v: v >= 0, "0 or more"),
    ("TrainConfig", "max_grad_norm"): (lambda v: v > 0, "a positive number, or null for no clipping"),
    ("TrainConfig", "loraplus_lr_ratio"): (lambda v: v > 0, "a positive number"),
    ("TrainConfig", "checkpoint_every"): (lambda v: v >= 1, "a positive integer (1: every layer)"),
    ("TrainConfig", "loss_chunk_tokens"): (lambda v: v >= 1, "a positive integer, or null for the full logits"),
    ("TrainConfig", "eval_every"): (lambda v: v > 0, "a positive integer"),
    ("TrainConfig", "save_every"): (lambda v: v > 0, "a positive integer"),
    ("TrainConfig", "keep_checkpoints"): (lambda v: v > 0, "a positive integer"),
    ("TrainConfig", "log_every"): (lambda v: v > 0, "a positive integer"),
    ("DistributedConfig", "timeout_s"): (lambda v: v > 0, "a positive number of seconds"),
    ("PreferenceConfig", "beta"): (lambda v: v > 0, "a positive number"),
    ("PreferenceConfig", "label_smoothing"): (lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"),
    ("PreferenceConfig", "simpo_gamma"): (lambda v: v >= 0, "0 or more"),
    ("PreferenceConfig", "orpo_lambda"): (lambda v: v >= 0, "0 or more"),
    ("PreferenceConfig", "desirable_weight"): (lambda v: v > 0, "a positive number"),
    ("PreferenceConfig", "undesirable_weight"): (lambda v: v > 0, "a positive number"),
    ("PreferenceConfig", "max_prompt_len"): (lambda v: v >= 1, "a positive integer, or null"),
    ("PreferenceConfig", "max_completion_len"): (lambda v: v >= 1, "a positive integer, or null"),
    ("DataConfig", "validation_fraction"): (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("RLConfig", "num_generations"): (lambda v: v >= 2, "at least 2 (advantages compare completions of a prompt)"),
    ("RLConfig", "temperature"): (lambda v: v > 0, "a positive number (at 0 every completion of a group is the same)"),
    ("RLConfig", "top_p"): (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    ("RLConfig", "max_completion_len"): (lambda v: v >= 1, "a positive integer"),
    ("RLConfig", "epsilon"): (lambda v: 0 < v < 1, "a number in (0, 1)"),
    ("RLConfig", "epsilon_high"): (lambda v: v > 0, "a positive number, or null (the same as epsilon)"),
    ("RLConfig", "beta"): (lambda v: v >= 0, "0 or more"),
    ("RLConfig", "num_iterations"): (lambda v: v >= 1, "a positive integer (optimizer steps per rollout)"),
    ("RLConfig", "sample_every"): (lambda v: v > 0, "a positive integer, or null for no samples"),
    ("RLConfig", "max_prompt_len"): (lambda v: v >= 1, "a positive integer"),
    ("ForgettingLimits", "loss_increase"): (lambda v: v > 0, "a positive number (nats per token), or null for no limit"),
    ("ForgettingLimits", "kl"): (lambda v: v > 0, "a positive number (nats per token), or null for no limit"),
    ("RewardConfig", "max_chars"): (lambda v: v >= 1, "a positive integer"),
    ("RewardConfig", "tolerance"): (lambda v: v >= 0, "0 or more"),
    ("RunConfig", "deploy_targets"): (lambda v: isinstance(v, list) and all(t in DEPLOY_TARGETS for t in v),
                                      f"a list of deployment targets from: {', '.join(DEPLOY_TARGETS)}"),
}


def _check_range(cls: type, name: str, value: Any, path: str, problems: list[str]) -> None:
    rule = RANGES.get((cls.__name__, name))
    if rule is not None and value is not None and not rule[0](value):
        problems.append(f"{_join(path, name)}: must be {rule[1]}, got {value!r}")
    # A section whose fields are defined in another package checks them there (data: DataOptions), so the YAML
    # file and that package's Python API refuse the same values with the same messages.
    own_checks = getattr(cls, "field_problems", None)
    if own_checks is not None:
        problems.extend(_join(path, problem) for problem in own_checks(name, value))


def _coerce(kind: Any, value: Any, where: str, problems: list[str]) -> Any:
    origin, args = get_origin(kind), get_args(kind)
    if dataclasses.is_dataclass(kind) or kind is LoraConfig:
        return _build(kind, value, where, problems)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        sections = [a for a in options if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(sections) == 1:  # an optional section: report its own problems
            return _coerce(sections[0], value, where, problems)
        for option in options:
            trial: list[str] = []
            result = _coerce(option, value, where, trial)
            if not trial:
                return result
        # A section is named by what it holds, not by its class name.
        names = [f"a mapping (keys: {', '.join(f.name for f in dataclasses.fields(a))})" if a in sections else _name(a)
                 for a in args]
        problems.append(f"{where}: expected {' or '.join(names)}, got {_describe(value)}")
        return value
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):
            return "on" if value else "off"  # YAML 1.1 reads a bare on/off as true/false
        if value not in args:
            problems.append(f"{where}: must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list of {args[0].__name__.removesuffix('Config').lower()} entries, "
                            f"got {_describe(value)}")
            return value
        return [_build(args[0], item, f"{where}[{i}]", problems) for i, item in enumerate(value)]
    if origin in (dict, Mapping):
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            problems.append(f"{where}: expected a mapping of names to names, got {_describe(value)}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            problems.append(f"{where}: expected true or false, got {_describe(value)}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: expected an integer, got {_describe(value)}")
        return value
    if kind is float:
        number = value
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 2e-4 as a string (it wants 2.0e-4); accept what users write.
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            problems.append(f"{where}: expected a number, got {_describe(value)}")
            return value
        try:
            number = float(number)
        except OverflowError:  # an integer beyond float range
            number = math.inf
        if not math.isfinite(number):  # YAML's .nan and .inf, "nan", 1e999
            problems.append(f"{where}: expected a finite number, got {value!r}")
            return value
        return number
    if kind is str:
        if not isinstance(value, str):
            problems.append(f"{where}: expected a string, got {_describe(value)}")
        return value
    return value


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _name(kind: Any) -> str:
    if kind is type(None):
        return "null"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(kind, getattr(kind, "__name__", str(kind)))


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing (null)"


def _field_doc(cls: type, name: str) -> str:
    return f" ({FIELD_HINTS[(cls.__name__, name)]})" if (cls.__name__, name) in FIELD_HINTS else ""


FIELD_HINTS = {
    ("RunConfig", "model"): "a section with at least name_or_path",
    ("RunConfig", "data"): "a section with at least train: path/to/train.jsonl",
    ("ModelConfig", "name_or_path"): "a local model directory or a hub id",
    ("DataConfig", "train"): "a JSON, JSONL, CSV or Parquet file",
}
