"""Scores of one generated answer against its reference, each in [0, 1] (the mean over examples is the metric).

    exact        1 if the answer equals the reference, both stripped of surrounding whitespace
    contains     1 if the reference (stripped) occurs in the answer
    regex        with a capturing group: 1 if the pattern's first group, searched in the answer, equals the
                 reference (stripped); without one: 1 if the pattern is found in the answer (no reference needed)
    json_valid   1 if the answer, stripped (and without a ```json fence), parses as JSON (no reference needed)
    json_fields  the share of the reference object's fields whose values the answer's JSON object has, equal as JSON
                 (true is not 1);
                 0 for an answer that is not a JSON object. Each field's own accuracy is reported as well.
    rouge_l      ROUGE-L F1 of the answer against the reference (Google's rouge-score package, with stemming)

Conventions follow the GRPO rewards (train/rewards.py): text compared stripped, JSON parsed after stripping.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

METRICS = ("exact", "contains", "regex", "json_valid", "json_fields", "rouge_l")
NEEDS_REFERENCE = {"exact", "contains", "json_fields", "rouge_l"}  # regex: only with a capturing group
FENCE = re.compile(r"^```(?:json)?\s*\n(.*?)\n?```$", re.DOTALL)


@dataclass(frozen=True)
class Score:
    value: float
    fields: Mapping[str, float] | None = None  # json_fields: 1/0 per reference field


Scorer = Callable[[str, Any], Score]


def parse_metrics(names: Sequence[str], regex: str | None = None) -> list[str]:
    """The metric names asked for (comma-separated or repeated; `--regex` adds regex), checked, in order."""
    chosen: list[str] = []
    for name in (part.strip() for item in names for part in item.split(",")):
        if not name:
            continue
        if name not in METRICS:
            raise ConfigError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}", where="--metrics")
        if name not in chosen:
            chosen.append(name)
    if regex is not None and "regex" not in chosen:
        chosen.append("regex")
    if "regex" in chosen and regex is None:
        raise ConfigError("the regex metric needs a pattern: --regex PATTERN (e.g. --regex '#### (\\d+)')",
                          where="--metrics")
    return chosen


def needs_reference(metrics: Sequence[str], regex: str | None) -> list[str]:
    """The chosen metrics that compare with a reference answer."""
    pattern = _compile(regex) if regex is not None else None
    return [m for m in metrics if m in NEEDS_REFERENCE or (m == "regex" and pattern is not None and pattern.groups)]


def scorers(metrics: Sequence[str], regex: str | None = None) -> dict[str, Scorer]:
    """One scorer per metric name (rouge_l imports rouge-score here, so a missing package fails before generation)."""
    table: dict[str, Scorer] = {}
    for name in metrics:
        if name == "rouge_l":
            table[name] = _rouge_l()
        elif name == "regex":
            table[name] = _regex(_compile(regex or ""))
        else:
            table[name] = SIMPLE[name]
    return table


def reference_text(reference: Any) -> str:
    """A reference as text: strings as they are, anything else (numbers, objects) as compact JSON."""
    return reference if isinstance(reference, str) else json.dumps(reference, ensure_ascii=False)


def parse_json(text: str) -> tuple[bool, Any]:
    text = text.strip()
    fenced = FENCE.match(text)
    try:
        return True, json.loads(fenced.group(1) if fenced else text)
    except json.JSONDecodeError:
        return False, None


def _exact(answer: str, reference: Any) -> Score:
    return Score(float(answer.strip() == reference_text(reference).strip()))


def _contains(answer: str, reference: Any) -> Score:
    return Score(float(reference_text(reference).strip() in answer))


def _json_valid(answer: str, reference: Any) -> Score:
    return Score(float(parse_json(answer)[0]))


def _json_fields(answer: str, reference: Any) -> Score:
    expected = parse_json(reference)[1] if isinstance(reference, str) else reference
    if not isinstance(expected, dict) or not expected:
        raise ValueError("json_fields needs a reference that is a non-empty JSON object, got "
                         f"{reference_text(reference)[:80]!r}")
    ok, got = parse_json(answer)
    got = got if ok and isinstance(got, dict) else {}
    fields = {key: float(key in got and same_json(got[key], value)) for key, value in expected.items()}
    return Score(sum(fields.values()) / len(fields), fields)


def same_json(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1 and 1.0 equals 1 (Python's == says True == 1), recursively."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    return a == b


def _regex(pattern: re.Pattern) -> Scorer:
    def score(answer: str, reference: Any) -> Score:
        found = pattern.search(answer)
        if not pattern.groups:
            return Score(float(found is not None))
        return Score(float(found is not None and (found.group(1) or "").strip() == reference_text(reference).strip()))
    return score


def _rouge_l() -> Scorer:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ConfigError("the rouge_l metric needs the rouge-score package: pip install 'lorakit[eval]'",
                          where="--metrics") from None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def score(answer: str, reference: Any) -> Score:
        return Score(scorer.score(reference_text(reference), answer)["rougeL"].fmeasure)
    return score


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"--regex {pattern!r} is not a regular expression: {err}", where="--regex") from None


SIMPLE: dict[str, Scorer] = {"exact": _exact, "contains": _contains, "json_valid": _json_valid,
                             "json_fields": _json_fields}
