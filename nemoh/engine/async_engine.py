"""The asyncio front of the engine, for the HTTP server.

The model never runs on the event loop: a background thread owns the `LLMEngine` and loops
`take new requests and aborts -> step() -> hand outputs to the waiting coroutines`. Coroutines talk to it
through a locked inbox and get their outputs through per-request `asyncio.Queue`s fed with
`loop.call_soon_threadsafe`.

Failure model:
- bad input (too long, out-of-vocab ids, duplicate id) -> `ValueError` from `generate` at call time;
- the engine is full (running batch + bounded waiting queue) -> `QueueFullError` from `generate` at call time;
- one request fails inside the engine -> its iterator raises `EngineError`; the others carry on;
- the engine loop itself fails -> the engine is dead: `is_healthy()` is False, every pending iterator and every
  later `generate` raises `EngineDeadError`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator

from nemoh.engine.llm_engine import LLMEngine
from nemoh.engine.outputs import EngineDeadError, EngineError, QueueFullError, RequestOutput
from nemoh.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
IDLE_WAIT_S = 0.05


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    finished: bool = False

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:       # the caller's loop is closed: nobody is listening any more
            pass


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None):
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests or engine.args.max_waiting_requests
        self._lock = threading.Lock()
        self._inbox: list[tuple[str, str | None, list[int], SamplingParams]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, _Stream] = {}
        self._wakeup = threading.Event()
        self._stopping = False
        self._accepting = True
        self._dead: BaseException | None = None
        self._stats: dict = engine.stats()
        self._thread = threading.Thread(target=self._run_loop, name="nemoh-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, **engine_args) -> "AsyncLLMEngine":
        return cls(LLMEngine.from_pretrained(model_dir, **engine_args))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def grammar_compiler(self):
        """The engine's structured-output grammar compiler (thread-safe; see grammar_compiler.py)."""
        return self.engine.grammar_compiler()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    # ---- the coroutine side ---------------------------------------------------------------------------
    def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive() and self.engine.workers_alive()

    def _check_alive(self) -> None:
        if self._dead is not None or not self._thread.is_alive():
            raise EngineDeadError(f"the engine loop stopped: {self._dead!r}")

    @property
    def max_num_requests(self) -> int:
        """Requests the engine holds at once: a full running batch plus the bounded waiting queue."""
        return self.engine.scheduler.max_num_seqs + self.max_waiting_requests

    def num_waiting(self) -> int:
        return len(self._inbox) + self.engine.scheduler.num_waiting

    def generate(self, prompt_token_ids: list[int], sampling_params: SamplingParams, request_id: str,
                 prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request and return an async iterator of its cumulative outputs (the last has finished=True).

        Checks run at call time, so errors are raised before any iteration: ValueError (bad input),
        QueueFullError (waiting queue full), EngineDeadError, EngineError (shutting down).
        Leaving the iteration early (client gone, task cancelled) aborts the request.
        """
        self._check_alive()
        if not self._accepting:
            raise EngineError("the engine is shutting down")
        self.engine.validate_prompt(list(prompt_token_ids), sampling_params)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id: {request_id!r} is already in use")
            # Running + waiting, not waiting alone: a burst that arrives between two steps is still in the inbox
            # (counted as waiting) while running slots are free, and must not be refused for it.
            if self.num_waiting() + self.engine.scheduler.num_running >= self.max_num_requests:
                raise QueueFullError(f"the engine is full ({self.engine.scheduler.max_num_seqs} running + "
                                     f"{self.max_waiting_requests} waiting requests)")
            self._streams[request_id] = stream
            self._inbox.append((request_id, prompt, list(prompt_token_ids), sampling_params))
        self._wakeup.set()
        return self._iterate(request_id, stream)

    async def _iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    stream.finished = True
                    raise item
                if item.finished:
                    stream.finished = True
                    if item.error is not None:
                        raise EngineError(f"request {request_id} failed: {item.error}")
                    yield item
                    return
                yield item
        finally:
            if not stream.finished:
                self._request_abort(request_id)

    async def abort(self, request_id: str) -> None:
        """Stop a request; its blocks and slots are freed before the next step and its iterator ends."""
        self._request_abort(request_id)

    def abort_all(self) -> None:
        """Abort every request in flight (a drain that ran out of time); their iterators end with "abort"."""
        with self._lock:
            self._aborts.extend(self._streams)
        self._wakeup.set()

    def _request_abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wakeup.set()

    def stats(self) -> dict:
        """Counters for Prometheus (a snapshot taken by the engine thread after its last step)."""
        out = dict(self._stats)
        out["num_waiting"] = out.get("num_waiting", 0) + len(self._inbox)
        out["is_healthy"] = self.is_healthy()
        return out

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Refuse new requests, let running ones finish for up to `drain_timeout` seconds, abort the rest, stop."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while self._streams and self.is_healthy() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for request_id in list(self._streams):
            self._request_abort(request_id)
        while self._streams and self.is_healthy() and time.monotonic() < deadline + 1.0:
            await asyncio.sleep(0.01)
        self._stopping = True
        self._wakeup.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5.0)
        self.engine.close()             # tensor parallel: ends the workers

    # ---- the engine thread ----------------------------------------------------------------------------
    def _run_loop(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                self._take_inbox()
                if not engine.has_unfinished_requests():
                    self._stats = engine.stats()
                    self._wakeup.wait(IDLE_WAIT_S)
                    self._wakeup.clear()
                    continue
                outputs = engine.step()
                self._stats = engine.stats()
                for out in outputs:
                    self._deliver(out)
        except BaseException as e:  # a fatal engine error: nothing in flight can complete any more
            logger.exception("the engine loop died")
            self._dead = e
            with self._lock:
                streams, self._streams = self._streams, {}
            for stream in streams.values():
                stream.put(EngineDeadError(f"the engine loop stopped: {e!r}"))

    def _take_inbox(self) -> None:
        with self._lock:
            new, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for request_id, prompt, ids, params in new:
            try:
                self.engine.add_request(request_id, prompt=prompt, prompt_token_ids=ids, params=params)
            except Exception as e:  # validation races or an id reused: this request only
                with self._lock:
                    stream = self._streams.pop(request_id, None)
                if stream is not None:
                    stream.put(EngineError(f"request {request_id} was rejected: {e}"))
        for request_id in aborts:
            out = self.engine.abort_request(request_id)
            if out is not None:
                # As vLLM logs it; the time of this line is when the request's blocks and slots were freed.
                logger.info("Aborted request %s.", request_id)
                self._deliver(out)
            else:
                with self._lock:
                    stream = self._streams.pop(request_id, None)
                if stream is not None and not stream.finished:
                    stream.put(RequestOutput(request_id, None, [], [], finished=True))

    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            stream = self._streams.get(out.request_id)
            if out.finished:
                self._streams.pop(out.request_id, None)
        if stream is not None:
            stream.put(out)
