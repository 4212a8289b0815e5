"""Incremental detokenization with stop strings.

Tokens do not map to text one by one (byte-level BPE splits UTF-8 characters across tokens, some decoders
merge spaces), so each step decodes the whole completion and emits only the new suffix. Text that could be
the start of a stop string is held back until it is clear it is not, so a stop string never leaks out.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what decode() gives for an incomplete UTF-8 sequence at the end


class TextStream:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.emitted = 0  # characters of the decoded completion already handed out
        self.text = ""  # the decoded completion so far (possibly with a held-back tail)

    def add(self, token_ids: list[int]) -> tuple[str, bool]:
        """Given the whole completion so far: (new text safe to emit, whether a stop string was reached).

        On a stop, the text returned ends right before the stop string and nothing after it is ever emitted.
        """
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        self.text = text
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            end = max(min(hits), self.emitted)
            return self._take(end), True
        safe = len(text.rstrip(REPLACEMENT))  # wait for the rest of a split character
        safe -= self._stop_prefix_len(text[:safe])
        return self._take(max(safe, self.emitted)), False

    def flush(self) -> str:
        """Whatever was held back, for when generation ends without reaching a stop string."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper start of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
