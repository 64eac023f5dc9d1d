"""examples/ticket_agent.py runs its whole loop against a real server (scripted engine: call a tool, then answer)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from server_fakes import ScriptedEngine
from server_helpers import API_KEY

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example():
    spec = importlib.util.spec_from_file_location("ticket_agent", EXAMPLES / "ticket_agent.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ticket_agent"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_ticket_agent_loop(server_factory, demo_tokenizer, capsys):
    def script(prompt_ids):
        prompt = demo_tokenizer.decode(prompt_ids, skip_special_tokens=False)
        last_turn = prompt.rsplit("<|im_start|>", 2)[-2]
        if "<tool_response>" in last_turn:
            return "The tool answered.\n</think>\nDone: your request is handled."
        return ("Look the user up.\n</think>\n<tool_call>\n<function=lookup_user>\n<parameter=email>\n"
                "ana.lopez@example.com\n</parameter>\n</function>\n</tool_call>")

    s = server_factory(ScriptedEngine(demo_tokenizer, script=script), enable_auto_tool_choice=True)
    agent = load_example()
    assert agent.main(["--base-url", f"{s.base_url}/v1", "--api-key", API_KEY, "--tickets", "2",
                       "--tools", str(EXAMPLES / "demo_tools.json")]) == 0
    out = capsys.readouterr().out
    assert out.count("[tool] lookup_user") == 2 and '"user_id": "U10001"' in out
    assert "2/2 tickets answered, 2 tool calls" in out


def test_backends_never_raise():
    backends = load_example().Backends()
    assert "error" in backends.call("no_such_tool", "{}")
    assert "error" in backends.call("lookup_user", "{not json")
    assert "error" in backends.call("create_ticket", json.dumps({"title": "x"}))
    assert backends.call("create_ticket", json.dumps({"title": "x", "category": "network", "priority": 2}))["ok"]
