"""IT-ticket automation with tool calls against `nemoh serve` (or any OpenAI-compatible server).

For each scripted ticket the agent loops: call the model with the tools in `demo_tools.json` -> run the tool
calls it asked for against in-memory fake backends -> send the results back as `role: tool` messages -> until
the model answers without calling a tool (or the turn limit is hit). It prints a transcript and a summary.

    nemoh serve --enable-auto-tool-choice --api-key secret          # the bundled demo model
    python examples/ticket_agent.py --api-key secret

Only the `openai` package is needed on the client side.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from openai import OpenAI


@dataclass(frozen=True)
class Ticket:
    """A scripted ticket and what resolving it means: the tools called (and accepted by the backends), the
    change the backends must record, and what the final answer must tell the user."""

    text: str
    tools: frozenset[str]
    action: str | None = None              # a regular expression one of this ticket's backend actions matches
    answer_says: tuple[str, ...] = ()      # the answer contains one of these (any case)


TICKETS = [
    Ticket("Hi, this is ana.lopez@example.com. I forgot my password and can't sign in to anything.",
           frozenset({"lookup_user", "reset_password"}), action=r"password reset for U10001"),
    Ticket("My account got locked after too many attempts this morning. Email: raj.patel@example.com",
           frozenset({"lookup_user", "unlock_account"}), action=r"unlocked U10002"),
    Ticket("The Wi-Fi on the 4th floor keeps dropping every few minutes. Can someone look at it? It's urgent.",
           frozenset({"create_ticket"}), action=r"created INC-\d+ \(network, P[12]\)"),
    Ticket("What's the status of INC-4821? I opened it last week about my docking station.",
           frozenset({"get_ticket_status"}), answer_says=("in progress",)),
    Ticket("INC-4822 has been open for days and Outlook still won't sync. Please escalate it to messaging.",
           frozenset({"escalate_ticket"}), action=r"escalated INC-4822 to messaging"),
    Ticket("How do I set up the VPN on a new laptop?", frozenset({"search_kb"}),
           answer_says=("KB-101", "GlobalConnect")),
]

# The bundled demo model was trained with short system prompts of this shape; a real Nemotron 3 model takes
# any instructions here.
SYSTEM_PROMPT = "You are the IT helpdesk assistant at Contoso. Use the tools to help employees."


# ---------------------------------------------------------------------------------------------- fake backends


@dataclass
class Backends:
    """In-memory stand-ins for the directory, the ticket system and the knowledge base."""

    users: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "ana.lopez@example.com": {"user_id": "U10001", "name": "Ana Lopez", "locked": False},
        "raj.patel@example.com": {"user_id": "U10002", "name": "Raj Patel", "locked": True},
        "mei.chen@example.com": {"user_id": "U10003", "name": "Mei Chen", "locked": False},
    })
    tickets: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "INC-4821": {"title": "Docking station not detected", "status": "in progress", "team": "desktop"},
        "INC-4822": {"title": "Outlook not syncing", "status": "open", "team": "desktop"},
    })
    kb: list[dict[str, str]] = field(default_factory=lambda: [
        {"id": "KB-101", "title": "Set up the VPN client", "body": "Install GlobalConnect, sign in with SSO."},
        {"id": "KB-102", "title": "Reset your password", "body": "Use the one-time link sent by email."},
        {"id": "KB-103", "title": "Wi-Fi troubleshooting", "body": "Forget the network, reconnect, report AP id."},
    ])
    actions: list[str] = field(default_factory=list)
    next_ticket: int = 4900

    def _user_by_id(self, user_id: str) -> dict[str, Any] | None:
        return next((u for u in self.users.values() if u["user_id"] == user_id), None)

    def lookup_user(self, email: str) -> dict[str, Any]:
        user = self.users.get(str(email).strip().lower())
        return {"found": False} if user is None else {"found": True, **user}

    def reset_password(self, user_id: str) -> dict[str, Any]:
        if self._user_by_id(user_id) is None:
            return {"ok": False, "error": f"no account {user_id}"}
        self.actions.append(f"password reset for {user_id}")
        return {"ok": True, "message": "one-time link emailed"}

    def unlock_account(self, user_id: str) -> dict[str, Any]:
        user = self._user_by_id(user_id)
        if user is None:
            return {"ok": False, "error": f"no account {user_id}"}
        user["locked"] = False
        self.actions.append(f"unlocked {user_id}")
        return {"ok": True}

    def create_ticket(self, title: str, category: str, priority: int) -> dict[str, Any]:
        if category not in ("hardware", "software", "network", "access", "email", "other"):
            return {"ok": False, "error": f"unknown category {category!r}"}
        if not isinstance(priority, int) or not 1 <= priority <= 4:
            return {"ok": False, "error": "priority must be an integer from 1 to 4"}
        ticket_id = f"INC-{self.next_ticket}"
        self.next_ticket += 1
        self.tickets[ticket_id] = {"title": title, "status": "open", "team": category, "priority": priority}
        self.actions.append(f"created {ticket_id} ({category}, P{priority})")
        return {"ok": True, "ticket_id": ticket_id}

    def get_ticket_status(self, ticket_id: str) -> dict[str, Any]:
        ticket = self.tickets.get(str(ticket_id).strip().upper())
        return {"found": False} if ticket is None else {"found": True, "ticket_id": ticket_id, **ticket}

    def escalate_ticket(self, ticket_id: str, team: str, reason: str) -> dict[str, Any]:
        ticket = self.tickets.get(str(ticket_id).strip().upper())
        if ticket is None:
            return {"ok": False, "error": f"no ticket {ticket_id}"}
        ticket.update(team=team, status="escalated")
        self.actions.append(f"escalated {ticket_id} to {team}")
        return {"ok": True}

    def search_kb(self, query: str, max_results: int = 3) -> dict[str, Any]:
        words = {w for w in str(query).lower().split() if len(w) > 2}
        hits = [a for a in self.kb if words & set((a["title"] + " " + a["body"]).lower().split())]
        return {"results": hits[: max(1, min(int(max_results), 10))] if isinstance(max_results, int) else hits[:3]}

    def call(self, name: str, arguments: str) -> dict[str, Any]:
        """Run one tool call; any problem is returned to the model as an error result, never raised."""
        handlers: dict[str, Callable[..., dict[str, Any]]] = {
            "lookup_user": self.lookup_user, "reset_password": self.reset_password,
            "unlock_account": self.unlock_account, "create_ticket": self.create_ticket,
            "get_ticket_status": self.get_ticket_status, "escalate_ticket": self.escalate_ticket,
            "search_kb": self.search_kb,
        }
        handler = handlers.get(name)
        if handler is None:
            return {"error": f"unknown tool {name!r}"}
        try:
            args = json.loads(arguments or "{}")
        except ValueError:
            return {"error": "arguments are not valid JSON"}
        if not isinstance(args, dict):
            return {"error": "arguments must be a JSON object"}
        try:
            return handler(**args)
        except TypeError as e:  # missing or unexpected arguments
            return {"error": str(e)}


# ---------------------------------------------------------------------------------------------- the loop


@dataclass
class TicketResult:
    ticket: Ticket
    turns: int = 0
    tool_calls: list[str] = field(default_factory=list)
    succeeded: list[str] = field(default_factory=list)     # calls the backends accepted (no error, found)
    actions: list[str] = field(default_factory=list)       # what the backends changed for this ticket
    answer: str | None = None
    error: str | None = None

    @property
    def problems(self) -> list[str]:
        """Why the ticket is not resolved; empty when it is."""
        t = self.ticket
        if self.answer is None:
            return [self.error or "no answer"]
        found = [f"{name} not done" for name in sorted(t.tools - set(self.succeeded))]
        if t.action and not any(re.fullmatch(t.action, a) for a in self.actions):
            found.append(f"no backend action like {t.action!r}")
        if t.answer_says and not any(s.lower() in self.answer.lower() for s in t.answer_says):
            found.append(f"answer does not say {' or '.join(map(repr, t.answer_says))}")
        for created in re.findall(r"created (INC-\d+)", " ".join(self.actions)):
            if created not in self.answer:
                found.append(f"answer does not give the new ticket {created}")
        return found

    @property
    def resolved(self) -> bool:
        return not self.problems


def _short(text: str | None, width: int = 100) -> str:
    return textwrap.shorten(" ".join((text or "").split()), width=width, placeholder=" ...")


def handle_ticket(client: OpenAI, model: str, tools: list[dict], backends: Backends, ticket: Ticket,
                  max_turns: int = 6, temperature: float = 0.0, max_tokens: int = 512, thinking: bool = True,
                  log: Callable[[str], None] = print) -> TicketResult:
    result = TicketResult(ticket)
    actions_before = len(backends.actions)
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT},
                                      {"role": "user", "content": ticket.text}]
    log(f"\n=== ticket: {ticket.text}")
    while result.answer is None and result.turns < max_turns:
        result.turns += 1
        response = client.chat.completions.create(
            model=model, messages=messages, tools=tools, tool_choice="auto", temperature=temperature,
            max_tokens=max_tokens, extra_body={"chat_template_kwargs": {"enable_thinking": thinking}},
        )
        message = response.choices[0].message
        reasoning = getattr(message, "reasoning_content", None)
        if reasoning:
            log(f"  [thinking] {_short(reasoning)}")
        calls = message.tool_calls or []
        messages.append({
            "role": "assistant", "content": message.content or "",
            **({"reasoning_content": reasoning} if reasoning else {}),
            **({"tool_calls": [c.model_dump() for c in calls]} if calls else {}),
        })
        if not calls:
            result.answer = message.content or ""
            log(f"  [answer] {_short(message.content, 300)} (finish_reason={response.choices[0].finish_reason})")
        for call in calls:
            output = backends.call(call.function.name, call.function.arguments)
            result.tool_calls.append(call.function.name)
            if not (output.get("ok") is False or output.get("found") is False or "error" in output):
                result.succeeded.append(call.function.name)
            log(f"  [tool] {call.function.name}({call.function.arguments}) -> {json.dumps(output)}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(output)})
    if result.answer is None:
        result.error = f"no final answer after {max_turns} turns"
        log(f"  [gave up] {result.error}")
    result.actions = backends.actions[actions_before:]
    return result


def print_summary(results: list[TicketResult]) -> None:
    print("\n=== summary")
    print(f"{'#':>2}  {'turns':>5}  {'tool calls':<40}  {'resolved':<8}  backend actions / problems")
    for r in results:
        i = TICKETS.index(r.ticket) + 1 if r.ticket in TICKETS else "-"
        calls = ", ".join(r.tool_calls) or "-"
        detail = ("; ".join(r.actions) or "-") if r.resolved else "; ".join(r.problems)
        print(f"{i:>2}  {r.turns:>5}  {_short(calls, 40):<40}  {'yes' if r.resolved else 'no':<8}  {detail}")
    resolved = sum(r.resolved for r in results)
    print(f"\n{resolved}/{len(results)} tickets resolved (the tools each takes accepted by the backends, the backend "
          f"change it asks for, and a final answer that gives the outcome), "
          f"{sum(len(r.tool_calls) for r in results)} tool calls")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"))
    p.add_argument("--api-key", default=os.environ.get("NEMOH_API_KEY", "none"))
    p.add_argument("--model", default=None, help="model name (default: the server's first model)")
    p.add_argument("--tools", default=str(Path(__file__).with_name("demo_tools.json")))
    p.add_argument("--max-turns", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-thinking", action="store_true")
    p.add_argument("--tickets", type=int, default=len(TICKETS), help="how many of the scripted tickets to run")
    p.add_argument("--ticket", type=int, action="append", default=None, choices=range(1, len(TICKETS) + 1),
                   help=f"run only this scripted ticket, 1-{len(TICKETS)} (repeatable)")
    args = p.parse_args(argv)
    chosen = [TICKETS[i - 1] for i in args.ticket] if args.ticket else TICKETS[: args.tickets]

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    tools = json.loads(Path(args.tools).read_text())
    backends = Backends()
    results = [handle_ticket(client, model, tools, backends, ticket, args.max_turns, args.temperature,
                             args.max_tokens, not args.no_thinking) for ticket in chosen]
    print_summary(results)
    return 0 if all(r.resolved for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
