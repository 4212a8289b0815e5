"""A continuous-batching generation engine with one LoRA adapter (or none) per request.

One background thread owns the model. Between decode steps it runs adapter loads/unloads, drops finished
or cancelled rows, and admits waiting requests: their prompts are prefilled together (left-padded) and
their caches joined to the running batch (see kv.py). Each decode step then runs every running row once,
with `adapter_names` telling the LoRA layers which adapter each row uses.

Greedy output does not depend on the batch: pad columns are masked and zero, position ids count real tokens.
"""

from __future__ import annotations

import inspect
import itertools
import threading
import uuid
import warnings
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import DynamicCache

from ..errors import AdapterError, LorakitError
from ..lora.model import LoraModel
from ..lora.routing import BASE
from .handle import Event, RequestHandle, Usage
from .kv import KVBatch, select_rows, zero_padding
from .constraints import Constraint, GrammarError, GrammarTokenizer
from .sampling import (LimitExceeded, RequestLimits, SamplingParams, apply_penalties, choose_token, make_generator,
                       model_logprobs)
from .text import TextStream

__all__ = ["Engine", "EngineClosed", "Event", "InvalidRequest", "QueueFull", "RequestHandle", "Usage"]


class QueueFull(LorakitError):
    """submit() found max_queue requests already waiting; retry later (HTTP 429/503)."""


class EngineClosed(LorakitError):
    """The engine was closed: no new requests or adapter changes."""


class InvalidRequest(LorakitError, ValueError):
    """A request's prompt or sampling params are unusable; the message lists every problem (HTTP 400).
    `exceeded` holds the limits it is over, for callers that answer those in their own words (serve/)."""

    def __init__(self, message: str, exceeded: Sequence[LimitExceeded] = ()):
        super().__init__(message)
        self.exceeded = list(exceeded)


@dataclass
class _Request:
    handle: RequestHandle
    prompt: list[int]
    adapter: str  # BASE for the base model
    params: SamplingParams
    generator: torch.Generator | None
    stream: TextStream
    completion: list[int]  # sampled tokens so far (EOS included)
    pending: int = -1  # the last sampled token: not yet in the cache, the next step's input
    constraint: Constraint | None = None  # the grammar its output follows


