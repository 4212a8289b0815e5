"""Preference data: {prompt, chosen, rejected} pairs (DPO, ORPO) and {prompt, completion, label} examples (KTO).

Records are TRL's preference formats. A prompt is a string (one user turn) or a list of messages (a shared
multi-turn history, optionally with a system turn, ending with a user turn); a completion is a string or a list
holding one assistant message. Without a `prompt` key, `chosen` and `rejected` may be whole conversations: their
common leading turns are the prompt (TRL's implicit prompt). The chat template renders the prompt with its
generation prompt and each completion after it (templates.tokenize_reply); only completion tokens, up to and
including the end-of-turn token, are scored, as SFT supervises a reply.

Lengths, in this order: the prompt keeps its last max_prompt_len tokens, each completion its first
max_completion_len; a prompt that leaves no room within data.max_seq_len is a bad record; completions are cut
to the room left. Bad records (empty or identical completions, a prompt that fills the budget, bad messages)
stop preparation with file:line, or are skipped and counted with data.skip_bad_records, as for SFT.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .budget import char_budget, tokens_past_a_cut
from .collate import LengthGroupedBatchSampler
from .formats import Conversation, Turn, check_conversation, column_names, maybe_json, turn_list
from .options import DataOptions
from .prepare import DataSummary, Source, each_record, pad_id, source_name, split_validation
from .records import BadRecord
from .templates import IGNORE_INDEX, ChatTemplate, resolve_template, tokenize_reply


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with a preferred and a dispreferred completion, tokenized."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str


@dataclass(frozen=True)
class Unpaired:
    """One prompt with one completion labelled desirable or not (KTO), tokenized."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    source: str


@dataclass
class PreferenceData:
    examples: list  # PreferencePair or Unpaired, all of one kind
    summary: DataSummary
    pad_token_id: int

    @property
    def paired(self) -> bool:
        return bool(self.examples) and isinstance(self.examples[0], PreferencePair)


@dataclass(frozen=True)
class Lengths:
    max_seq_len: int
    max_prompt_len: int | None = None
    max_completion_len: int | None = None


def prepare_preference(source: Source, tokenizer: Any, options: DataOptions | None = None, *,
                       lengths: Lengths | None = None, paired: bool = True, name: str | None = None) -> PreferenceData:
    """Read, validate, render and tokenize every record of `source` (a file path, or records in memory):
    pairs when `paired`, else KTO's labelled completions. Raises DataError naming file, line and reason."""
    opts = options or DataOptions()
    lengths = lengths or Lengths(opts.max_seq_len)
    summary = DataSummary(source=source_name(source, name), format="preference" if paired else "kto")
    template: ChatTemplate | None = None

    def example(record: Mapping[str, Any], location: str) -> PreferencePair | Unpaired:
        nonlocal template
        if template is None:
            template = resolve_template(tokenizer, opts.template)  # DataError: stops at once, not per record
        if paired:
            return _pair(record, location, tokenizer, template, lengths, summary)
        return _unpaired(record, location, tokenizer, template, lengths, summary)

    examples = each_record(source, opts, summary, example)
    summary.template = template.name if template is not None else "-"
    return PreferenceData(examples, summary, pad_id(tokenizer))


# ---- one record ----------------------------------------------------------------------------------------
def _pair(record: Mapping[str, Any], location: str, tokenizer: Any, template: ChatTemplate, lengths: Lengths,
          summary: DataSummary) -> PreferencePair:
    prompt, chosen, rejected = _pair_texts(record)
    if chosen == rejected:
        raise BadRecord("identical_completions", "'chosen' and 'rejected' are the same text: the pair prefers nothing")
    prompt_ids, (chosen_ids, rejected_ids) = _tokenize(prompt, [chosen, rejected], tokenizer, template,
                                                       lengths.max_seq_len)
    prompt_ids, (chosen_ids, rejected_ids), cut = _fit(prompt_ids, [chosen_ids, rejected_ids], lengths)
    if chosen_ids == rejected_ids:
        raise BadRecord("identical_after_truncation", "'chosen' and 'rejected' are the same tokens after truncation "
                                                      "to the length budget; raise max_completion_len/max_seq_len")
    _count(summary, cut, prompt_ids, [chosen_ids, rejected_ids])
    return PreferencePair(prompt_ids, chosen_ids, rejected_ids, location)


