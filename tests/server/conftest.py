"""Fixtures for server tests (helpers in server_helpers.py)."""
from __future__ import annotations

from typing import Any

import pytest
from tokenizers import Tokenizer

from nemoh.chat import ChatTemplate
from server_helpers import DEMO_DIR, RunningServer, real_engine, start_server, stop_real


@pytest.fixture(scope="session")
def demo_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(DEMO_DIR / "tokenizer.json"))


@pytest.fixture
def server_factory():
    servers: list[RunningServer] = []

    def factory(engine: Any, **kwargs: Any) -> RunningServer:
        s = start_server(engine, **kwargs)
        servers.append(s)
        return s

    yield factory
    for s in servers:
        s.thread.stop()


@pytest.fixture(scope="session")
def real_server(tiny_checkpoint):
    """One server over the real engine (MTP speculative decoding on), shared by the real-engine tests."""
    engine = real_engine(tiny_checkpoint, speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    server = start_server(engine, chat_template=ChatTemplate.from_model_dir(tiny_checkpoint),
                          enable_auto_tool_choice=True, model_path=str(tiny_checkpoint))
    yield server
    stop_real(server)
