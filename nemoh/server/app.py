"""The FastAPI app: routes, error handlers, the guard middleware, CORS, and the engine health watchdog.

`build_app` takes an engine that is already running (the CLI or a test builds it), so the app itself never
loads a model. Routes are thin: parse the body, hand it to the serving object.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

import nemoh
from nemoh.server.errors import bad_request, install_error_handlers
from nemoh.server.metrics import ServerMetrics
from nemoh.server.middleware import GuardMiddleware
from nemoh.server.openapi import install_openapi
from nemoh.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    now,
)
from nemoh.server.serving_base import check_model, encode, parse_body, run_sync
from nemoh.server.serving_chat import ChatServing
from nemoh.server.serving_completions import CompletionServing
from nemoh.server.settings import ServerSettings, ServerState

logger = logging.getLogger("nemoh.server")


def _engine_stats(engine: Any) -> Callable[[], dict[str, Any]]:
    def stats() -> dict[str, Any]:
        return engine.stats()

    return stats


def _engine_healthy(engine: Any) -> bool:
    try:
        return bool(engine.is_healthy())
    except Exception:
        logger.exception("engine.is_healthy() failed")
        return False


def build_app(
    engine: Any,
    settings: ServerSettings,
    chat_template: Any,
    on_engine_dead: Callable[[], None] | None = None,
) -> FastAPI:
    """The API app over a running `engine`; `on_engine_dead` is called once if the engine stops (the CLI exits)."""
    state = ServerState(engine=engine, settings=settings, chat_template=chat_template,
                        metrics=ServerMetrics(settings.model_name, _engine_stats(engine)))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        watchdog = asyncio.create_task(_watch_engine(state, on_engine_dead))
        try:
            yield
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog

    docs = settings.api_docs
    app = FastAPI(title="nemoh", version=nemoh.__version__, lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)
    app.state.nemoh = state
    install_openapi(app, with_api_key=settings.api_key is not None)
    install_error_handlers(app)
    chat = ChatServing(state)
    completions = CompletionServing(state)
    created = now()

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: Request) -> Any:
        req = await parse_body(request, ChatCompletionRequest)
        return await chat.create(request, req)

    @app.post("/v1/completions")
    async def create_completion(request: Request) -> Any:
        req = await parse_body(request, CompletionRequest)
        return await completions.create(request, req)

    @app.get("/v1/models")
    async def list_models() -> Any:
        cards = [ModelCard(id=name, created=created, root=settings.model_path or None,
                           max_model_len=engine.max_model_len) for name in settings.served_model_names]
        return JSONResponse(ModelList(data=cards).model_dump(mode="json"))

    @app.get("/health")
    async def health() -> Any:
        if state.dead or not _engine_healthy(engine):
            return JSONResponse({"status": "dead"}, status_code=503)
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Any:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Any:
        req = await parse_body(request, TokenizeRequest)
        check_model(state, req.model)
        if req.messages is not None:
            chat_req = ChatCompletionRequest.model_validate(req.model_dump(exclude_none=True))
            prompt, ids, _, _ = await run_sync(chat.render, chat_req)
        else:
            prompt = req.prompt or ""
            ids = await run_sync(encode, engine.tokenizer, prompt, req.add_special_tokens)
        return JSONResponse(TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids,
                                             prompt=prompt).model_dump())

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Any:
        req = await parse_body(request, DetokenizeRequest)
        check_model(state, req.model)
        vocab = engine.tokenizer.get_vocab_size(with_added_tokens=True)
        if any(t >= vocab for t in req.tokens):
            raise bad_request(f"token ids must be < {vocab}", param="tokens")
        text = engine.tokenizer.decode(req.tokens, skip_special_tokens=False)
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump())

    # Outermost first: CORS answers preflights before the guard asks for a key (browsers send none).
    app.add_middleware(GuardMiddleware, state=state)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key"], allow_credentials=False,
        )
    return app


async def _watch_engine(state: ServerState, on_engine_dead: Callable[[], None] | None) -> None:
    while True:
        await asyncio.sleep(state.settings.health_check_interval)
        if not _engine_healthy(state.engine):
            state.dead = True
            logger.error("the engine is no longer healthy; the server stops")
            if on_engine_dead is not None:
                on_engine_dead()
            return
