"""Run the app under uvicorn: 431 for oversized headers, and a graceful drain on SIGTERM/SIGINT.

Drain: the first signal does not close the listening socket (uvicorn's default would, and new clients
would see "connection refused" instead of an answer). The server keeps accepting; the guard answers new
requests with 503 + Retry-After while in-flight ones finish. When they are done, or `shutdown_timeout` has
passed (less a reserve for the exit itself), uvicorn is told to exit and cuts what is left. A second signal
exits at once.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from http import HTTPStatus
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from nemoh.server.errors import error_bytes
from nemoh.server.settings import ServerState

logger = logging.getLogger("nemoh.server")
EXIT_RESERVE_S = 3.5   # of --shutdown-timeout, kept for the exit after the drain


class _RememberingConnection(h11.Connection):
    """An h11 connection that keeps the status hint of the last protocol error (431 for huge headers)."""

    last_error_status = 400

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as e:
            self.last_error_status = e.error_status_hint
            raise


class NemohH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, answering malformed requests with the status h11 suggests, in OpenAI's shape."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.conn = _RememberingConnection(h11.SERVER, config.h11_max_incomplete_event_size)

    def connection_made(self, transport: Any) -> None:
        # asyncio sets TCP_NODELAY only on sockets whose protocol number says TCP; a socket made as
        # socket.socket(AF_INET, SOCK_STREAM) (proto 0; ServerThread callers) would keep Nagle's algorithm on,
        # and a response written as headers + body then waits for the client's delayed ACK: 40 ms on every
        # keep-alive request (measured with httpx: 50 ms against 8 ms for a 3-token reply).
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # uvicorn cancels the keep-alive timer only on a clean close; after a reset the timer kept this protocol,
        # its buffers and its request cycle alive for timeout_keep_alive seconds (measured: a flood of 100 kB
        # headers from clients that reset grew RSS by ~50 kB a request).
        self._unset_keepalive_if_required()

    def send_400_response(self, msg: str) -> None:
        status = getattr(self.conn, "last_error_status", 400)
        message = "Request header fields too large." if status == 431 else msg
        body = error_bytes(status, message)
        # Written raw: the h11 connection is in an error state and refuses to send.
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
        self.transport.write(head.encode() + body)
        self.transport.close()


class NemohServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._drain_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.state.draining or self._loop is None:
            super().handle_exit(sig, frame)  # second signal: exit now
            return
        logger.info("signal %s: draining (new requests get 503) for up to %.1f s", sig,
                    self.state.settings.shutdown_timeout)
        self._loop.call_soon_threadsafe(self.begin_drain)

    def begin_drain(self) -> None:
        """Start the drain (idempotent); the server exits when it is done."""
        if self._drain_task is None:
            self.state.draining = True
            self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        # The timeout bounds the whole exit, so the drain ends early enough for what follows it: uvicorn's
        # close (up to timeout_graceful_shutdown), the engine's stop and the interpreter's exit (torch's teardown
        # alone is 0.75-2 s on a loaded 2-core machine).
        timeout = self.state.settings.shutdown_timeout
        deadline = time.monotonic() + timeout - min(EXIT_RESERVE_S, timeout / 2)
        # The guard counts every request, this drain probe included, so wait for idle with some slack.
        while self.state.num_inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.state.num_inflight > 0:
            logger.warning("drain timeout: %d requests still in flight are cut", self.state.num_inflight)
            # Cut them in the engine: their responses then end (finish_reason "abort") within a step, instead of
            # being cancelled mid-send by uvicorn after its own grace period.
            abort_all = getattr(self.state.engine, "abort_all", None)
            if abort_all is not None:
                abort_all()
                cut_deadline = time.monotonic() + 1.0
                while self.state.num_inflight > 0 and time.monotonic() < cut_deadline:
                    await asyncio.sleep(0.02)
        self.should_exit = True

    def stop_now(self) -> None:
        """Exit without draining (the engine died)."""
        self.should_exit = True


def make_server(app: Any, host: str, port: int, *, log_level: str = "info", access_log: bool = False,
                ssl_keyfile: str | None = None, ssl_certfile: str | None = None, root_path: str = "") -> NemohServer:
    state: ServerState = app.state.nemoh
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=NemohH11Protocol,
        h11_max_incomplete_event_size=state.settings.max_header_bytes,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=1,
        timeout_keep_alive=5,
        lifespan="on",
        ssl_keyfile=ssl_keyfile,
        ssl_certfile=ssl_certfile,
        root_path=root_path,
    )
    return NemohServer(config, state)


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port for the server to listen on (port 0: a free one). Bound before the model
    loads, so that a busy port is reported at once; raises OSError (address in use, unknown host, ...)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    # as uvicorn binds: a port left in TIME_WAIT by a server that just stopped can be taken again at once
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class ServerThread:
    """Run a server on a background thread (tests, notebooks); `stop()` exits it."""

    def __init__(self, server: NemohServer, sock: socket.socket | None = None) -> None:
        self.server = server
        self.thread = threading.Thread(target=server.run, kwargs={"sockets": [sock] if sock else None},
                                       daemon=True)

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
