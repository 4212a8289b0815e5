"""Server-sent events that stop generating as soon as the client goes away.

Starlette's StreamingResponse notices a disconnect only when its next write fails (ASGI spec 2.4), and
leaves closing the generator to the garbage collector. Here a watcher task waits for `http.disconnect`
beside the writer and cancels it at once, even while the engine has produced nothing new, and
`on_close` runs in every case (finished, disconnected, failed) so the engine slot is always freed.
"""

from __future__ import annotations

import json
import logging
from typing import AsyncIterator, Callable

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger("lorakit.serve")


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {payload}\n\n".encode("utf-8")


DONE = sse("[DONE]")


class EventStreamResponse(Response):
    """An ASGI response writing `events` (already framed bytes) as text/event-stream."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]):  # Response.__init__ (a fixed body) is not wanted
        self.events = events
        self.background = None
        self.on_close = on_close
        self.status_code = 200

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]
        try:
            async with anyio.create_task_group() as group:
                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                async for chunk in self.events:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                group.cancel_scope.cancel()
        except OSError:
            log.info("client went away during a stream")
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self.events.aclose()
                finally:
                    self.on_close()
