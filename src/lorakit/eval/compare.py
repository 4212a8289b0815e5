"""Scored answers of several models side by side: the metrics table, the examples where they differ, and JSON."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .answers import Answer, EvalExample
from .metrics import Scorer, reference_text


@dataclass
class ModelResult:
    name: str
    """How the table names it: base, or the adapter's (or merged model's) directory name."""
    path: str | None
    """The adapter or model directory (None: the base)."""
    answers: list[Answer]
    scores: dict[str, list[float]] = field(default_factory=dict)
    """Metric -> one score per example (NaN where the scorer could not score it)."""
    fields: dict[str, float] = field(default_factory=dict)
    """json_fields: each reference field's accuracy."""
    loss: float | None = None
    perplexity: float | None = None
    tokens: int | None = None

    def mean(self, metric: str) -> float:
        values = [v for v in self.scores[metric] if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan


@dataclass
class Comparison:
    examples: list[EvalExample]
    models: list[ModelResult]
    metrics: list[str]
    errors: list[str] = field(default_factory=list)
    """Examples a scorer could not score (file:line: metric: why); left out of that metric's mean."""
    loss_note: str | None = None
    """Why there is no loss column, where there is none."""

    def differing(self) -> list[int]:
        """Indices of the examples whose answers are not all the same text."""
        return [i for i in range(len(self.examples)) if len({m.answers[i].text.strip() for m in self.models}) > 1]


def score(comparison: Comparison, scorers: dict[str, Scorer]) -> None:
    """Fill every model's scores (and json_fields' per-field accuracies) from its answers."""
    for model in comparison.models:
        per_field: dict[str, list[float]] = {}
        for metric, scorer in scorers.items():
            values = []
            for example, answer in zip(comparison.examples, model.answers, strict=True):
                try:
                    result = scorer(answer.text, example.reference)
                except ValueError as err:
                    comparison.errors.append(f"{example.location}: {metric}: {err}")
                    values.append(math.nan)
                    continue
                values.append(result.value)
                for key, value in (result.fields or {}).items():
                    per_field.setdefault(key, []).append(value)
            model.scores[metric] = values
        model.fields = {key: sum(v) / len(v) for key, v in per_field.items()}


def table(comparison: Comparison) -> str:
    """One row per model: each metric's mean, then the loss where it was computed."""
    has_loss = any(m.loss is not None for m in comparison.models)
    head = ["model", *comparison.metrics] + (["loss", "ppl"] if has_loss else [])
    rows = [head]
    for model in comparison.models:
        row = [model.name, *(_num(model.mean(metric)) for metric in comparison.metrics)]
        if has_loss:
            row += [_num(model.loss, 4), _num(model.perplexity, 3)]
        rows.append(row)
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def field_table(comparison: Comparison) -> str:
    """json_fields: each field's accuracy per model (empty when the metric was not chosen)."""
    keys = sorted({key for m in comparison.models for key in m.fields})
    if not keys:
        return ""
    width = max(len(k) for k in [*keys, "field"])
    widths = [max(len(m.name), 5) for m in comparison.models]
    lines = ["json_fields per field:", f"  {'field'.ljust(width)}  " + "  ".join(
        m.name.rjust(w) for m, w in zip(comparison.models, widths))]
    for key in keys:
        lines.append(f"  {key.ljust(width)}  " + "  ".join(_num(m.fields.get(key)).rjust(w)
                                                           for m, w in zip(comparison.models, widths)))
    return "\n".join(lines)


def differences(comparison: Comparison, count: int, width: int = 160) -> str:
    """Up to `count` examples where the models answered differently, each answer on one shortened line."""
    differ = comparison.differing()
    if len(comparison.models) < 2:
        return ""
    if not differ:
        return f"all {len(comparison.examples)} answers are the same across the models"
    out = [f"{len(differ)} of {len(comparison.examples)} prompts answered differently; the first {min(count, len(differ))}:"]
    name_width = max(len(name) for name in ["reference", *(m.name for m in comparison.models)])
    for i in differ[:count]:
        example = comparison.examples[i]
        out.append(f"- {example.location}  prompt: {_short(example.prompt, width)}")
        if example.reference is not None:
            out.append(f"    {'reference'.ljust(name_width)}  {_short(reference_text(example.reference), width)}")
        for model in comparison.models:
            out.append(f"    {model.name.ljust(name_width)}  {_short(model.answers[i].text, width)}")
    return "\n".join(out)


def as_json(comparison: Comparison) -> dict[str, Any]:
    """Everything, for machines: per model the means, json field accuracies and loss; per example every answer
    and its scores. NaN (no score) is null."""
    return {
        "examples": len(comparison.examples),
        "metrics": comparison.metrics,
        "models": [{"name": m.name, "path": m.path, "scores": {k: _finite(m.mean(k)) for k in comparison.metrics},
                    "json_fields": m.fields or None, "loss": _finite(m.loss), "perplexity": _finite(m.perplexity),
                    "tokens": m.tokens} for m in comparison.models],
        "loss_note": comparison.loss_note,
        "errors": comparison.errors,
        "answers": [{"location": ex.location, "prompt": ex.prompt, "reference": ex.reference,
                     "answers": {m.name: m.answers[i].text for m in comparison.models},
                     "finish_reasons": {m.name: m.answers[i].finish_reason for m in comparison.models},
                     "scores": {m.name: {k: _finite(m.scores[k][i]) for k in comparison.metrics}
                                for m in comparison.models}}
                    for i, ex in enumerate(comparison.examples)],
    }


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _short(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= width else flat[:width - 1] + "…")


def unique_names(paths: Sequence[str | None]) -> list[str]:
    """Table names for models: base for None, else the directory's name, with parents added until unique."""
    from pathlib import Path

    parts = [None if p is None else Path(p).resolve().parts for p in paths]
    depth = 1
    while True:
        names = ["base" if p is None else "/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names) or depth > max((len(p) for p in parts if p), default=0):
            return names
        depth += 1