def _unpaired(record: Mapping[str, Any], location: str, tokenizer: Any, template: ChatTemplate, lengths: Lengths,
              summary: DataSummary) -> Unpaired:
    for key in ("prompt", "completion", "label"):
        if key not in record:
            raise BadRecord("missing_key", f"missing key {key!r}: KTO records are {{prompt, completion, label}} "
                                           f"(keys present: {', '.join(map(repr, list(record)[:8])) or 'none'})")
    label = record["label"]
    if isinstance(label, str) and label.lower() in ("true", "false"):  # CSV cells
        label = label.lower() == "true"
    if not isinstance(label, bool):
        raise BadRecord("bad_label", f"'label' is {label!r}; expected true (desirable) or false (undesirable)")
    prompt = prompt_turns(record["prompt"])
    completion = _completion(record["completion"], "completion")
    check_conversation((*prompt, Turn("assistant", completion)))
    prompt_ids, (completion_ids,) = _tokenize(prompt, [completion], tokenizer, template, lengths.max_seq_len)
    prompt_ids, (completion_ids,), cut = _fit(prompt_ids, [completion_ids], lengths)
    _count(summary, cut, prompt_ids, [completion_ids])
    return Unpaired(prompt_ids, completion_ids, label, location)


def _tokenize(prompt: Conversation, replies: list[str], tokenizer: Any, template: ChatTemplate, max_seq_len: int) \
        -> tuple[list[int], list[list[int]]]:
    """(prompt ids, ids of each reply), as tokenize_reply gives them. A record far longer than max_seq_len tokens
    could need is cut to a character budget first (budget.py: tokenizing holds a few hundred bytes per input
    byte), the prompt keeping its end and each reply its start; while what a cut leaves holds fewer tokens than
    tokens_past_a_cut, the budget doubles, so the tokens that _fit keeps are those of the whole record."""
    budget = char_budget(max_seq_len)
    while True:
        cut_prompt, cut_replies = _prompt_tail(prompt, budget), [r[:budget] for r in replies]
        prompt_ids, out = None, []
        for reply in cut_replies:
            ids, reply_ids = tokenize_reply(cut_prompt, reply, tokenizer, template)
            if prompt_ids is not None and ids != prompt_ids:  # the same prompt renders the same whatever follows
                raise BadRecord("template_roundtrip", "the prompt tokenizes differently before 'chosen' and 'rejected'")
            prompt_ids = ids
            out.append(reply_ids)
        enough = tokens_past_a_cut(max_seq_len)
        short = ((cut_prompt != prompt and len(prompt_ids) < enough)
                 or any(c != r and len(ids) < enough for c, r, ids in zip(cut_replies, replies, out)))
        if not short:
            return prompt_ids, out
        budget *= 2


def _prompt_tail(prompt: Conversation, budget: int) -> Conversation:
    """The prompt with at most `budget` characters of content, its end kept: the last turns whole, the one where
    the budget runs out cut to its end, the earlier ones emptied (kept, so the roles and markup stay)."""
    if sum(len(t.content) for t in prompt) <= budget:
        return prompt
    out, left = [], budget
    for turn in reversed(prompt):
        keep = turn.content[len(turn.content) - left:] if left < len(turn.content) else turn.content
        out.append(replace(turn, content=keep if left > 0 else ""))
        left = max(0, left - len(turn.content))
    return tuple(reversed(out))


