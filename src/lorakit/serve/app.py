"""The OpenAI-compatible routes over a `lorakit.infer.engine.Engine`.

`create_app(engine, tokenizer, ...)` builds the FastAPI app; it owns no model loading and no server loop, so
tests run it in-process and the CLI (`lorakit serve`) wraps it with uvicorn. The request's `model` picks the
adapter: the base model's name or a loaded adapter's.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..errors import AdapterError, ConfigError, LorakitError
from ..infer.constraints import GrammarError, json_schema_grammar, lark_grammar
from ..infer.engine import EngineClosed, InvalidRequest, QueueFull
from ..infer.sampling import RequestLimits, SamplingParams
from . import tools
from .adapters import CONFIG_FILE, NAME, WEIGHTS_FILE, ResolvedAdapter, check_name, resolve_adapter, scrub
from .errors import APIError, install_error_handlers, limit_error, log, model_not_found
from .guard import BodyTooLarge, GuardMiddleware
from .schemas import AdapterLoadRequest, ChatCompletionRequest, CompletionRequest, NamedToolChoice, parse_body
from .metrics import ServerMetrics, wants_prometheus
from .sse import DONE, EventStreamResponse, sse

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_LISTED_ADAPTERS = 1000  # entries of --adapter-dir that GET /v1/models looks at


@dataclass(frozen=True)
class ServeLimits(RequestLimits):
    """The engine's request limits (`lorakit serve` gives the engine the same), checked here too because an app
    may front an engine with other limits: the tighter refuses, and either is answered alike (limit_error)."""

    max_body_bytes: int = 1 << 20
    """Request bodies above this get 413 before they are read."""
    max_loras: int | None = None
    """Adapters resident at most (None: no limit). Loading one more evicts the least recently used adapter that was
    loaded on first use and has no request running or waiting; when every candidate is busy the request gets 429."""


class _State:
    def __init__(self, engine, tokenizer, base_name: str, adapter_dir: Path | None, limits: ServeLimits):
        self.engine = engine
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.adapter_dir = adapter_dir
        self.limits = limits
        self.tokenizer_lock = threading.Lock()  # fast tokenizers raise "Already borrowed" under concurrent calls
        self.adapter_lock: asyncio.Lock | None = None
        self.status_counts: Counter = Counter()
        self.counts: Counter = Counter()  # completions, chat_completions, streams, disconnects, in_flight, ...
        self.created = int(time.time())
        self.last_used: dict[str, float] = {}  # adapter -> time.monotonic() of its last request
        self.on_demand: set[str] = set()  # adapters loaded on first use: the only ones evicted
        self.pinned: Counter = Counter()  # adapters between lookup and submit: never evicted then
        self.evicting: set[str] = set()
        self.metrics = ServerMetrics()

    def adapter_for(self, model: str) -> str | None:
        """The resident adapter `model` names (None for the base), or 404."""
        if model == self.base_name:
            return None
        if model in self.engine.adapters():
            return model
        raise model_not_found(model)

    async def acquire(self, model: str) -> str | None:
        """The adapter a request names, loaded on first use when it is a directory inside --adapter-dir; pinned
        (never evicted) until release(), by when the engine holds the request and guards the adapter itself."""
        if model == self.base_name:
            return None
        if model not in self.engine.adapters() or model in self.evicting:
            if self.adapter_dir is None or not NAME.match(model):
                raise model_not_found(model)
            async with _adapter_lock(self):
                if model not in self.engine.adapters():
                    await self.load_on_first_use(model)
        self.pinned[model] += 1
        self.last_used[model] = time.monotonic()
        return model

    def release(self, adapter: str | None) -> None:
        if adapter is not None:
            self.pinned[adapter] -= 1
            if self.pinned[adapter] <= 0:
                del self.pinned[adapter]

    async def load_on_first_use(self, name: str) -> None:
        """Load adapter `name` from --adapter-dir (under the adapter lock), evicting to stay within max_loras."""
        assert self.adapter_dir is not None
        try:
            resolved = await run_in_threadpool(resolve_adapter, self.adapter_dir, name, None)
        except APIError as err:
            if err.status == 404:
                raise model_not_found(name) from None
            raise
        await self.load(resolved, param="model")
        self.on_demand.add(name)
        self.counts["adapters_loaded_on_first_use"] += 1
        log.info("loaded adapter %s on first use", name)

    async def load(self, resolved: ResolvedAdapter, *, param: str) -> None:
        """Load a resolved adapter into the engine (under the adapter lock), making room within max_loras first; a
        load error is a 400 naming the request field `param`, with no server path in it."""
        assert self.adapter_dir is not None
        await self.make_room()
        try:
            await run_in_threadpool(self.engine.load_adapter, resolved.name, str(resolved.directory))
        except (AdapterError, ConfigError, ValueError) as err:
            raise APIError(400, f"adapter {resolved.relative!r} could not be loaded: "
                                f"{scrub(str(err), resolved.directory, self.adapter_dir, resolved.relative)}",
                           param=param, code="invalid_adapter") from None

    async def make_room(self) -> None:
        """Evict least recently used first-use adapters until one more fits in max_loras (under the adapter lock);
        429 when every one that could go has requests running or waiting."""
        limit = self.limits.max_loras
        while limit is not None and len(self.engine.adapters()) >= limit:
            resident = set(self.engine.adapters())
            candidates = sorted((a for a in self.on_demand if a in resident and not self.pinned[a]),
                                key=lambda a: self.last_used.get(a, 0.0))
            for name in candidates:
                self.evicting.add(name)
                try:
                    await run_in_threadpool(self.engine.unload_adapter, name)
                except AdapterError:  # requests are running or waiting with it
                    continue
                finally:
                    self.evicting.discard(name)
                self.forget(name)
                self.counts["adapters_evicted"] += 1
                log.info("evicted adapter %s (least recently used)", name)
                break
            else:
                raise APIError(429, f"All {len(resident)} resident adapters are in use (--max-loras {limit}); retry "
                                    "shortly.", type="rate_limit_exceeded", code="adapters_busy",
                               headers={"Retry-After": "1"})

    def forget(self, name: str) -> None:
        self.on_demand.discard(name)
        self.last_used.pop(name, None)

    def available_adapters(self) -> list[str]:
        """Adapter directories directly inside --adapter-dir that requests may name (loaded on first use)."""
        if self.adapter_dir is None:
            return []
        try:
            entries = sorted(self.adapter_dir.iterdir())[:MAX_LISTED_ADAPTERS]
        except OSError:
            return []
        return [e.name for e in entries if NAME.match(e.name) and (e / WEIGHTS_FILE).is_file()
                and (e / CONFIG_FILE).is_file()]

    def token_text(self, token: int) -> str:
        """One token as text, for log-probs (special tokens shown; a piece of a UTF-8 character shows as U+FFFD)."""
        with self.tokenizer_lock:
            return self.tokenizer.decode([token])

    def encode_prompt(self, text: str) -> list[int]:
        with self.tokenizer_lock:
            return list(self.tokenizer(text)["input_ids"])

    def tool_syntax(self) -> str:
        """How this model writes tool calls (serve/tools.py); a 400 when its chat template has no tool syntax."""
        syntax = tools.syntax_of(getattr(self.tokenizer, "chat_template", None))
        if syntax is None:
            raise APIError(400, f"The model `{self.base_name}`'s chat template has no tool-call syntax this server "
                                "reads (Hermes <tool_call> or Llama 3.1 JSON); send the request without tools.",
                           param="tools", code="tools_unsupported")
        return syntax

    def encode_chat(self, messages: list[dict], tool_specs: list[dict] | None = None) -> list[int]:
        with self.tokenizer_lock:
            if not getattr(self.tokenizer, "chat_template", None):
                raise APIError(400, f"The model `{self.base_name}` has no chat template in its tokenizer; use "
                                    "/v1/completions with a plain prompt.", param="messages", code="no_chat_template")
            try:
                text = self.tokenizer.apply_chat_template(messages, tools=tool_specs or None, add_generation_prompt=True,
                                                          tokenize=False)
            except Exception as err:  # a template may raise on role orders it does not support
                raise APIError(400, f"messages: the chat template refused them: {err}", param="messages") from None
            # the template already wrote any BOS it wants
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def create_app(engine, tokenizer, *, base_name: str, adapter_dir: str | Path | None = None,
               api_key: str | None = None, limits: ServeLimits | None = None) -> FastAPI:
    """An OpenAI-compatible app serving `engine` (started by the caller) under the model id `base_name`."""
    limits = limits or ServeLimits()
    root = Path(adapter_dir).resolve() if adapter_dir is not None else None
    if root is not None and not root.is_dir():
        raise ConfigError(f"--adapter-dir {adapter_dir}: not a directory", where="lorakit serve")
    if limits.max_loras is not None and (limits.max_loras < 1 or len(engine.adapters()) >= limits.max_loras):
        raise ConfigError(f"--max-loras {limits.max_loras}: must be more than the {len(engine.adapters())} adapters "
                          "loaded at startup (they stay resident), so that one more can be loaded on first use",
                          where="lorakit serve")
    state = _State(engine, tokenizer, base_name, root, limits)
    app = FastAPI(title="lorakit", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lorakit = state
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=limits.max_body_bytes,
                       status_counts=state.status_counts)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request):
        if wants_prometheus(request.headers.get("accept", "")):
            body, content_type = state.metrics.exposition(_engine_metrics(engine))
            return Response(body, media_type=content_type)
        return {**_engine_metrics(engine), "server": dict(state.counts),
                "http_status": dict(sorted(state.status_counts.items()))}

    @app.get("/v1/models")
    async def list_models():
        resident = engine.adapters()
        waiting = [a for a in state.available_adapters() if a not in resident and a != base_name]
        return {"object": "list", "data": [_model_card(state, None)] + [_model_card(state, a) for a in resident]
                + [_model_card(state, a, loaded=False) for a in waiting]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id not in engine.adapters() and model_id != base_name and model_id in state.available_adapters():
            return _model_card(state, model_id, loaded=False)
        return _model_card(state, state.adapter_for(model_id))

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = parse_body(await read_body(request, limits.max_body_bytes), CompletionRequest)
        adapter = await state.acquire(req.model)
        try:
            ids = await run_in_threadpool(state.encode_prompt, req.prompt)
            state.counts["completions"] += 1
            return await _generate(state, request, req, ids, adapter, chat=False)
        finally:
            state.release(adapter)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = parse_body(await read_body(request, limits.max_body_bytes), ChatCompletionRequest)
        offered = [t.model_dump(exclude_none=True) for t in req.tools or []] if req.tool_choice != "none" else []
        reads = (state.tool_syntax(), [t["function"]["name"] for t in offered]) if offered else None
        grammar = _grammar(req, reads, offered)
        adapter = await state.acquire(req.model)
        try:
            ids = await run_in_threadpool(state.encode_chat, [m.for_template() for m in req.messages], offered)
            state.counts["chat_completions"] += 1
            return await _generate(state, request, req, ids, adapter, chat=True, tool_calls=reads, grammar=grammar)
        finally:
            state.release(adapter)

    @app.post("/v1/adapters")
    async def load_adapter(request: Request):
        root = _require_adapter_dir(state)
        req: AdapterLoadRequest = parse_body(await read_body(request, limits.max_body_bytes), AdapterLoadRequest)
        async with _adapter_lock(state):
            if req.name == base_name or req.name in engine.adapters():
                raise APIError(409, f"A model named `{req.name}` is already served; DELETE /v1/adapters/{req.name} "
                                    "first to replace it.", param="name", code="adapter_exists")
            resolved = await run_in_threadpool(resolve_adapter, root, req.name, req.path)
            await state.load(resolved, param="path")
        log.info("loaded adapter %s from %s", resolved.name, resolved.relative)
        return _model_card(state, resolved.name)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        _require_adapter_dir(state)
        check_name(name)
        async with _adapter_lock(state):
            if name not in engine.adapters():
                raise model_not_found(name)
            if state.pinned[name]:
                raise APIError(409, f"adapter {name!r} is in use by a request being admitted; unload it when it "
                                    "finishes", param="name", code="adapter_in_use")
            try:
                await run_in_threadpool(engine.unload_adapter, name)
            except AdapterError as err:  # still in use by running or waiting requests
                raise APIError(409, str(err), param="name", code="adapter_in_use") from None
            state.forget(name)
        log.info("unloaded adapter %s", name)
        return {"id": name, "object": "model", "deleted": True}

    return app


# ---- generation -----------------------------------------------------------------------------------------
def _grammar(req: ChatCompletionRequest, reads: tuple[str, list[str]] | None, offered: list[dict]) -> str | None:
    """The grammar a chat reply is held to (constrained decoding): a response_format's JSON schema, or the calls
    of a forced tool_choice in the model's tool-call syntax; None when the reply is free."""
    forced = reads is not None and (req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice))
    field = "tool_choice" if forced else "response_format"
    try:
        if forced:
            only = req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else None
            return lark_grammar(tools.call_grammar(reads[0], offered, only))
        schema = req.response_format.required_schema() if req.response_format is not None else None
        return json_schema_grammar(schema) if schema is not None else None
    except (GrammarError, ValueError) as err:  # the engine checks the grammar itself when the request is submitted
        raise APIError(400, f"{field}: {err}", param=field, code="invalid_value") from None


