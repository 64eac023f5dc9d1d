"""The ASGI guard in front of every route: header and body size, API key, draining, admission control,
in-flight accounting.

Pure ASGI (not BaseHTTPMiddleware) so that streaming responses and disconnect notifications pass straight
through. The body limit is enforced twice: on the declared Content-Length before reading anything, and on
the bytes actually received (chunked uploads have no Content-Length).

Admission control is here, before the body is read, because everything after it costs time under load: the
body is parsed and validated, the chat template rendered and the prompt tokenized on worker threads that
compete for the GIL with the engine thread's steps. When the refusal came from the engine's queue, after all
that, 160 requests at once against 20 slots saw refusals after 1.0-3.4 s; here it is one counter on the
event loop.
"""
from __future__ import annotations

import hmac
import json
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nemoh.server.errors import RETRY_AFTER_SECONDS, APIError, error_body
from nemoh.server.settings import ServerState

# Routes answered without the API key (load balancers probe them).
AUTH_ALLOWLIST = frozenset({"/health"})
# Routes still answered while draining, so orchestrators can watch the drain.
DRAIN_ALLOWLIST = frozenset({"/health", "/metrics"})
# Routes that put requests into the engine: admission control counts them.
GENERATION_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})


async def _send_error(state: ServerState, send: Send, status: int, message: str, code: str | None = None,
                      headers: dict[str, str] | None = None) -> None:
    state.metrics.request_failed(status)
    body = json.dumps(error_body(status, message, code=code)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


def check_api_key(expected: str, scope: Scope) -> bool:
    """Constant-time check of `Authorization: Bearer <key>` (or `x-api-key: <key>`)."""
    given = b""
    auth = _header(scope, b"authorization")
    if auth is not None:
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer":
            given = token.strip()
    else:
        given = (_header(scope, b"x-api-key") or b"").strip()
    return hmac.compare_digest(given, expected.encode())


class GuardMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = self.state.settings
        path = scope.get("path", "")
        # uvicorn/h11 bound headers that arrive in pieces; a block that arrived whole is measured here.
        header_bytes = sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))
        if header_bytes > settings.max_header_bytes:
            # Closed after the answer: a client that sends such headers gets no kept-alive connection to reuse.
            await _send_error(self.state, send, 431, "Request header fields too large.", code="headers_too_large",
                              headers={"Connection": "close"})
            return
        if settings.api_key and path not in AUTH_ALLOWLIST and not check_api_key(settings.api_key, scope):
            await _send_error(self.state, send, 401, "Invalid or missing API key.", code="invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"})
            return
        if self.state.draining and path not in DRAIN_ALLOWLIST:
            await _send_error(self.state, send, 503, "The server is shutting down.", code="service_unavailable",
                              headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
            return
        limit = settings.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _send_error(self.state, send, 400, "Invalid Content-Length header.")
                return
            if size > limit:
                await _send_error(self.state, send, 413, f"The request body is larger than {limit} bytes.",
                                  code="request_too_large")
                return
        counted = path in GENERATION_ROUTES and scope.get("method") == "POST"
        if counted and not self.state.admit():
            await _send_error(self.state, send, 429, "The server is at capacity; retry later.", code="queue_full",
                              headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the route, so the app's APIError handler answers it.
                    raise APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
            return message

        self.state.request_started()
        try:
            await self.app(scope, limited_receive, send)
        finally:
            self.state.request_finished()
            if counted:
                self.state.release()