def _pair_texts(record: Mapping[str, Any]) -> tuple[Conversation, str, str]:
    for key in ("chosen", "rejected"):
        if key not in record:
            raise BadRecord("missing_key", f"missing key {key!r}: preference records are {{prompt, chosen, rejected}} "
                                           f"(keys present: {', '.join(map(repr, list(record)[:8])) or 'none'})")
    if "prompt" in record:
        prompt = prompt_turns(record["prompt"])
        chosen, rejected = _completion(record["chosen"], "chosen"), _completion(record["rejected"], "rejected")
    else:  # TRL's implicit prompt: two whole conversations sharing their leading turns
        whole = [turn_list(record, key, column_names(None)) for key in ("chosen", "rejected")]
        shared = 0
        while shared < min(map(len, whole)) and whole[0][shared] == whole[1][shared]:
            shared += 1
        for key, turns in zip(("chosen", "rejected"), whole):
            if len(turns) != shared + 1 or turns[-1].role != "assistant":
                raise BadRecord("no_shared_prompt", f"without a 'prompt' key, {key!r} must be the shared conversation "
                                                    "plus one assistant reply")
        refuse_tools((*whole[0], *whole[1]), "'chosen' or 'rejected'")
        prompt, chosen, rejected = whole[0][:shared], whole[0][-1].content, whole[1][-1].content
    for text in (chosen, rejected):
        check_conversation((*prompt, Turn("assistant", text)))  # role order, and no empty completion
    return prompt, chosen, rejected


def prompt_turns(value: Any) -> Conversation:
    value = maybe_json(value)
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord("empty_prompt", "'prompt' is empty or whitespace")
        return (Turn("user", value),)
    if isinstance(value, list):
        turns = turn_list({"prompt": value}, "prompt", column_names(None))
        refuse_tools(turns, "'prompt'")
        if not turns or turns[-1].role != "user":
            raise BadRecord("bad_role_order", "'prompt' must end with a user turn (the completion answers it)")
        return turns
    raise BadRecord("bad_prompt", f"'prompt' is {type(value).__name__}; expected a string or a list of messages")


def refuse_tools(turns: Sequence[Turn], what: str) -> None:
    """Preference and RL data: tool use is not taken yet, and is refused rather than dropped."""
    if any(t.uses_tools for t in turns):
        raise BadRecord("tools_unsupported", f"{what} holds tool calls, tool results or reasoning: preference and RL "
                                             "data do not take them yet (supervised data does)")


def _completion(value: Any, key: str) -> str:
    value = maybe_json(value)
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord("empty_completion", f"{key!r} is empty or whitespace: it would teach nothing")
        return value
    if isinstance(value, list):
        turns = turn_list({key: value}, key, column_names(None))
        refuse_tools(turns, repr(key))
        if len(turns) != 1 or turns[0].role != "assistant":
            raise BadRecord("bad_completion", f"{key!r} must hold exactly one assistant message")
        return _completion(turns[0].content, key)
    raise BadRecord("bad_completion", f"{key!r} is {type(value).__name__}; expected a string or [one assistant "
                                      "message]")


def _fit(prompt: list[int], completions: list[list[int]], lengths: Lengths) \
        -> tuple[list[int], list[list[int]], bool]:
    """The prompt and completions cut to the length settings (see the module docstring), and whether any was."""
    cut = False
    if lengths.max_prompt_len is not None and len(prompt) > lengths.max_prompt_len:
        prompt, cut = prompt[-lengths.max_prompt_len:], True  # keep the end: the part next to the completion
    if len(prompt) >= lengths.max_seq_len:
        raise BadRecord("prompt_fills_budget", f"the prompt alone has {len(prompt)} tokens, leaving no room for a "
                                               f"completion within max_seq_len={lengths.max_seq_len}; set "
                                               "preference.max_prompt_len or raise data.max_seq_len")
    room = lengths.max_seq_len - len(prompt)
    if lengths.max_completion_len is not None:
        room = min(room, lengths.max_completion_len)
    out = []
    for ids in completions:
        cut = cut or len(ids) > room
        out.append(ids[:room])
    return prompt, out, cut


def _count(summary: DataSummary, cut: bool, prompt: list[int], completions: list[list[int]]) -> None:
    summary.truncated += cut
    summary.supervised_tokens += sum(map(len, completions))
    summary.total_tokens += sum(len(prompt) + len(c) for c in completions)


