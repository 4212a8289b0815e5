"""OpenAI-style error responses: `{"error": {"message", "type", "param", "code"}}` with the matching status.

Route code raises `APIError`; the handlers installed by `install_error_handlers` turn it, Starlette's own
HTTP errors and anything unexpected into that envelope. An unexpected exception is logged with its
traceback and answered with a generic 500: tracebacks, filesystem paths and keys never reach a client.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LorakitError
from ..infer.sampling import LimitExceeded

log = logging.getLogger("lorakit.serve")

# OpenAI's `type` values by status, for errors that don't name their own.
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
         413: "request_too_large", 429: "rate_limit_exceeded", 431: "invalid_request_error", 500: "internal_error",
         503: "service_unavailable"}


class APIError(LorakitError):
    """An error answered to the client as it is: the message must not hold paths, keys or tracebacks."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or TYPES.get(status, "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def model_not_found(model: str) -> APIError:
    shown = model if len(model) <= 100 else model[:100] + "..."
    return APIError(404, f"The model `{shown}` does not exist or is not loaded; GET /v1/models lists the served models.",
                    type="invalid_request_error", param="model", code="model_not_found")


def limit_error(exceeded: LimitExceeded, *, prompt_param: str, tokens_param: str) -> APIError:
    """The 400 for a request over a limit (infer.sampling.RequestLimits), whether the app's own check or the
    engine's found it; `prompt_param` and `tokens_param` are the request fields that hold the prompt and the
    token count."""
    if exceeded.kind == "empty_prompt":
        return APIError(400, "The prompt is empty.", param=prompt_param)
    if exceeded.kind == "prompt_too_long":
        return APIError(400, f"This server's maximum prompt length is {exceeded.limit} tokens; the prompt has "
                             f"{exceeded.value}.", param=prompt_param, code="context_length_exceeded")
    return APIError(400, f"{tokens_param} is {exceeded.value}; this server allows at most {exceeded.limit}.",
                    param=tokens_param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, err: APIError):
        return err.response()

    async def http_error(_: Request, err: StarletteHTTPException):
        message = err.detail if isinstance(err.detail, str) else "request failed"
        return APIError(err.status_code, message, headers=getattr(err, "headers", None)).response()

    async def validation_error(_: Request, err: RequestValidationError):
        first = (err.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return APIError(400, f"{param or 'request'}: {first.get('msg', 'invalid value')}", param=param).response()

    async def unexpected(request: Request, err: Exception):
        log.exception("internal error while serving %s %s", request.method, request.url.path)
        return APIError(500, "The server had an internal error while processing the request.").response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)
