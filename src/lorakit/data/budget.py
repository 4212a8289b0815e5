"""A record's text cut to a character budget before it is tokenized, so one huge record costs bounded memory.

Tokenizing holds far more than the text (ids, offsets and the tokenizer's own per-token state: a few hundred
bytes per input byte), and an example keeps at most max_seq_len tokens anyway. So text far past what
max_seq_len tokens can cover is cut off first: a token rarely spans more than CHARS_PER_TOKEN characters, and a
cut changes only the tokens of the word it falls in. `tokenize_within_budget` checks that the cut example still
runs well past max_seq_len (else it doubles the budget and tokenizes again), so the tokens, labels and turn ends
that the length policy keeps are those of the whole record (tests/data/test_data_budget.py compares both on
byte-level and SentencePiece tokenizers); records within the budget are not touched at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from .formats import Normalised, Turn
from .templates import Tokenized

CHARS_PER_TOKEN = 16  # generous: English averages about 4 characters a token, code about 3
BUDGET_SLACK = 1024  # characters, so that short max_seq_lens do not cut close


def char_budget(max_seq_len: int) -> int:
    """Characters of text kept per record before tokenizing, for examples of at most max_seq_len tokens."""
    return CHARS_PER_TOKEN * max_seq_len + BUDGET_SLACK


def tokens_past_a_cut(max_seq_len: int) -> int:
    """How many tokens a cut example must hold: the cut can only change the last few, far past max_seq_len."""
    return 2 * max_seq_len + 64


def tokenize_within_budget(item: Normalised, max_seq_len: int, tokenize: Callable[[Normalised], Tokenized],
                           literals: tuple[str, ...] = ()) -> tuple[Tokenized, bool]:
    """(tokenize(item cut to the budget), whether anything was cut). The budget doubles while the cut example
    holds fewer than tokens_past_a_cut(max_seq_len) tokens (text of very long tokens)."""
    budget = char_budget(max_seq_len)
    while True:
        cut = cut_to_budget(item, budget, literals)
        if cut is None:
            return tokenize(item), False
        result = tokenize(cut)
        if len(result.input_ids) >= tokens_past_a_cut(max_seq_len):
            return result, True
        budget *= 2


def cut_to_budget(item: Normalised, budget: int, literals: tuple[str, ...] = ()) -> Normalised | None:
    """`item` with its text cut to `budget` characters in all, or None when it fits.

    A conversation keeps its turns up to the one where the budget runs out, that one cut (turns after it start
    past the budget: their tokens lie past max_seq_len). A cut turn whose full content holds a special-token
    string (kept literal, see templates.py) keeps one, so it is tokenized the same way as the whole turn.
    """
    if isinstance(item, str):
        return item[:budget] if len(item) > budget else None
    if sum(len(t.reasoning) + len(t.content) for t in item) <= budget:
        return None
    kept: list[Turn] = []
    left = budget
    for turn in item:  # reasoning is rendered before the reply's text
        if len(turn.reasoning) > left:
            kept.append(replace(turn, reasoning=_cut_content(turn.reasoning, left, literals), content="",
                                tool_calls=()))
            break
        left -= len(turn.reasoning)
        if len(turn.content) > left:
            kept.append(replace(turn, content=_cut_content(turn.content, left, literals), tool_calls=()))
            break
        kept.append(turn)
        left -= len(turn.content)
    return tuple(kept)


def _cut_content(content: str, size: int, literals: tuple[str, ...]) -> str:
    head = content[:size]
    if any(s in head for s in literals):
        return head
    return head + next((s for s in literals if s in content), "")
