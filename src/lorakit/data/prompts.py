"""Prompts for RL (objective grpo): the prompt part of each record, rendered for generation, with the record kept
for the reward functions.

Any chat format is read: {prompt: text or messages} (TRL's prompt-only format, extra columns allowed), messages /
sharegpt conversations (a final assistant turn, if any, is the reference answer and is left out), alpaca
(instruction + input; output left out). The prompt is rendered by the chat template with its generation prompt.
Bad records (no prompt part, a prompt over max_prompt_len tokens, a conversation not ending with a user turn)
stop the run naming file:line, or are skipped and counted with data.skip_bad_records, as for SFT.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .formats import Conversation, column_names, detect_format, describe_keys, normalise, turn_list
from .options import DataOptions
from .preference import prompt_turns, refuse_tools
from .prepare import DataSummary, Source, each_record, pad_id, source_name
from .records import BadRecord
from .templates import ChatTemplate, resolve_template, tokenize_prompt


@dataclass
class PromptRecord:
    ids: list[int]
    """The prompt rendered by the chat template with its generation prompt, tokenized."""
    text: str
    """What the reward functions see as the prompt: the last user turn's text."""
    record: Mapping[str, Any]
    """The data row (extra columns such as `answer` are for the rewards)."""
    location: str
    """file:line, for messages."""


@dataclass
class PromptData:
    records: list[PromptRecord]
    summary: DataSummary
    pad_token_id: int


def prepare_prompts(source: Source, tokenizer: Any, options: DataOptions | None = None, *, max_prompt_len: int,
                    name: str | None = None,
                    limit_is: str = "rl.max_prompt_len, or data.max_seq_len - rl.max_completion_len") -> PromptData:
    """Read, validate, render and tokenize the prompt of every record of `source` (a file, or records in memory).
    Raises DataError naming file, line and reason (or skips and counts with skip_bad_records); `limit_is` says
    what sets max_prompt_len, for that message."""
    opts = options or DataOptions()
    summary = DataSummary(source=source_name(source, name), format="prompts")
    template: ChatTemplate | None = None

    def example(record: Mapping[str, Any], location: str) -> PromptRecord:
        nonlocal template
        if template is None:
            template = resolve_template(tokenizer, opts.template)  # DataError: stops at once, not per record
        turns = prompt_of(record, opts.columns)
        ids = tokenize_prompt(turns, tokenizer, template)
        if len(ids) > max_prompt_len:
            raise BadRecord("prompt_too_long", f"the prompt is {len(ids)} tokens, over the {max_prompt_len} allowed "
                                               f"({limit_is}); "
                                               "shorten it or raise the limit")
        summary.total_tokens += len(ids)
        return PromptRecord(ids, next(t.content for t in reversed(turns) if t.role == "user"), record, location)

    records = each_record(source, opts, summary, example)
    summary.template = template.name if template is not None else "-"
    return PromptData(records, summary, pad_id(tokenizer))


def prompt_of(record: Mapping[str, Any], columns: Mapping[str, str] | None = None) -> Conversation:
    """The conversation a completion should answer: it ends with a user turn."""
    if "prompt" in record:
        return prompt_turns(record["prompt"])
    fmt = detect_format(record, columns)
    col = column_names(columns)
    if fmt in ("messages", "sharegpt"):
        turns = turn_list(record, col["messages"] if fmt == "messages" else col["conversations"], col)
        if turns and turns[-1].role == "assistant":
            turns = turns[:-1]  # the reference answer: a reward may compare with it through the record
        refuse_tools(turns, "the prompt")
    elif fmt == "alpaca":
        turns = normalise(record, fmt, columns)[:-1]
    elif fmt == "text":
        raise BadRecord("no_prompt", "a text record has no prompt part; RL prompts are {prompt: ...}, a conversation, "
                                     "or alpaca instruction/input")
    else:
        raise BadRecord("unknown_format", f"no prompt found: expected a 'prompt' key, or {describe_keys(columns)}")
    if not turns or turns[-1].role != "user":
        raise BadRecord("bad_role_order", "the prompt must end with a user turn (the completion answers it)")
    return turns
