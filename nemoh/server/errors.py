"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status.

Every client mistake becomes an `APIError` with a 4xx status somewhere before it reaches the engine; the
catch-all handler turns anything else into a 500 and logs it, because only a server bug gets that far.
"""
from __future__ import annotations

import json
import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("nemoh.server")

# OpenAI's `type` vocabulary for the statuses this server returns.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable_error",
}

RETRY_AFTER_SECONDS = 1


class APIError(Exception):
    """An error that is answered to the client as is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
            "param": param,
            "code": code,
        }
    }


def error_bytes(status: int, message: str, *, code: str | None = None) -> bytes:
    return json.dumps(error_body(status, message, code=code)).encode()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def queue_full() -> APIError:
    return APIError(
        429,
        "The server's waiting queue is full; retry later.",
        code="queue_full",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def unavailable(message: str = "The server is shutting down.") -> APIError:
    return APIError(503, message, code="service_unavailable", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def validation_message(exc: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    """The first validation error as (message, param), e.g. ("max_tokens: Input should be ...", "max_tokens")."""
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value"))
    extra = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return (f"{param}: {msg}{extra}" if param else f"{msg}{extra}"), param


def _count(request: Request, status: int) -> None:
    state = getattr(request.app.state, "nemoh", None)
    if state is not None:
        state.metrics.request_failed(status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        _count(request, exc.status)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        _count(request, 400)
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        message = exc.detail if isinstance(exc.detail, str) else phrase
        _count(request, status)
        return APIError(status, message, headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _server_bug(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error serving %s %s", request.method, request.url.path)
        _count(request, 500)
        return APIError(500, "Internal server error.", code="internal_error").response()