# ---- batches -------------------------------------------------------------------------------------------
def sequence_lengths(data: PreferenceData) -> list[int]:
    """The longest row each example adds to a batch (for grouping by length)."""
    if data.paired:
        return [len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in data.examples]
    return [len(e.prompt_ids) + len(e.completion_ids) for e in data.examples]


def kl_partners(count: int, batch_size: int) -> list[int]:
    """KTO's mismatched completion for each example: the previous one within consecutive blocks of `batch_size`
    in data order (TRL's rotation), fixed per example so that the reference's KL log-probs can be precomputed."""
    partners = []
    for start in range(0, count, batch_size):
        block = list(range(start, min(start + batch_size, count)))
        partners += [block[-1]] + block[:-1]
    return partners


def collate_rows(sequences: Sequence[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """(prompt ids, completion ids) pairs as right-padded rows: input_ids, attention_mask, and labels holding
    the completion tokens (IGNORE_INDEX elsewhere). All (rows, seq) int64."""
    longest = max(len(p) + len(c) for p, c in sequences)
    ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)  # (rows, seq)
    labels = torch.full((len(sequences), longest), IGNORE_INDEX, dtype=torch.long)  # (rows, seq)
    attn = torch.zeros((len(sequences), longest), dtype=torch.long)  # (rows, seq)
    for row, (prompt, completion) in enumerate(sequences):
        n, p = len(prompt) + len(completion), len(prompt)
        ids[row, :n] = torch.tensor(prompt + completion, dtype=torch.long)
        labels[row, p:n] = torch.tensor(completion, dtype=torch.long)
        attn[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}


def collate_preference(data: PreferenceData, indices: Sequence[int], partners: Sequence[int] | None = None) \
        -> dict[str, torch.Tensor]:
    """One micro-batch of examples `indices`. Pairs: 2 x len rows, the chosen completions first, then the
    rejected in the same order. KTO: one row per example, `desirable` (bool), and with `partners` the KL rows
    (prompt i with its partner's completion) under kl_input_ids / kl_attention_mask / kl_labels. `index` holds
    the examples' positions in the data (for precomputed reference log-probs)."""
    chosen = [data.examples[i] for i in indices]
    if data.paired:
        rows = [(e.prompt_ids, e.chosen_ids) for e in chosen] + [(e.prompt_ids, e.rejected_ids) for e in chosen]
        batch = collate_rows(rows, data.pad_token_id)
    else:
        batch = collate_rows([(e.prompt_ids, e.completion_ids) for e in chosen], data.pad_token_id)
        batch["desirable"] = torch.tensor([e.desirable for e in chosen], dtype=torch.bool)
        if partners is not None:
            kl = collate_rows([(e.prompt_ids, data.examples[partners[i]].completion_ids)
                               for i, e in zip(indices, chosen)], data.pad_token_id)
            batch.update({f"kl_{key}": value for key, value in kl.items()})
    batch["index"] = torch.tensor(list(indices), dtype=torch.long)
    return batch


def preference_batches(data: PreferenceData, batch_size: int, *, seed: int, epoch: int, group: int = 50,
                       partners: Sequence[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The micro-batches of one epoch, in an order fixed by (seed, epoch), grouped by length within runs of
    `group` batches (one optimizer step's), as SFT's iter_batches."""
    sampler = LengthGroupedBatchSampler(sequence_lengths(data), batch_size, seed=seed, mega_batch_factor=group)
    for indices in sampler.batches(epoch):
        yield collate_preference(data, indices, partners)


def split_preference(data: PreferenceData, fraction: float, seed: int) -> tuple[PreferenceData, PreferenceData]:
    """Hold out `fraction` of the examples (at least one) for validation, fixed by `seed` (split_validation's)."""
    keep, held = split_validation(data.examples, fraction, seed)
    return (PreferenceData(keep, data.summary, data.pad_token_id), PreferenceData(held, data.summary, data.pad_token_id))
