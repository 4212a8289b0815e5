"""Constrained decoding: a request's output held to a grammar, so that it always parses.

The grammar (from a JSON schema, or a Lark grammar with inline JSON schemas, `%json {...}`) is llguidance's: it
computes, at each step, which tokens may come next; the engine sets every other logit to -inf before choosing, and
feeds the chosen token back. When the grammar is complete the request ends ("stop"). llguidance is an optional
dependency (`pip install 'lorakit[serve]'`); only requests that carry a grammar need it.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from ..errors import LorakitError

JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: a model cannot pad it with whitespace forever


class GrammarError(LorakitError, ValueError):
    """The grammar is invalid, or the output could not continue within it."""


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
    except ImportError as err:
        raise GrammarError("constrained decoding needs llguidance: pip install 'lorakit[serve]'") from err
    return llguidance


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """The grammar of JSON values that validate against `schema` (compact separators)."""
    return _llguidance().LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)


def lark_grammar(lark: str) -> str:
    """A Lark grammar (llguidance's dialect: `%json {schema}` stands for a JSON value of that schema)."""
    return _llguidance().LLMatcher.grammar_from_lark(lark)


class GrammarTokenizer:
    """llguidance's view of one tokenizer (built once: about a second for a large vocabulary), for `n_vocab` token
    ids (the larger of the model's logits, which may be padded past the tokenizer, and the tokenizer's)."""

    def __init__(self, tokenizer: Any, n_vocab: int):
        self._hf, self._n_vocab = tokenizer, n_vocab
        self._lock = threading.Lock()
        self._ll = None

    def get(self):
        with self._lock:
            if self._ll is None:
                try:
                    self._ll = _llguidance().hf.from_tokenizer(self._hf, n_vocab=self._n_vocab)
                except (ValueError, TypeError) as err:  # e.g. a slow (non-Rust) tokenizer
                    raise GrammarError(f"constrained decoding cannot use this tokenizer: {err}") from None
            return self._ll


class Constraint:
    """One request's place in its grammar."""

    def __init__(self, tokenizer: GrammarTokenizer, grammar: str):
        self._matcher = _llguidance().LLMatcher(tokenizer.get(), grammar)
        if self._matcher.is_error():
            raise GrammarError(f"invalid grammar: {self._matcher.get_error()}")

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (vocab,) with every token the grammar does not allow next set to -inf."""
        allowed = torch.frombuffer(bytearray(self._matcher.compute_logit_bias()), dtype=torch.uint8)
        allowed = allowed[:logits.shape[-1]].to(logits.device) > 0
        if not bool(allowed.any()):
            raise GrammarError(f"the grammar allows no next token ({self._matcher.get_error() or 'dead end'})")
        return logits.masked_fill(~allowed, float("-inf"))

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise GrammarError(f"token {token} broke the grammar: {self._matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """The output is a whole sentence of the grammar and nothing may follow it."""
        return self._matcher.is_stopped()
