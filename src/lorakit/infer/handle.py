"""What a caller holds for a submitted request: its events, as a blocking or an asyncio stream."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator


@dataclass
class Event:
    text: str
    """New text since the previous event ("" is allowed, e.g. on the final event)."""
    token_ids: list[int]
    """Tokens sampled for this event (an EOS token included; its text is not)."""
    finish_reason: str | None
    """None until the last event; then "stop" (EOS or a stop string), "length" or "cancelled"."""
    logprobs: list[float] = field(default_factory=list)
    """Log-probability of each of token_ids under the distribution it was sampled at: log_softmax(logits / T),
    T the request's temperature (1 for greedy), before top_p (the importance ratio of RL needs exactly this)."""
    model_logprobs: list[float] = field(default_factory=list)
    """With SamplingParams.logprobs set: the model's own log-softmax of each of token_ids (temperature 1, before
    penalties), as OpenAI's `logprobs` report it."""
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    """With SamplingParams.logprobs = k: for each of token_ids, the k most likely (token, log-probability)."""
    time: float = field(default_factory=time.monotonic, compare=False)
    """time.monotonic() when the engine made the event (its token was sampled); not part of equality."""


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int


class RequestHandle:
    """Events are kept, so iterating, aiter() and result() can be used in any mix, any number of times.

    The engine thread pushes events; readers wait on a threading.Condition (blocking) or an asyncio.Event
    set through the reader's loop (asyncio), so an event loop is never blocked.
    """

    def __init__(self, request_id: str, prompt_tokens: int):
        self.id = request_id
        self.submitted = time.monotonic()
        self.usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=0)
        self._events: list[Event] = []
        self._error: BaseException | None = None
        self._done = False
        self._cancelled = False
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # ---- reader side ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Event]:
        i = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: i < len(self._events) or self._done)
                event = self._event_at(i)
            if event is None:
                return
            i += 1
            yield event

    async def aiter(self) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        i = 0
        while True:
            with self._cond:
                ready = i < len(self._events) or self._done
                if not ready:
                    wake = asyncio.Event()
                    self._waiters.append((loop, wake))
            if not ready:
                await wake.wait()
                continue
            with self._cond:
                event = self._event_at(i)
            if event is None:
                return
            i += 1
            yield event

    def _event_at(self, i: int) -> Event | None:
        """Event i, or None when the request is done and had no more (raising its error, if it failed).
        The caller holds the lock and has waited until i exists or the request is done."""
        if i < len(self._events):
            return self._events[i]
        self._raise_error()
        return None

    def result(self, timeout: float | None = None) -> tuple[str, str, Usage]:
        """(full text, finish_reason, usage), blocking until the request is done; raises the request's error."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"request {self.id} not done after {timeout}s")
            self._raise_error()
            return "".join(e.text for e in self._events), self._events[-1].finish_reason, self.usage

    def cancel(self) -> None:
        """Ask the engine to stop this request; its slot is freed at the next step (final reason "cancelled")."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def done(self) -> bool:
        return self._done

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    # ---- engine side ---------------------------------------------------------------------------------
    def _push(self, event: Event) -> None:
        with self._cond:
            if self._done:
                return
            self.usage.completion_tokens += len(event.token_ids)
            self._events.append(event)
            if event.finish_reason is not None:
                self._done = True
            self._notify()

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            if self._done:
                return
            self._error = error
            self._done = True
            self._notify()

    def _notify(self) -> None:  # holds self._cond
        self._cond.notify_all()
        waiters, self._waiters = self._waiters, []
        for loop, wake in waiters:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # that reader's loop is closed: nobody is waiting any more
                pass
