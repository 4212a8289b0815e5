"""The new-run form, generated from the run config's dataclasses (fields, defaults, docstrings, Literal choices),
and the check of what a person filled in: the same validation as `lorakit train`, its messages placed beside the
field they name."""

from __future__ import annotations

import dataclasses
import functools
import json
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from ..config import run_config_from_dict
from ..config.reference import SECTIONS, field_docs
from ..config.sections import RunConfig
from ..errors import ConfigError
from .paths import Roots

FORM_SECTIONS = ("model", "lora", "data", "train", "speed")  # the rest (preference, rl, eval, tasks, ...): as YAML
LOCAL_PATHS = ("model.name_or_path", "data.train", "data.validation")  # read from disk: only inside allowed roots
SCALARS = {bool: "bool", int: "int", float: "float", str: "str"}


def form_schema() -> list[dict]:
    """The form's fields (copies: the cached schema is built once, reading the sections' source)."""
    return [dict(f) for f in _schema()]


@functools.cache
def _schema() -> tuple[dict, ...]:
    """The form's fields in order: {name, section, kind (bool|int|float|str|choice|yaml), choices, nullable,
    default, required, help}. `yaml` fields (lists, mappings, unions) are typed as YAML text."""
    classes = dict(SECTIONS)
    fields = [_field("", f, RunConfig) for f in dataclasses.fields(RunConfig)
              if f.name in ("objective",)]
    for section in FORM_SECTIONS:
        cls = classes[section]
        fields += [_field(section, f, cls) for f in dataclasses.fields(cls)
                   if not dataclasses.is_dataclass(_strip_none(get_type_hints(cls)[f.name])[0])]
    return tuple(fields)


def _strip_none(kind: Any) -> tuple[Any, bool]:
    if get_origin(kind) in (Union, types.UnionType):
        args = [a for a in get_args(kind) if a is not type(None)]
        if len(args) < len(get_args(kind)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True
    return kind, False


def _field(section: str, f: dataclasses.Field, cls: type) -> dict:
    kind, nullable = _strip_none(get_type_hints(cls)[f.name])
    choices = list(get_args(kind)) if get_origin(kind) is Literal else None
    if f.default is not dataclasses.MISSING:
        default, required = f.default, False
    elif f.default_factory is not dataclasses.MISSING:
        default, required = f.default_factory(), False
    else:
        default, required = None, True
    return {"name": f"{section}.{f.name}" if section else f.name, "section": section or "run",
            "kind": "choice" if choices else SCALARS.get(kind, "yaml"), "choices": choices, "nullable": nullable,
            "default": json.loads(json.dumps(default, default=str)), "required": required,
            "help": field_docs(cls).get(f.name, "")}


def raw_config(roots: Roots, name: str, values: dict, extra_yaml: str) -> dict:
    """The run config mapping a form describes: `values` ({dotted field: value}, typed by the page; yaml fields
    as text), `extra_yaml` (any other sections), output_dir the run's directory under the runs root. ConfigError
    (every problem, field-named) on anything the page could not have sent or the paths rules refuse."""
    problems: list[str] = []
    try:
        raw = yaml.safe_load(extra_yaml or "") or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"more settings (YAML): {' '.join(str(err).split())}", where="run config") from None
    if not isinstance(raw, dict):
        raise ConfigError("more settings (YAML): expected a mapping such as `eval: {every: 50}`", where="run config")
    kinds = {f["name"]: f["kind"] for f in form_schema()}
    for key, value in (values or {}).items():
        if key not in kinds:
            problems.append(f"{key}: not a field of the form")
            continue
        if kinds[key] == "yaml" and isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as err:
                problems.append(f"{key}: not YAML: {' '.join(str(err).split())}")
                continue
        section, _, field = key.rpartition(".")
        (raw.setdefault(section, {}) if section else raw)[field] = value
    for key in LOCAL_PATHS:
        section, _, field = key.partition(".")
        value = (raw.get(section) or {}).get(field)
        if value is not None:
            try:
                raw[section][field] = roots.readable(value, key)
            except ConfigError as err:
                problems += err.problems
    gguf = (raw.get("model") or {}).get("gguf_file")
    if isinstance(gguf, str) and (Path(gguf).name != gguf or gguf in ("..", ".")):
        problems.append(f"model.gguf_file: {gguf} must be a file name inside model.name_or_path, not a path")
    try:
        raw["output_dir"] = str(roots.new_run_dir(name))
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(problems, where="run config")
    return raw


def check(roots: Roots, name: str, values: dict, extra_yaml: str) -> tuple[RunConfig | None, dict, dict[str, list[str]]]:
    """(config or None, raw mapping, {field: [problems]}): "" holds problems naming no field of the form."""
    try:
        raw = raw_config(roots, name, values, extra_yaml)
        config = run_config_from_dict(raw)
        problems = []
        for field, value in other_paths(config):  # what the YAML box may name: the same rule as the form's paths
            try:
                roots.readable(value, field)
            except ConfigError as err:
                problems += err.problems
        if problems:
            raise ConfigError(problems, where="run config")
        return config, raw, {}
    except ConfigError as err:
        return None, {}, by_field(err.problems)


def other_paths(config: RunConfig) -> list[tuple[str, str]]:
    """The files a run reads besides LOCAL_PATHS (relative ones from the runs root, the run's working directory)."""
    reference = config.preference.reference
    paths = [("eval.general_text", config.eval.general_text),
             ("preference.reference.adapter", getattr(reference, "adapter", None)),
             *((f"rl.rewards[{i}].schema", r.schema) for i, r in enumerate(config.rl.rewards)),
             *((f"tasks[{t.name}].{part}", getattr(t, part)) for t in config.tasks for part in ("train", "validation"))]
    return [(field, value) for field, value in paths if isinstance(value, str)]


def by_field(problems: list[str]) -> dict[str, list[str]]:
    """Problems ("train.lr: must be ...") keyed by the form field they name ("run name" for the name, "" for the
    rest); a problem in a nested section (model.quantization.bits) goes to that section's extra YAML ("")."""
    names = sorted([f["name"] for f in form_schema()] + ["run name"], key=len, reverse=True)  # longest first
    placed: dict[str, list[str]] = {}
    for problem in problems:  # "train.lr: must be ..." or LoraConfig's "lora.r must be ..."
        key = next((n for n in names if problem.startswith(n) and problem[len(n):len(n) + 1] in (":", " ", "")), "")
        placed.setdefault(key, []).append(problem)
    return placed
