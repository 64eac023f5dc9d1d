"""`nemoh chat` with the demo model: the demo tools and system prompt by default, tool calls shown as calls,
/reset confirmed, Ctrl-C stops a reply (the request aborted, its cache freed), Ctrl-D quits."""
from __future__ import annotations

import os
import signal

import pytest

from nemoh import cli
from nemoh.cli.common import DEMO_MODEL_DIR, has_weights
from nemoh.engine.llm_engine import LLMEngine

pytestmark = pytest.mark.skipif(not has_weights(DEMO_MODEL_DIR), reason="the demo model's weights are not bundled")
SMALL = ["--temperature", "0", "--max-tokens", "160", "--cache-memory-gb", "0.05", "--max-num-seqs", "2",
         "--device", "cpu"]


@pytest.fixture
def terminal(monkeypatch):
    """Types `lines` at the prompts (an exception class is raised instead: EOFError is Ctrl-D, KeyboardInterrupt
    Ctrl-C); returns the prompts shown."""
    prompts: list[str] = []

    def type_in(*lines):
        queue = list(lines)

        def fake_input(prompt: str = "") -> str:
            prompts.append(prompt)
            item = queue.pop(0) if queue else EOFError
            if isinstance(item, type):
                raise item()
            return item

        monkeypatch.setattr("builtins.input", fake_input)
        return prompts

    return type_in


@pytest.fixture
def engines(monkeypatch):
    made: list[LLMEngine] = []
    original = LLMEngine.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        made.append(original(cls, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(LLMEngine, "from_pretrained", classmethod(from_pretrained))
    return made


def test_demo_tools_and_prompt_calls_shown_as_calls(terminal, capsys):
    prompts = terminal("Hi, I forgot my password. My email is ana.lopez@example.com",
                       '{"user_id": "U10001", "name": "Ana Lopez"}', "", KeyboardInterrupt, "/reset")
    assert cli.main(["chat", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "system prompt: You are the IT helpdesk assistant at Contoso. Use the tools to help employees." in out
    assert "tools: lookup_user, reset_password" in out
    assert "(thinking) " in out
    assert 'call: lookup_user({"email": "ana.lopez@example.com"})' in out
    assert "<tool_call>" not in out and "<function=" not in out and "</think>" not in out
    assert prompts[:2] == ["you> ", "result of lookup_user> "]     # the result goes back to the model
    assert "(Ctrl-D or /exit quits)" in out                          # Ctrl-C at the prompt does not quit
    assert "(history cleared; the system prompt stays)" in out
    assert prompts[-1] == "you> "                                     # then Ctrl-D quit


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(terminal, engines, capsys, monkeypatch):
    step = LLMEngine.step
    calls = []

    def step_then_ctrl_c(self):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return step(self)

    monkeypatch.setattr(LLMEngine, "step", step_then_ctrl_c)
    prompts = terminal("My laptop will not connect to the VPN.", "/exit")
    assert cli.main(["chat", *SMALL, "--tools", "none", "--system", "Be brief."]) == 0
    out = capsys.readouterr().out
    assert "(stopped)" in out and "tools: (none" in out and "system prompt: Be brief." in out
    assert len(calls) == 3 and prompts == ["you> ", "you> "]
    (engine,) = engines
    assert not engine.has_unfinished_requests() and not engine.requests
    assert engine.block_manager.num_used_blocks == 0 and engine.state_cache.num_used_slots == 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