async def _generate(state: _State, request: Request, req, prompt_ids: list[int], adapter: str | None, *, chat: bool,
                    tool_calls: tuple[str, list[str]] | None = None, grammar: str | None = None):
    """`tool_calls`: (the model's tool-call syntax, the offered tools' names) when the reply may call them;
    `grammar`: what the reply is held to (_grammar)."""
    limits = state.limits
    max_tokens = req.max_tokens if req.max_tokens is not None else getattr(req, "max_completion_tokens", None)
    fields = dict(prompt_param="messages" if chat else "prompt",
                  tokens_param="max_tokens" if req.max_tokens is not None or not chat else "max_completion_tokens")
    if max_tokens is None:
        max_tokens = limits.max_tokens if chat else min(COMPLETION_DEFAULT_MAX_TOKENS, limits.max_tokens)
    exceeded = limits.check(len(prompt_ids), max_tokens)
    if exceeded:
        raise limit_error(exceeded[0], **fields)
    n = req.n or 1

    def params(i: int) -> SamplingParams:  # choice i of n: seeded requests get seed + i, so the n differ
        return SamplingParams(max_tokens=max_tokens, temperature=0.0 if req.temperature is None else req.temperature,
                              top_p=1.0 if req.top_p is None else req.top_p, stop=req.stop_list(),
                              seed=None if req.seed is None else req.seed + i,
                              presence_penalty=req.presence_penalty or 0.0,
                              frequency_penalty=req.frequency_penalty or 0.0,
                              repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                              logprobs=req.top_logprob_count(), grammar=grammar)

    handles = _submit(state, [(prompt_ids, adapter, params(i)) for i in range(n)], fields)
    state.counts["in_flight"] += 1
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            state.counts["in_flight"] -= 1
            for handle in handles:
                handle.cancel()  # a no-op for a finished request; frees the slot of an abandoned one

    reply = _Reply(chat=chat, model=req.model, tool_calls=tool_calls,
                   token_text=state.token_text if req.top_logprob_count() is not None else None)

    def observe(index: int, choice: _Choice) -> None:  # the prompt is counted once, with the first choice
        state.metrics.finished(req.model, handles[index].submitted, choice.times, choice.finish,
                               len(prompt_ids) if index == 0 else 0)

    if req.stream:
        state.counts["streams"] += 1
        return EventStreamResponse(_stream(handles, reply, len(prompt_ids), req.include_usage(), observe), release)
    try:
        choices, disconnected = await _collect(handles, request)
    finally:
        release()
    if disconnected:
        state.counts["disconnects"] += 1
        raise APIError(499, "client closed the request")  # nobody reads it; keeps the status count honest
    for index, choice in enumerate(choices):
        observe(index, choice)
    completion_tokens = sum(len(c.token_ids) for c in choices)
    return JSONResponse(reply.full(choices, _usage(len(prompt_ids), completion_tokens)))


