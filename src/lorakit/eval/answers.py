"""Held-out prompts with their reference answers, and the answers of several models to them, generated together.

Any chat format is read (as GRPO's prompts: {prompt, ...}, messages / sharegpt, alpaca); the reference is the
column named by `reference_column`, else a TRL-style `completion`, the final assistant turn of a conversation,
alpaca's `output`, or an `answer` column. Every model's requests go to one engine at once, so the base and the
adapters are decoded in the same batches (each row routed to its adapter).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..data.formats import column_names, detect_format, turn_list
from ..data.options import DataOptions
from ..data.prepare import Source
from ..data.prompts import prepare_prompts
from ..errors import DataError
from ..infer import Engine, SamplingParams


@dataclass(frozen=True)
class EvalExample:
    ids: list[int]
    """The prompt rendered by the chat template (with its generation prompt), tokenized."""
    prompt: str
    """The last user turn, for tables and reports."""
    reference: Any
    """The reference answer (None where the record has none)."""
    location: str
    """file:line."""


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str  # stop, length, cancelled
    tokens: int
    token_ids: tuple[int, ...] = ()  # the generated ids, an end-of-sequence token that stopped it included


def read_examples(source: Source, tokenizer: Any, options: DataOptions, *, positions: int, max_new_tokens: int,
                  reference_column: str | None = None, require_reference: Sequence[str] = (),
                  limit: int | None = None) -> list[EvalExample]:
    """The examples of `source`, each prompt short enough to leave `max_new_tokens` of the model's `positions`.
    `require_reference` names the metrics that compare with a reference: a record without one is a DataError
    naming it."""
    if max_new_tokens >= positions:
        raise DataError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt: the model has "
                        f"{positions} positions; lower it")
    data = prepare_prompts(source, tokenizer, options, max_prompt_len=positions - max_new_tokens,
                           limit_is=f"the model's {positions} positions less {max_new_tokens} new tokens: lower "
                                    "--max-new-tokens")
    examples = []
    for record in data.records:
        reference = reference_of(record.record, options.columns, reference_column)
        if reference is None and require_reference:
            where = f"column {reference_column!r}" if reference_column else (
                "a 'completion', a final assistant turn, alpaca's 'output' or an 'answer' column")
            raise DataError(f"{record.location}: no reference answer ({where}); the metrics "
                            f"{', '.join(require_reference)} compare with one. Add it to every record, name the "
                            "column with --reference COLUMN, or choose metrics that need none (json_valid, regex "
                            "without a group)")
        examples.append(EvalExample(record.ids, record.text, reference, record.location))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"{data.summary.source}: no usable prompts to evaluate")
    return examples


def position_limit(model: Any) -> int:
    """The most positions (prompt and answer) the model takes: its config's max_position_embeddings."""
    config = getattr(getattr(model, "model", model), "config", None)
    return getattr(config, "max_position_embeddings", None) or 1 << 20


def reference_of(record: Mapping[str, Any], columns: Mapping[str, str] | None = None,
                 column: str | None = None) -> Any:
    """The reference answer of a record, or None (see the module docstring for where it is looked for)."""
    if column is not None:
        return record.get(column)
    if "completion" in record:
        value = record["completion"]
        if isinstance(value, list):  # conversational completion: [{"role": "assistant", "content": ...}]
            replies = [t.get("content") for t in value if isinstance(t, Mapping) and t.get("role") == "assistant"]
            return replies[-1] if replies else None
        return value
    fmt, col = detect_format(record, columns), column_names(columns)
    if fmt in ("messages", "sharegpt"):
        turns = turn_list(record, col["messages"] if fmt == "messages" else col["conversations"], col)
        if turns and turns[-1].role == "assistant":
            return turns[-1].content
    elif fmt == "alpaca":
        return record.get(col["output"])
    return record.get("answer")


def answers_of(model: Any, tokenizer: Any, examples: Sequence[EvalExample], adapters: Sequence[str | None],
               params: SamplingParams, *, batch_size: int) -> list[list[Answer]]:
    """generate_answers on an engine of its own over `model` (closed when done), rows decoded `batch_size` at a
    time."""
    positions = position_limit(model)
    with Engine(model, tokenizer, max_batch_size=batch_size, max_queue=len(examples) * len(adapters),
                max_prompt_tokens=positions, max_new_tokens=params.max_tokens) as engine:
        return generate_answers(engine, examples, adapters, params)


def generate_answers(engine: Engine, examples: Sequence[EvalExample], adapters: Sequence[str | None],
                     params: SamplingParams, *, progress: bool | None = None) -> list[list[Answer]]:
    """answers[m][i]: adapter m's answer to example i (None: the base). A seeded sampled request gets seed + i, so
    every model draws with the same stream for the same prompt. `progress`: a bar on stderr (None: on a terminal)."""
    from tqdm.auto import tqdm

    requests = [(ex.ids, adapter, params if params.seed is None else replace(params, seed=params.seed + i))
                for adapter in adapters for i, ex in enumerate(examples)]
    handles = engine.submit_many(requests)
    answers: list[Answer] = []
    with tqdm(total=len(handles), desc="generating", unit="answer", disable=None if progress is None else not progress,
              leave=False) as bar:
        for handle in handles:
            events = list(handle)
            ids = tuple(t for e in events for t in e.token_ids)
            answers.append(Answer("".join(e.text for e in events), events[-1].finish_reason if events else "cancelled",
                                  len(ids), ids))
            bar.update(1)
    n = len(examples)
    return [answers[m * n:(m + 1) * n] for m in range(len(adapters))]
