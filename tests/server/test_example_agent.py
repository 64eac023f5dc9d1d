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


def test_a_ticket_is_resolved_only_by_an_answer_that_gives_the_outcome(server_factory, demo_tokenizer, capsys):
    """Ticket 4 (a status question): the right tool with the right id is not enough; the answer must say what
    the backend returned ("in progress"), not a status it made up."""
    answers = iter(["Ticket INC-4821 is escalated to the messaging team.",
                    "Ticket INC-4821 is in progress, assigned to the desktop team."])
    answer = next(answers)

    def script(prompt_ids):
        last_turn = demo_tokenizer.decode(prompt_ids, skip_special_tokens=False).rsplit("<|im_start|>", 2)[-2]
        if '"status": "in progress"' in last_turn:
            return "The result is back.\n</think>\n" + answer
        return "Check the ticket.\n</think>\n" + call("get_ticket_status", ticket_id="INC-4821")

    s = server_factory(ScriptedEngine(demo_tokenizer, script=script), enable_auto_tool_choice=True)
    agent = load_example()
    argv = ["--base-url", f"{s.base_url}/v1", "--api-key", API_KEY, "--ticket", "4",
            "--tools", str(EXAMPLES / "demo_tools.json")]
    assert agent.main(argv) == 1
    out = capsys.readouterr().out
    assert "0/1 tickets resolved" in out and "answer does not say 'in progress'" in out
    answer = next(answers)
    assert agent.main(argv) == 0
    assert "1/1 tickets resolved" in capsys.readouterr().out


def test_backend_changes_and_new_ticket_ids_are_checked():
    """Ticket 3 (Wi-Fi) needs a network ticket of priority 1 or 2 whose new id the answer gives."""
    agent = load_example()
    wifi = agent.TICKETS[2]
    backends = agent.Backends()
    backends.call("create_ticket", json.dumps({"title": "Wi-Fi drops", "category": "network", "priority": 1}))
    done = agent.TicketResult(wifi, succeeded=["create_ticket"], actions=list(backends.actions),
                              answer="I opened ticket INC-4900 (network, priority 1).")
    assert done.resolved
    assert not agent.TicketResult(wifi, succeeded=["create_ticket"], actions=list(backends.actions),
                                  answer="I opened a ticket.").resolved
    wrong = agent.Backends()
    wrong.call("create_ticket", json.dumps({"title": "laptop", "category": "email", "priority": 3}))
    problems = agent.TicketResult(wifi, succeeded=["create_ticket"], actions=list(wrong.actions),
                                  answer="I opened ticket INC-4900.").problems
    assert len(problems) == 1 and problems[0].startswith("no backend action like")


def test_backends_never_raise():
    backends = load_example().Backends()
    assert "error" in backends.call("no_such_tool", "{}")
    assert "error" in backends.call("lookup_user", "{not json")
    assert "error" in backends.call("create_ticket", json.dumps({"title": "x"}))
    assert backends.call("create_ticket", json.dumps({"title": "x", "category": "network", "priority": 2}))["ok"]