class Engine:
    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, max_queue: int = 64,
                 max_prompt_tokens: int = 2048, max_new_tokens: int = 512, device=None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.limits = RequestLimits(max_prompt_tokens=max_prompt_tokens, max_tokens=max_new_tokens)
        self.is_lora = isinstance(model, LoraModel)
        hf_model = model.model if self.is_lora else model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        model.eval()
        # transformers 5 renamed past_key_values to cache (the old name warns); use whichever forward takes.
        params = inspect.signature(hf_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params
        self.eos_ids = eos_ids(tokenizer, hf_model)
        self.pad_id = _pad_id(tokenizer)
        embeddings = hf_model.get_input_embeddings()
        self.vocab_size = getattr(embeddings, "num_embeddings", None)
        self._grammar_tokenizer = GrammarTokenizer(tokenizer, max(self.vocab_size or 0, len(tokenizer)))

        self._cond = threading.Condition()  # guards everything below; the engine thread waits on it
        self._waiting: deque[_Request] = deque()
        self._commands: list[tuple[Callable[[], None], Future]] = []
        self._running: list[_Request] = []  # engine thread only; row i of self._batch
        self._batch = KVBatch(self.device)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._ids = itertools.count()
        self._stats = Counter()
        self._per_adapter: Counter[str] = Counter()

    # ---- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed; create a new one")
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the engine thread; requests not finished end with finish_reason "cancelled"."""
        with self._cond:
            if self._closed:
                return
            self._closed = self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._cond:
            leftovers = list(self._waiting) + self._running
            self._waiting.clear()
            self._running = []
            commands, self._commands = self._commands, []
        self._batch = KVBatch(self.device)
        for req in leftovers:
            req.handle._push(Event("", [], "cancelled"))
        for _, future in commands:
            future.set_exception(EngineClosed("the engine was closed before this adapter change ran"))

    def __enter__(self) -> "Engine":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- requests ------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams) -> RequestHandle:
        """Queue a request; validation errors are raised here, before anything is queued."""
        return self.submit_many([(prompt_ids, adapter, params)])[0]

    def submit_many(self, requests: Sequence[tuple[list[int], str | None, SamplingParams]]) -> list[RequestHandle]:
        """Queue several (prompt_ids, adapter, params) requests at once, all or none. Queued together, they are
        admitted together as far as the batch has room, and requests with the same prompt and adapter among
        them are prefilled once (n samples of one prompt: GRPO's groups)."""
        checked = [(*self._checked(list(prompt_ids), params), BASE if adapter is None else adapter, params)
                   for prompt_ids, adapter, params in requests]
        handles = []
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed; no new requests")
            for name in {name for _, _, name, _ in checked}:
                if name != BASE and name not in self.adapters():
                    raise AdapterError(f"unknown adapter {name!r}; loaded adapters: {', '.join(self.adapters()) or '(none)'}")
            if len(self._waiting) + len(checked) > self.max_queue:
                more = f" and these {len(checked)} do not fit" if len(checked) > 1 else ""
                raise QueueFull(f"{len(self._waiting)} requests are already waiting{more} (max_queue={self.max_queue}); "
                                "retry later")
            for prompt, constraint, name, params in checked:
                handle = RequestHandle(f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}", len(prompt))
                self._waiting.append(_Request(handle, prompt, name, params, make_generator(params, self.device),
                                              TextStream(self.tokenizer, list(params.stop)), [],
                                              constraint=constraint))
                self._stats["requests_total"] += 1
                self._per_adapter[name] += 1
                handles.append(handle)
            self._cond.notify_all()
        return handles

    def _checked(self, prompt: list[int], params: SamplingParams) -> tuple[list[int], Constraint | None]:
        """(the prompt, the grammar's matcher when the request has one), or InvalidRequest listing every problem."""
        exceeded = self.limits.check(len(prompt), params.max_tokens)
        problems = [str(e) for e in exceeded] + params.problems()
        constraint = None
        if isinstance(params.grammar, str) and params.grammar:
            try:  # the matcher compiles the grammar: built once, here, and kept for the request
                constraint = Constraint(self._grammar_tokenizer, params.grammar)
            except GrammarError as err:
                problems.append(f"grammar: {err}")
        if prompt and len(prompt) <= self.limits.max_prompt_tokens and not all(
                isinstance(t, int) and 0 <= t < (self.vocab_size or float("inf")) for t in prompt):
            problems.insert(0, f"prompt_ids must be integers in [0, {self.vocab_size}) (the model's vocabulary)")
        if problems:
            raise InvalidRequest("invalid request: " + "; ".join(problems), exceeded)
        return prompt, constraint

    # ---- adapters ------------------------------------------------------------------------------------
    def adapters(self) -> list[str]:
        return list(self.model.adapter_configs) if self.is_lora else []

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load an adapter directory as `name`, between decode steps; blocks until done, re-raises its error."""
        if not self.is_lora:
            raise AdapterError("this engine serves a plain model (not a LoraModel), so it cannot load adapters; "
                               "wrap the model with lorakit.wrap or lorakit.load_adapter first")

        def load() -> None:
            self.model.load_adapter(path, name)
            self.model.eval()  # new LoRA modules start in training mode (dropout on)

        self._run_command(load)

    def unload_adapter(self, name: str) -> None:
        """Delete adapter `name`. Refused (AdapterError naming them) while requests running or waiting use it."""
        if not self.is_lora:
            raise AdapterError("this engine serves a plain model (not a LoraModel): it has no adapters to unload")

        def unload() -> None:
            if name not in self.model.adapter_configs:
                raise AdapterError(f"unknown adapter {name!r}; loaded adapters: {', '.join(self.adapters()) or '(none)'}")
            with self._cond:
                users = [r.handle.id for r in [*self._running, *self._waiting] if r.adapter == name and not r.handle.done]
            if users:
                raise AdapterError(f"adapter {name!r} is in use by requests {users}; unload it when they finish "
                                   "(or cancel them)")
            with warnings.catch_warnings():
                # "another adapter is active now" does not concern the engine: every row names its adapter.
                warnings.filterwarnings("ignore", message="deleted the active adapter")
                self.model.delete_adapter(name)

        self._run_command(unload)

    def _run_command(self, fn: Callable[[], None]) -> None:
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed")
            if self._thread is None:  # no engine thread yet: nothing else touches the model
                fn()
                return
            self._commands.append((fn, future))
            self._cond.notify_all()
        future.result()

    # ---- metrics -------------------------------------------------------------------------------------
    def metrics(self) -> dict:
        with self._cond:
            return {
                "requests_total": self._stats["requests_total"],
                "requests_running": sum(not r.handle.done for r in self._running),
                "queue_length": len(self._waiting),
                "requests_finished": self._stats["requests_finished"],
                "requests_failed": self._stats["requests_failed"],
                "requests_cancelled": self._stats["requests_cancelled"],
                "tokens_generated": self._stats["tokens_generated"],
                "per_adapter": dict(self._per_adapter),
            }

    # ---- the engine thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._stopping or self._commands or self._waiting or self._running)
                    if self._stopping:
                        return
                    commands, self._commands = self._commands, []
                for fn, future in commands:
                    try:
                        fn()
                    except BaseException as e:  # the caller re-raises it; the engine goes on
                        future.set_exception(e)
                    else:
                        future.set_result(None)
                try:
                    self._step()
                except BaseException as e:  # a bug here must not end the thread: fail the rows it touched
                    self._fail_rows(list(range(len(self._running))), e)

    def _step(self) -> None:
        self._drop_cancelled()
        new = self._admit()
        if new:
            try:
                self._prefill(new)
            except Exception as e:
                for req in new:
                    self._fail(req, e)
        if self._running:
            try:
                self._decode()
            except Exception as e:
                self._fail_rows(list(range(len(self._running))), e)

    def _drop_cancelled(self) -> None:
        keep = [i for i, r in enumerate(self._running) if not r.handle.cancelled]
        if len(keep) == len(self._running):
            return
        for i, req in enumerate(self._running):
            if req.handle.cancelled:
                self._finish(req, Event("", [], "cancelled"))
        self._keep_rows(keep)

    def _admit(self) -> list[_Request]:
        new = []
        with self._cond:
            while self._waiting and len(self._running) + len(new) < self.max_batch_size:
                req = self._waiting.popleft()
                if req.handle.cancelled:
                    self._finish(req, Event("", [], "cancelled"))
                else:
                    new.append(req)
        return new

    def _prefill(self, new: list[_Request]) -> None:
        """Run the new prompts together (left-padded), sample their first tokens, join the rest to the batch.
        Requests with the same prompt and adapter share one forward row; its cache is copied to each of them."""
        rows: dict[tuple[tuple[int, ...], str], int] = {}  # (prompt, adapter) -> its forward row
        unique: list[_Request] = []  # the request that stands for each forward row
        row_of = []  # each new request's forward row
        for req in new:
            key = (tuple(req.prompt), req.adapter)
            if key not in rows:
                rows[key] = len(unique)
                unique.append(req)
            row_of.append(rows[key])
        longest = max(len(r.prompt) for r in unique)
        ids = torch.full((len(unique), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(unique), longest), dtype=torch.long)
        for i, req in enumerate(unique):
            ids[i, longest - len(req.prompt):] = torch.tensor(req.prompt)
            mask[i, longest - len(req.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (unique, longest): real tokens before each position
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache, [r.adapter for r in unique])  # (unique, vocab)
        zero_padding(cache, mask)
        lengths = mask.sum(-1)  # (unique,)
        keep = [i for i, req in enumerate(new) if not self._sample(req, logits[row_of[i]])]
        if keep:
            index = torch.tensor([row_of[i] for i in keep], dtype=torch.long, device=self.device)
            select_rows(cache, index)
            with self._cond:
                self._batch.join(cache, lengths.index_select(0, index))
                self._running += [new[i] for i in keep]

    def _decode(self) -> None:
        """One step for every running row: feed each row's pending token, sample its next one."""
        ids = torch.tensor([[r.pending] for r in self._running], dtype=torch.long, device=self.device)  # (batch, 1)
        mask = self._batch.attention_mask(1)  # (batch, seq + 1)
        positions = self._batch.lengths[:, None]  # (batch, 1): the pending token follows lengths[i] real ones
        logits = self._forward(ids, mask, positions, self._batch.cache, [r.adapter for r in self._running])
        self._batch.advance(1)
        keep = []
        for i, req in enumerate(self._running):
            try:
                finished = self._sample(req, logits[i])
            except Exception as e:  # e.g. a tokenizer error: this row fails, the others go on
                self._fail(req, e)
                finished = True
            if not finished:
                keep.append(i)
        if len(keep) < len(self._running):
            self._keep_rows(keep)

    def _forward(self, ids, mask, positions, cache, adapters: list[str]) -> torch.Tensor:
        """Last-position logits (batch, vocab) in float32; `cache` is extended in place."""
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        kwargs[self._cache_kw] = cache
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if self.is_lora:
            kwargs["adapter_names"] = adapters
        return self.model(**kwargs).logits[:, -1, :].float()

    def _sample(self, req: _Request, logits: torch.Tensor) -> bool:
        """Choose req's next token from logits (vocab,), emit its event; True when req is finished."""
        params = req.params
        scored = apply_penalties(logits, req.prompt, req.completion, params) if params.penalised() else logits
        if req.constraint is not None:
            scored = req.constraint.mask(scored)
        token, logprob = choose_token(scored, params, req.generator)
        if req.constraint is not None:
            req.constraint.advance(token)
        scores = {}
        if params.logprobs is not None:
            own, top = model_logprobs(logits, token, params.logprobs)
            scores = dict(model_logprobs=[own], top_logprobs=[top])
        req.completion.append(token)
        req.pending = token
        with self._cond:
            self._stats["tokens_generated"] += 1
        if token in self.eos_ids:
            self._finish(req, Event(req.stream.flush(), [token], "stop", [logprob], **scores))
            return True
        text, stopped = req.stream.add(req.completion)
        if stopped or (req.constraint is not None and req.constraint.complete):
            self._finish(req, Event(text + ("" if stopped else req.stream.flush()), [token], "stop", [logprob],
                                    **scores))
            return True
        if len(req.completion) >= params.max_tokens:
            self._finish(req, Event(text + req.stream.flush(), [token], "length", [logprob], **scores))
            return True
        req.handle._push(Event(text, [token], None, [logprob], **scores))
        return False

    def _finish(self, req: _Request, event: Event) -> None:
        req.handle._push(event)
        key = "requests_cancelled" if event.finish_reason == "cancelled" else "requests_finished"
        self._stats[key] += 1

    def _fail(self, req: _Request, error: BaseException) -> None:
        req.handle._fail(error)
        self._stats["requests_failed"] += 1

    def _fail_rows(self, rows: list[int], error: BaseException) -> None:
        """Fail these running rows and drop them (a failed forward may have left the cache half-extended)."""
        for i in rows:
            self._fail(self._running[i], error)
        failed = set(rows)
        self._keep_rows([i for i in range(len(self._running)) if i not in failed])

    def _keep_rows(self, keep: list[int]) -> None:
        with self._cond:
            self._batch.keep(keep)
            self._running = [self._running[i] for i in keep]


def eos_ids(tokenizer, hf_model) -> set[int]:
    """EOS ids from the tokenizer and the model's generation config (chat models often add e.g. <|eot_id|>)."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def _pad_id(tokenizer) -> int:
    """Any valid id works for padding (it is masked); prefer the tokenizer's pad, then EOS, then 0."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            return value
    return 0
