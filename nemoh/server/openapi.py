"""The OpenAPI document of the server: request bodies, every status a route answers, and the API key.

The routes read their bodies themselves (`parse_body`: strict JSON, OpenAI's 400 shape), so FastAPI cannot
see the request models; they are added here, from the same pydantic models that validate the requests. The
document is what clients, `/docs` and schema fuzzers (schemathesis) read, so it lists each route's statuses
with their bodies: the success shape, OpenAI's `{"error": {...}}` for the errors, and `Retry-After` on 429
and 503.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from nemoh.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)

_REF = "#/components/schemas/{model}"
SECURITY_SCHEME = "bearerAuth"

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}
HEALTH_SCHEMA: dict[str, Any] = {"type": "object", "required": ["status"],
                                 "properties": {"status": {"enum": ["ok", "draining", "dead"]}}}
_RETRY_AFTER = {"Retry-After": {"required": True, "description": "seconds to wait before retrying",
                                "schema": {"type": "string", "pattern": "^[0-9]+$"}}}

# What each status means, on any route that can answer it.
_ERRORS = {
    400: "invalid request (body, types, bounds, context length)",
    401: "missing or wrong API key",
    404: "unknown model",
    413: "request body too large",
    415: "Content-Type is not application/json",
    429: "the server is at capacity",
    431: "request headers too large",
    503: "the server is shutting down or its engine has stopped",
}
_ALWAYS = (401, 413, 431, 503)   # the guard answers these on any route (503: while draining)
_BODY = (400, 415)               # routes that read a JSON body
_GENERATION = (404, 429)


# (path, method) -> (request model, success content, error statuses)
def _routes() -> dict[tuple[str, str], tuple[type[BaseModel] | None, dict[str, Any], tuple[int, ...]]]:
    def json_of(model: type[BaseModel]) -> dict[str, Any]:
        return {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}

    # Server-sent events: each event's `data` is one JSON chunk (the JSON shape's streaming form), the last
    # one "[DONE]"; schema checkers validate each event as {"data": ..., "event": ...}.
    sse = {"text/event-stream": {"schema": {"type": "object", "required": ["data"],
                                            "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}}
    return {
        ("/v1/chat/completions", "post"): (ChatCompletionRequest, {**json_of(ChatCompletionResponse), **sse},
                                           _ALWAYS + _BODY + _GENERATION),
        ("/v1/completions", "post"): (CompletionRequest, {**json_of(CompletionResponse), **sse},
                                      _ALWAYS + _BODY + _GENERATION),
        ("/v1/models", "get"): (None, json_of(ModelList), _ALWAYS),
        ("/tokenize", "post"): (TokenizeRequest, json_of(TokenizeResponse), _ALWAYS + _BODY + (404,)),
        ("/detokenize", "post"): (DetokenizeRequest, json_of(DetokenizeResponse), _ALWAYS + _BODY + (404,)),
        ("/metrics", "get"): (None, {"text/plain": {"schema": {"type": "string"}}}, (401, 413, 431)),
        ("/health", "get"): (None, {"application/json": {"schema": HEALTH_SCHEMA}}, (413, 431)),
    }


def _responses(success: dict[str, Any], errors: tuple[int, ...], path: str) -> dict[str, Any]:
    out: dict[str, Any] = {"200": {"description": "success", "content": success}}
    for status in sorted(errors):
        response: dict[str, Any] = {"description": _ERRORS[status],
                                    "content": {"application/json": {"schema": ERROR_SCHEMA}}}
        if status in (429, 503):
            response["headers"] = _RETRY_AFTER
        out[str(status)] = response
    if path == "/health":  # not an error shape: load balancers read the status
        out["503"] = {"description": "draining or the engine has stopped",
                      "content": {"application/json": {"schema": HEALTH_SCHEMA}}}
    return out


def openapi_document(app: FastAPI, with_api_key: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `app` (built by `build_app`)."""
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    routes = _routes()
    models = [(m, "validation") for m, _, _ in routes.values() if m is not None]
    models += [(m, "serialization") for m in (ChatCompletionResponse, CompletionResponse, ModelList,
                                              TokenizeResponse, DetokenizeResponse)]
    _, defs = models_json_schema(models, ref_template=_REF)
    doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
    for (path, method), (model, success, errors) in routes.items():
        operation = doc["paths"][path][method]
        if model is not None:
            operation["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}}
        operation["responses"] = _responses(success, errors if with_api_key else
                                            tuple(s for s in errors if s != 401), path)
        if with_api_key and path == "/health":
            operation["security"] = []
    if with_api_key:
        doc["components"]["securitySchemes"] = {SECURITY_SCHEME: {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{SECURITY_SCHEME: []}]
    return doc


def install_openapi(app: FastAPI, with_api_key: bool) -> None:
    """Serve `openapi_document` at /openapi.json (built once, on first use)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_document(app, with_api_key)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
