"""The outermost ASGI layer: request-head and body-size caps, API-key check and HTTP status counts, for every route.

It decides on `scope["path"]` exactly as routed, and exempts only `GET /health` (vLLM's prefix-based checks
were bypassed via `/v2`, `/inference` and `root_path`; a Host header fooled `URL(scope).path`). Keys are
compared as SHA-256 digests with `hmac.compare_digest`, so neither content nor length leaks through timing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import Counter

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError

OPEN_PATHS = {("GET", "/health"), ("HEAD", "/health")}
# The request line and headers together at most (vLLM CVE-2025-48956: unbounded headers). h11's
# max_incomplete_event_size (uvicorn_config) only bounds a head that is still arriving: one that comes whole in
# a single read is parsed whatever its size, so the complete head is measured here too.
MAX_HEADER_BYTES = 16 * 1024


class BodyTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"The request body is larger than this server's limit of {limit} bytes.",
                         code="request_too_large")


class HeadersTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(431, f"The request line and headers are larger than this server's limit of {limit} bytes.",
                         code="request_header_fields_too_large")


class GuardMiddleware:
    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int, status_counts: Counter,
                 max_header_bytes: int = MAX_HEADER_BYTES):
        self.app = app
        self.key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.status_counts = status_counts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.status_counts[str(message["status"])] += 1
            await send(message)

        error = self._refusal(scope)
        if error is not None:
            await _send_error(error, counting_send)
            return
        await self.app(scope, receive, counting_send)

    def _refusal(self, scope: Scope) -> APIError | None:
        if _head_size(scope) > self.max_header_bytes:
            return HeadersTooLarge(self.max_header_bytes)
        headers = {}
        for key, value in scope.get("headers", ()):
            headers.setdefault(key.lower(), value)
        if self.key_digest is not None and (scope["method"], scope["path"]) not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            ok = scheme.lower() == b"bearer" and hmac.compare_digest(hashlib.sha256(token.strip()).digest(),
                                                                     self.key_digest)
            if not ok:
                return APIError(401, "Missing or incorrect API key: send it as 'Authorization: Bearer KEY'.",
                                type="invalid_request_error", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return APIError(400, "Invalid Content-Length header.")
            if int(length) > self.max_body_bytes:
                return BodyTooLarge(self.max_body_bytes)
        return None


def _head_size(scope: Scope) -> int:
    """About the bytes of the request head as sent: request line, then `name: value\r\n` per header."""
    line = len(scope["method"]) + len(scope.get("raw_path") or scope["path"].encode()) + \
        len(scope.get("query_string", b"")) + 16
    return line + sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))


async def _send_error(error: APIError, send: Send) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
