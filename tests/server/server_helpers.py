"""Server test helpers: a real uvicorn server on a free localhost port, in a background thread."""
from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from nemoh.chat import ChatTemplate
from nemoh.server.app import build_app
from nemoh.server.runner import ServerThread, make_server
from nemoh.server.settings import ServerSettings

import nemoh.demo

MODEL_NAME = "nemoh-test"
API_KEY = "sk-test-key"
DEMO_DIR = Path(nemoh.demo.__file__).parent / "model"


@dataclass
class RunningServer:
    base_url: str
    host: str
    port: int
    engine: Any
    app: Any
    thread: ServerThread

    @property
    def state(self):
        return self.app.state.nemoh

    def client(self, api_key: str | None = API_KEY, **kwargs):
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key or "none", max_retries=0,
                             timeout=kwargs.pop("timeout", 60), **kwargs)


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def start_server(engine: Any, chat_template: Any = None, **settings: Any) -> RunningServer:
    settings.setdefault("served_model_names", [MODEL_NAME])
    settings.setdefault("api_key", API_KEY)
    template = chat_template or ChatTemplate.from_model_dir(DEMO_DIR)
    app = build_app(engine, ServerSettings(**settings), template)
    sock = free_socket()
    host, port = sock.getsockname()
    server = make_server(app, host, port, log_level="warning")
    thread = ServerThread(server, sock).start()
    return RunningServer(f"http://{host}:{port}", host, port, engine, app, thread)


def wait_healthy(proc: Any, base_url: str, timeout: float = 90.0) -> None:
    """Wait until the server process `proc` answers GET /health with 200; fails if it exits or times out."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            if httpx.get(base_url + "/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.2)


def real_engine(checkpoint, **engine_args: Any):
    """The real AsyncLLMEngine over a tiny random checkpoint, sized for CPU tests."""
    from nemoh.engine.async_engine import AsyncLLMEngine

    args = dict(dtype="float32", device="cpu", max_model_len=256, max_num_seqs=8, num_kv_blocks=96,
                num_state_slots=16, max_waiting_requests=32)
    args.update(engine_args)
    return AsyncLLMEngine.from_pretrained(str(checkpoint), **args)


def stop_real(server: RunningServer) -> None:
    import asyncio

    server.thread.stop()
    asyncio.run(server.engine.shutdown(0))
