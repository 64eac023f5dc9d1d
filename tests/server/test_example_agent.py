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


def call(name, **args):
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in args.items())
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


def test_ticket_agent_loop(server_factory, demo_tokenizer, capsys):
    """Ticket 1 (a forgotten password) takes lookup_user, then reset_password with the id it returned."""
    def script(prompt_ids):
        prompt = demo_tokenizer.decode(prompt_ids, skip_special_tokens=False)
        last_turn = prompt.rsplit("<|im_start|>", 2)[-2]
        if '"message": "one-time link emailed"' in last_turn:
            return "The link is sent.\n</think>\nDone: check your email for a one-time link."
        if '"user_id": "U10001"' in last_turn:
            return "Found the account.\n</think>\n" + call("reset_password", user_id="U10001")
        return "Look the user up.\n</think>\n" + call("lookup_user", email="ana.lopez@example.com")

    s = server_factory(ScriptedEngine(demo_tokenizer, script=script), enable_auto_tool_choice=True)
    agent = load_example()
    assert agent.main(["--base-url", f"{s.base_url}/v1", "--api-key", API_KEY, "--tickets", "1",
                       "--tools", str(EXAMPLES / "demo_tools.json")]) == 0
    out = capsys.readouterr().out
    assert "[tool] lookup_user" in out and "[tool] reset_password" in out and '"user_id": "U10001"' in out
    assert "1/1 tickets resolved" in out and "password reset for U10001" in out

    # the same script cannot resolve ticket 2 (an unlock): the example says so and exits non-zero
    assert agent.main(["--base-url", f"{s.base_url}/v1", "--api-key", API_KEY, "--tickets", "2",
                       "--tools", str(EXAMPLES / "demo_tools.json")]) == 1
    assert "1/2 tickets resolved" in capsys.readouterr().out


def test_backends_never_raise():
    backends = load_example().Backends()
    assert "error" in backends.call("no_such_tool", "{}")
    assert "error" in backends.call("lookup_user", "{not json")
    assert "error" in backends.call("create_ticket", json.dumps({"title": "x"}))
    assert backends.call("create_ticket", json.dumps({"title": "x", "category": "network", "priority": 2}))["ok"]