def _submit(state: _State, requests: list, fields: dict[str, str]) -> list:
    """engine.submit_many (the n choices of one prompt share its prefill), its refusals as HTTP errors; `fields`
    name the request fields limit_error reports."""
    try:
        return state.engine.submit_many(requests)
    except QueueFull:
        raise APIError(429, "The server is busy (its request queue is full); retry shortly.",
                       type="rate_limit_exceeded", code="queue_full", headers={"Retry-After": "1"}) from None
    except EngineClosed:
        raise APIError(503, "The server is shutting down.", code="engine_closed") from None
    except AdapterError:
        raise model_not_found(requests[0][1] or state.base_name) from None  # unloaded between lookup and submit
    except (ConfigError, ValueError) as err:
        if isinstance(err, InvalidRequest) and err.exceeded:  # the engine's limits are tighter than this app's
            raise limit_error(err.exceeded[0], **fields) from None
        raise APIError(400, str(err), code="invalid_value") from None


@dataclass
class _Choice:
    """One choice's whole output."""

    text: str = ""
    finish: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # when each token was sampled

    def add(self, event) -> None:
        self.times += [event.time] * len(event.token_ids)
        self.text += event.text
        self.finish = event.finish_reason or self.finish
        self.token_ids += event.token_ids
        self.logprobs += event.model_logprobs
        self.top_logprobs += event.top_logprobs


