"""`lorakit data inspect`: examples as the model sees them, with the tokens that carry loss marked.

Each example is shown as its decoded text in runs: supervised runs (label != -100) in green on a terminal,
or between [[ and ]] when the output is piped. Below each, its supervised and total token counts, and a
warning when its last trained token is neither EOS nor an end-of-turn token of the template: the reply was
cut by truncation (no whole turn fitted), so the model is trained on a reply that never ends.
"""

from __future__ import annotations

from typing import Any, Iterable

from .preference import PreferenceData
from .prepare import Example, PreparedData
from .templates import IGNORE_INDEX

GREEN, RESET = "\033[32m", "\033[0m"
OPEN, CLOSE = "[[", "]]"


def trained_runs(example: Example) -> list[tuple[bool, list[int]]]:
    """The example's ids in maximal runs of (carries loss, ids)."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(example.input_ids, example.labels):
        supervised = label != IGNORE_INDEX
        if runs and runs[-1][0] == supervised:
            runs[-1][1].append(token)
        else:
            runs.append((supervised, [token]))
    return runs


def render(example: Example, tokenizer: Any, *, color: bool) -> str:
    """The decoded text with supervised runs marked (special tokens shown, so turn markers are visible)."""
    parts = []
    for supervised, ids in trained_runs(example):
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if supervised:
            text = f"{GREEN}{text}{RESET}" if color else f"{OPEN}{text}{CLOSE}"
        parts.append(text)
    return "".join(parts)


def warnings_for(example: Example, stop_ids: Iterable[int], tokenizer: Any) -> list[str]:
    """What looks wrong with what this example trains."""
    supervised = [k for k, label in enumerate(example.labels) if label != IGNORE_INDEX]
    if not supervised:
        return ["no supervised token: this example teaches nothing"]
    last = example.input_ids[supervised[-1]]
    if last not in set(stop_ids):
        token = tokenizer.convert_ids_to_tokens(last)
        return [f"the last trained token is {token!r}, not EOS or an end-of-turn token: the reply was cut by "
                "truncation (raise data.max_seq_len, or truncation: drop), so the model learns a reply that "
                "never ends"]
    return []


def report(data: PreparedData, tokenizer: Any, *, count: int, stop_ids: Iterable[int], color: bool) -> str:
    """The first `count` examples rendered, with counts and warnings, then warnings over all examples."""
    stop_ids = set(stop_ids)
    lines = [data.summary.line()]
    for problem in data.summary.problems:
        lines.append(f"  dropped: {problem}")
    flagged = 0
    for index, example in enumerate(data.examples):
        problems = warnings_for(example, stop_ids, tokenizer)
        flagged += bool(problems)
        if index >= count:
            continue
        trained = sum(1 for label in example.labels if label != IGNORE_INDEX)
        lines += ["", f"== example {index + 1} ({example.source}): {trained} of {len(example.input_ids)} tokens "
                      "carry loss" + ("" if color else f", marked {OPEN} {CLOSE}"), render(example, tokenizer, color=color)]
        lines += [f"warning: {p}" for p in problems]
    lines += ["", f"{flagged} of {len(data.examples)} examples have warnings" if flagged
              else f"no warnings in {len(data.examples)} examples"]
    return "\n".join(lines)


def preference_report(data: PreferenceData, tokenizer: Any, *, count: int, stop_ids: Iterable[int], color: bool) -> str:
    """report() for preference data: each pair's prompt with its chosen and its rejected completion (KTO: its one
    completion and label), the scored tokens marked, then warnings over all examples."""
    stop_ids = set(stop_ids)
    lines = [data.summary.line()] + [f"  dropped: {problem}" for problem in data.summary.problems]
    flagged = 0
    for index, example in enumerate(data.examples):
        if data.paired:
            sides = [("chosen", example.chosen_ids), ("rejected", example.rejected_ids)]
        else:
            sides = [("desirable" if example.desirable else "undesirable", example.completion_ids)]
        shown = [(name, Example(example.prompt_ids + ids, [IGNORE_INDEX] * len(example.prompt_ids) + ids,
                                example.source)) for name, ids in sides]
        problems = [f"{name}: {p}" for name, one in shown for p in warnings_for(one, stop_ids, tokenizer)]
        flagged += bool(problems)
        if index >= count:
            continue
        lines += ["", f"== example {index + 1} ({example.source}): prompt {len(example.prompt_ids)} tokens"
                      + ("" if color else f"; scored tokens marked {OPEN} {CLOSE}")]
        for name, one in shown:
            lines += [f"-- {name} ({len(one.input_ids) - len(example.prompt_ids)} tokens scored):",
                      render(one, tokenizer, color=color)]
        lines += [f"warning: {p}" for p in problems]
    lines += ["", f"{flagged} of {len(data.examples)} examples have warnings" if flagged
              else f"no warnings in {len(data.examples)} examples"]
    return "\n".join(lines)
