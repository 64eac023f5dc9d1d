"""Server-sent events and client-disconnect handling.

A streamed response is committed (status 200) only after the engine produced its first delta, so that a
full queue or a dead engine is still answered with 429/503 instead of an error inside a 200 stream. While
waiting for that first delta, and for the whole of a non-streamed request, the client connection is polled;
once the client is gone the work is cancelled, which aborts the engine requests (see generation.py).
After the stream has started, Starlette cancels the body iterator itself when the client disconnects.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Awaitable, TypeVar

import anyio
from fastapi import Request
from pydantic import BaseModel

from nemoh.server.errors import error_body

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready."""


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One SSE event. In chat deltas absent fields are left out; elsewhere nulls stay, as OpenAI sends them."""
    data = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
    for choice in data.get("choices", ()):
        if isinstance(choice, dict) and "delta" in choice:
            choice["delta"] = _drop_none(choice["delta"])
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_error(status: int, message: str, code: str | None = None) -> str:
    return sse(error_body(status, message, code=code))


async def _wait_for_disconnect(request: Request, interval: float) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(interval)


async def until_disconnected(request: Request, work: Awaitable[T], interval: float) -> T:
    """Await `work`, cancelling it (and raising ClientDisconnected) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request, interval))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientDisconnected()
    finally:
        with anyio.CancelScope(shield=True):
            for t in (watcher, task):
                if not t.done():
                    t.cancel()
            await asyncio.gather(watcher, task, return_exceptions=True)


async def first_and_rest(
    request: Request, stream: AsyncIterator[T], interval: float
) -> tuple[T | None, AsyncIterator[T]]:
    """Wait (disconnect-aware) for the first item of `stream`; returns it and the stream to continue.

    Exceptions raised before the first item (queue full, engine dead, bad request) propagate, so the
    caller can still answer them with a proper status. `None` means the stream was empty.
    """
    try:
        first = await until_disconnected(request, stream.__anext__(), interval)
    except StopAsyncIteration:
        return None, stream
    except BaseException:
        with anyio.CancelScope(shield=True):
            await stream.aclose()
        raise
    return first, stream


async def prepend(first: T | None, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    """The whole stream again after `first_and_rest` took its first item off."""
    if first is not None:
        yield first
    async for item in rest:
        yield item