async def _collect(handles: list, request: Request) -> tuple[list[_Choice], bool]:
    """Run a non-streaming request's choices to their end, or cancel them if the client disconnects first."""
    choices = [_Choice() for _ in handles]
    disconnected = False
    async with anyio.create_task_group() as group:
        async def watch() -> None:
            nonlocal disconnected
            while (await request.receive())["type"] != "http.disconnect":
                pass
            disconnected = True
            for handle in handles:
                handle.cancel()
            group.cancel_scope.cancel()

        group.start_soon(watch)
        for choice, handle in zip(choices, handles):  # the engine runs them together; events are kept
            async for event in handle.aiter():
                choice.add(event)
        group.cancel_scope.cancel()
    return choices, disconnected


async def _events(handles: list) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, event) from every handle, as they come."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, handle) -> None:
        try:
            async for event in handle.aiter():
                await queue.put((index, event, None))
        except Exception as err:  # noqa: BLE001 - handed to the reader, which answers it in the stream
            await queue.put((index, None, err))
        await queue.put((index, None, None))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        running = len(tasks)
        while running:
            index, event, error = await queue.get()
            if error is not None:
                raise error
            if event is None:
                running -= 1
                continue
            yield index, event
    finally:
        for task in tasks:
            task.cancel()


async def _stream(handles: list, reply: "_Reply", prompt_tokens: int, include_usage: bool,
                  observe: Callable[[int, "_Choice"], None]) -> AsyncIterator[bytes]:
    tokens = 0
    seen = [_Choice() for _ in handles]  # for the metrics
    try:
        if reply.chat:
            for i in range(len(handles)):
                yield sse(reply.chunk(i, delta={"role": "assistant", "content": ""}))
        calls = [tools.ToolStream(*reply.tool_calls) for _ in handles] if reply.tool_calls else None
        async for i, event in _events(handles):
            tokens += len(event.token_ids)
            seen[i].add(event)
            text = calls[i].feed(event.text) if calls else event.text
            scores = reply.logprobs(event.token_ids, event.model_logprobs, event.top_logprobs, chunk=True)
            if text or scores:
                yield sse(reply.chunk(i, text=text, logprobs=scores))
            if event.finish_reason:
                finish = event.finish_reason
                if calls:
                    rest, made = calls[i].finish()
                    if rest:
                        yield sse(reply.chunk(i, text=rest))
                    if made:  # each call whole, in one delta: index, id, type, name and all of its arguments
                        yield sse(reply.chunk(i, delta={"tool_calls": [{"index": k, **c} for k, c in enumerate(made)]}))
                        finish = "tool_calls" if finish == "stop" else finish
                yield sse(reply.chunk(i, finish=finish))
                seen[i].finish = finish
                observe(i, seen[i])
        if include_usage:
            yield sse(reply.usage_chunk(_usage(prompt_tokens, tokens)))
    except LorakitError as err:
        log.warning("stream failed: %s", err)
        yield sse(APIError(500, "generation failed").body())
    except Exception:
        log.exception("stream failed")
        yield sse(APIError(500, "The server had an internal error while processing the request.").body())
    yield DONE


