"""The run config's reference text (`lorakit train --help`), read from the sections' source."""

from __future__ import annotations

import ast
import dataclasses
import inspect

from ..lora.config import LoraConfig
from .sections import DataConfig, DistributedConfig, EvalConfig, ForgettingLimits, ModelConfig, PreferenceConfig, \
    QuantizationConfig, ReferenceConfig, RunConfig, SpeedConfig, SweepConfig, TaskConfig, TrainConfig


SECTIONS = [("model", ModelConfig), ("model.quantization", QuantizationConfig), ("lora", LoraConfig),
            ("data", DataConfig), ("train", TrainConfig), ("speed", SpeedConfig), ("distributed", DistributedConfig),
            ("preference", PreferenceConfig), ("preference.reference", ReferenceConfig), ("eval", EvalConfig),
            ("eval.max_forgetting", ForgettingLimits), ("tasks[i]", TaskConfig), ("sweep", SweepConfig),
            ("", RunConfig)]


def field_docs(cls: type) -> dict[str, str]:
    """{field: its docstring} of a config dataclass, its bases' fields included (data: DataOptions')."""
    docs: dict[str, str] = {}
    for owner in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        body = ast.parse(inspect.getsource(owner)).body[0].body
        for node, after in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(getattr(after, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def field_reference() -> str:
    """Every run-config field with its type, default and docstring, read from the dataclasses' source."""
    listed = {name.split(".")[0] for name, _ in SECTIONS}  # "tasks[i]" (its entries) keeps "tasks" listed
    lines = []
    for section, cls in SECTIONS:
        docs = field_docs(cls)
        lines.append(f"{section}:" if section else "top level:")
        own = set(cls.__dict__.get("__annotations__", {}))  # a section's own fields (data: where the data is) first
        for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
            if section == "" and f.name in listed:  # sections are listed above with their fields
                continue
            if f.default is not dataclasses.MISSING:
                default = f" = {f.default!r}"
            elif f.default_factory is not dataclasses.MISSING:
                default = f" = {f.default_factory()!r}"
            else:
                default = " (required)"
            kind = str(f.type).replace("typing.", "")
            lines.append(f"  {f.name}: {kind}{default}")
            if f.name in docs:
                lines.append(f"      {docs[f.name]}")
    return "\n".join(lines)
