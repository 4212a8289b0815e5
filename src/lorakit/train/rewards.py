"""Reward functions for RL from verifiable rewards (GRPO): built-ins, the user's own, and their weighted sum.

Every reward is a callable `(prompt, completion, record) -> float`: `prompt` and `completion` are text, `record`
the prompt's row of the data file (so a column such as `answer` is the reference). Built-ins:

    exact_match(column)          1 if the completion, stripped, equals record[column] (stripped), else 0
    regex_match(pattern)         1 if the pattern is found in the completion (re.search), else 0
    json_valid()                 1 if the completion, stripped, parses as JSON, else 0
    json_schema(schema)          1 if it parses and validates against the JSON schema (jsonschema), else 0
    numeric_equal(column)        1 if the last number in the completion equals record[column] (within `tolerance`)
    length_penalty(max_chars)    0 up to max_chars characters, then -1 per max_chars beyond (a soft cap)

A user's function is named by import path, "module:function" (the module importable from the working directory or
the PYTHONPATH), and is called with the same three arguments, by keyword.

`RewardSet.score` calls each function on each completion. One that raises, or returns something that is not a
finite number, does not stop the run: its reward for that completion is NaN (left out of the group's mean, as TRL
leaves out a None) and a RewardError names the function, the record's file:line and the error.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import ConfigError

RewardFn = Callable[..., float]
NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def _column(record: Mapping[str, Any], column: str, reward: str) -> Any:
    if column not in record:
        raise KeyError(f"{reward} needs column {column!r}, which this record lacks (it has: {', '.join(map(str, record))})")
    return record[column]


def exact_match(column: str = "answer") -> RewardFn:
    def reward(prompt: str, completion: str, record: Mapping[str, Any]) -> float:
        return float(completion.strip() == str(_column(record, column, "exact_match")).strip())
    return reward


def regex_match(pattern: str) -> RewardFn:
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"regex_match pattern {pattern!r} is not a regular expression: {err}", where="rewards") from None

    def reward(prompt: str, completion: str, record: Mapping[str, Any]) -> float:
        return float(compiled.search(completion) is not None)
    return reward


def _parse(completion: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(completion.strip())
    except json.JSONDecodeError:
        return False, None


def json_valid() -> RewardFn:
    def reward(prompt: str, completion: str, record: Mapping[str, Any]) -> float:
        return float(_parse(completion)[0])
    return reward


def json_schema(schema: Mapping[str, Any] | str | Path) -> RewardFn:
    """`schema` a JSON schema, or the path of a file holding one."""
    try:
        import jsonschema
    except ImportError:
        raise ConfigError("json_schema needs the jsonschema package: pip install 'lorakit[rl]'", where="rewards") from None
    if isinstance(schema, (str, Path)):
        try:
            schema = json.loads(Path(schema).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"json_schema: cannot read a JSON schema from {schema}: {err}", where="rewards") from None
    try:
        validator = jsonschema.validators.validator_for(schema)(schema)
        validator.check_schema(schema)
    except jsonschema.SchemaError as err:
        raise ConfigError(f"json_schema: not a valid JSON schema: {err.message}", where="rewards") from None

    def reward(prompt: str, completion: str, record: Mapping[str, Any]) -> float:
        ok, value = _parse(completion)
        return float(ok and validator.is_valid(value))
    return reward


def numeric_equal(column: str = "answer", tolerance: float = 1e-6) -> RewardFn:
    def reward(prompt: str, completion: str, record: Mapping[str, Any]) -> float:
        expected = float(str(_column(record, column, "numeric_equal")).replace(",", ""))
        found = NUMBER.findall(completion.replace(",", ""))
        return float(bool(found) and abs(float(found[-1]) - expected) <= tolerance)
    return reward


def length_penalty(max_chars: int) -> RewardFn:
    if max_chars < 1:
        raise ConfigError(f"length_penalty max_chars must be at least 1, got {max_chars}", where="rewards")

    def reward(prompt: str, completion: str, record: Mapping[str, Any]) -> float:
        return -max(len(completion) - max_chars, 0) / max_chars
    return reward


BUILTINS: dict[str, Callable[..., RewardFn]] = {
    "exact_match": exact_match, "regex_match": regex_match, "json_valid": json_valid, "json_schema": json_schema,
    "numeric_equal": numeric_equal, "length_penalty": length_penalty}


def load_function(path: str) -> RewardFn:
    """The callable `module:function` names; a ConfigError saying which part is wrong otherwise."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"reward function {path!r}: name it as module:function, e.g. my_rewards:correct_answer",
                          where="rewards")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # a my_rewards.py beside the run config, as users expect
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"reward function {path!r}: no module {err.name!r} (looked in the working directory "
                          "and PYTHONPATH)", where="rewards") from None
    except Exception as err:  # the user's module failed while importing
        raise ConfigError(f"reward function {path!r}: importing {module_name} raised {type(err).__name__}: {err}",
                          where="rewards") from None
    try:
        function = getattr(module, attr)
    except AttributeError:
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ConfigError(f"reward function {path!r}: {module_name} has no {attr!r} (its functions: "
                          f"{', '.join(public) or 'none'})", where="rewards") from None
    if not callable(function):
        raise ConfigError(f"reward function {path!r}: {attr} is a {type(function).__name__}, not a function",
                          where="rewards")
    return function


@dataclass
class RewardError:
    function: str
    location: str  # the record's file:line
    message: str

    def line(self) -> str:
        return f"reward {self.function} failed on {self.location}: {self.message}"


@dataclass
class Scores:
    per_function: dict[str, list[float]]  # name -> one reward per completion (NaN where it failed)
    total: list[float]  # the weighted sum per completion; NaN only where every function failed
    errors: list[RewardError] = field(default_factory=list)


@dataclass
class RewardSet:
    functions: list[tuple[str, RewardFn, float]]  # (name, function, weight)

    def score(self, prompts: Sequence[str], completions: Sequence[str], records: Sequence[Mapping[str, Any]],
              locations: Sequence[str]) -> Scores:
        per_function: dict[str, list[float]] = {name: [] for name, _, _ in self.functions}
        errors: list[RewardError] = []
        for prompt, completion, record, location in zip(prompts, completions, records, locations, strict=True):
            for name, function, _ in self.functions:
                try:
                    value = function(prompt=prompt, completion=completion, record=record)
                    value = float(value)
                    if not math.isfinite(value):
                        raise ValueError(f"returned {value}; a reward must be a finite number")
                except Exception as err:  # a user's function may raise anything: report it, do not stop the run
                    errors.append(RewardError(name, location, f"{type(err).__name__}: {err}"))
                    value = math.nan
                per_function[name].append(value)
        total = []
        for i in range(len(completions)):
            terms = [(weight, per_function[name][i]) for name, _, weight in self.functions]
            scored = [w * v for w, v in terms if not math.isnan(v)]
            total.append(sum(scored) if scored else math.nan)
        return Scores(per_function, total, errors)


def reward_set(configs: Sequence[Any]) -> RewardSet:
    """The RewardSet of the run config's rl.rewards (RewardConfig entries, checked by the config loader): each
    built-in made with its options, each module:function imported (a ConfigError names what is wrong)."""
    functions = []
    for config in configs:
        if config.function in BUILTINS:
            options = {k: getattr(config, k) for k in ("column", "pattern", "schema", "max_chars", "tolerance")
                       if getattr(config, k) is not None}
            function = BUILTINS[config.function](**options)
        else:
            function = load_function(config.function)
        functions.append((config.name or config.function, function, config.weight))
    return RewardSet(functions)
