"""The bundled demo model, served for real (MTP speculative decoding on, as `nemoh serve` runs it): a known
held-out ticket yields a parseable call of the right tool, with the exact arguments copied from the ticket,
through the server, streaming and not. (The demo model copies ids since it was trained with the copy task,
`nemoh train --copy-every 3`; e-mail addresses it still gets wrong, see README.)"""
from __future__ import annotations

import json

import pytest

from nemoh.chat import ChatTemplate
from nemoh.cli.common import DEFAULT_SPECULATIVE_CONFIG, DEMO_MODEL_DIR, has_weights
from nemoh.demo.corpus import generate
from server_helpers import MODEL_NAME, real_engine, start_server, stop_real

pytestmark = pytest.mark.skipif(not has_weights(DEMO_MODEL_DIR), reason="the demo model's weights are not bundled")

# A held-out ticket (names, e-mail domains and phrasings never seen in training) that needs one tool call and
# that the shipped weights get right (a password reset for a user id; the rate over all held-out tickets is
# README's table). Retrained weights may need another one: index 8 served the weights shipped before.
HELDOUT_SEED, HELDOUT_INDEX = 1, 13


@pytest.fixture(scope="module")
def demo_server():
    engine = real_engine(DEMO_MODEL_DIR, dtype="bfloat16", max_model_len=2048, num_kv_blocks=256,
                         speculative_config=DEFAULT_SPECULATIVE_CONFIG)
    server = start_server(engine, chat_template=ChatTemplate.from_model_dir(DEMO_MODEL_DIR),
                          enable_auto_tool_choice=True, model_path=str(DEMO_MODEL_DIR))
    yield server
    stop_real(server)


@pytest.fixture(scope="module")
def ticket():
    example = generate("heldout", HELDOUT_INDEX + 1, seed=HELDOUT_SEED)[HELDOUT_INDEX]
    assert example.expected["type"] == "tool_call"
    return example


def ask(server, ticket, **extra):
    return server.client().chat.completions.create(
        model=MODEL_NAME, messages=ticket.messages[:-1], tools=ticket.tools, temperature=0.0, max_tokens=256,
        extra_body={"chat_template_kwargs": ticket.template_kwargs}, **extra)


def test_heldout_ticket_gives_a_call_of_the_right_tool(demo_server, ticket):
    r = ask(demo_server, ticket)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == ticket.expected["name"]
    assert set(json.loads(call.function.arguments)) == set(ticket.expected["arguments"])
    assert "<tool_call>" not in (choice.message.content or "")

    chunks = list(ask(demo_server, ticket, stream=True))
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert "".join(d.function.name or "" for d in deltas) == call.function.name
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_heldout_ticket_gives_the_exact_arguments(demo_server, ticket):
    (call,) = ask(demo_server, ticket).choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == ticket.expected["arguments"]