class _Reply:
    """OpenAI's response and chunk shapes for one request."""

    def __init__(self, *, chat: bool, model: str, tool_calls: tuple[str, list[str]] | None = None,
                 token_text: Callable[[int], str] | None = None):
        self.chat = chat
        self.model = model
        self.tool_calls = tool_calls
        self.token_text = token_text  # set when the request asked for log-probs
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, choices: list[_Choice], usage: dict) -> dict:
        out = []
        for index, c in enumerate(choices):
            scores = self.logprobs(c.token_ids, c.logprobs, c.top_logprobs)
            if not self.chat:
                out.append({"index": index, "text": c.text, "logprobs": scores, "finish_reason": c.finish})
                continue
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            finish = c.finish
            parsed = tools.parse(c.text, *self.tool_calls) if self.tool_calls else None
            if parsed and parsed.tool_calls:
                message = {"role": "assistant", "content": parsed.content, "tool_calls": parsed.tool_calls}
                finish = "tool_calls" if finish == "stop" else finish
            out.append({"index": index, "message": message, "logprobs": scores, "finish_reason": finish})
        return {**self._head(self.object), "choices": out, "usage": usage}

    def chunk(self, index: int, *, text: str | None = None, delta: dict | None = None, finish: str | None = None,
              logprobs: dict | None = None) -> dict:
        if self.chat:
            delta = delta if delta is not None else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage}

    def logprobs(self, token_ids: list[int], logprobs: list[float], top: list[list[tuple[int, float]]], *,
                 chunk: bool = False) -> dict | None:
        """OpenAI's `logprobs` of these tokens: chat's {"content": [{token, logprob, bytes, top_logprobs}]}, or
        the completions API's {tokens, token_logprobs, top_logprobs, text_offset}; None when not asked for."""
        if self.token_text is None or (chunk and not logprobs):
            return None
        texts = [self.token_text(t) for t in token_ids]
        if self.chat:
            def entry(text: str, logprob: float) -> dict:
                return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
            return {"content": [{**entry(text, lp), "top_logprobs": [entry(self.token_text(t), v) for t, v in alts]}
                                for text, lp, alts in zip(texts, logprobs, top)]}
        offsets, at = [], 0
        for text in texts:
            offsets.append(at)
            at += len(text)
        return {"tokens": texts, "token_logprobs": logprobs, "text_offset": offsets,
                "top_logprobs": [{self.token_text(t): v for t, v in alts} for alts in top]}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---- helpers --------------------------------------------------------------------------------------------
async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) once more than `limit` bytes arrive: Content-Length may be absent (chunked)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _model_card(state: _State, adapter: str | None, *, loaded: bool = True) -> dict[str, Any]:
    """OpenAI's model object; an adapter's names its base as `parent`, and `loaded` says whether it is resident
    (one in --adapter-dir that is not is loaded by the first request naming it)."""
    card: dict[str, Any] = {"id": adapter or state.base_name, "object": "model", "created": state.created,
                            "owned_by": "lorakit"}
    if adapter:
        card.update(parent=state.base_name, loaded=loaded)
    return card


def _engine_metrics(engine) -> dict:
    try:
        return dict(engine.metrics())
    except Exception:
        log.exception("engine.metrics() failed")
        return {}


def _require_adapter_dir(state: _State) -> Path:
    if state.adapter_dir is None:
        raise APIError(403, "Adapters cannot be loaded or unloaded at runtime on this server: start it with "
                            "--adapter-dir DIR to allow loading adapters from inside DIR.", code="adapters_disabled")
    return state.adapter_dir


def _adapter_lock(state: _State) -> asyncio.Lock:
    if state.adapter_lock is None:
        state.adapter_lock = asyncio.Lock()
    return state.adapter_lock
