"""Who may use the dashboard. It starts processes and reads files, so:

- bound to a loopback address it answers only requests whose Host is that address (a web page cannot reach it by
  DNS rebinding); bound to anything else it needs a token (`--token`), checked on every route but the page's own
  static files, as the header `Authorization: Bearer TOKEN` or, for the browser's EventSource, `?token=TOKEN`;
- a request that changes something must be JSON (a cross-site form cannot send that without a CORS preflight,
  which this app never allows).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK = ("127.0.0.1", "localhost", "::1")
OPEN = ("/", "/favicon.ico")
OPEN_PREFIX = "/static/"
CHANGES = ("POST", "PUT", "PATCH", "DELETE")


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class AccessGuard:
    def __init__(self, app: ASGIApp, *, token: str | None, hosts: set[str] | None):
        """`hosts`: the Host header values accepted (None: any, when a token guards the app)."""
        self.app, self.token, self.hosts = app, _digest(token) if token else None, hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if self.hosts is not None and headers.get("host", "") not in self.hosts:
            await _refuse(send, 403, f"Host {headers.get('host', '')!r} is not this dashboard's address")
            return
        if self.token is not None and path not in OPEN and not path.startswith(OPEN_PREFIX):
            given = headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not given:
                given = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token") or [""])[0]
            if not hmac.compare_digest(_digest(given), self.token):
                await _refuse(send, 401, "a token is required: open the address `lorakit ui` printed (it carries "
                                         "?token=...), or send Authorization: Bearer TOKEN")
                return
        if method in CHANGES and not headers.get("content-type", "").startswith("application/json"):
            await _refuse(send, 415, "send the request body as JSON (Content-Type: application/json)")
            return
        await self.app(scope, receive, send)


async def _refuse(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": {"message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def loopback_hosts(host: str, port: int) -> set[str]:
    """The Host values a browser sends to a loopback-bound dashboard."""
    names = {"127.0.0.1", "localhost", "[::1]"} if host in LOOPBACK else {host}
    return {f"{name}:{port}" for name in names} | ({f"{name}" for name in names} if port == 80 else set())
