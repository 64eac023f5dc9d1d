"""The bundled demo model, served for real: a known held-out ticket yields the right tool call through the server,
streaming and not, with the reasoning split out, and with MTP speculative decoding on as `nemoh serve` runs it."""
from __future__ import annotations

import json

import pytest

from nemoh.chat import ChatTemplate
from nemoh.cli import DEMO_MODEL_DIR, DEMO_SPECULATIVE_CONFIG, has_weights
from nemoh.demo.corpus import generate
from server_helpers import MODEL_NAME, real_engine, start_server, stop_real

pytestmark = pytest.mark.skipif(not has_weights(DEMO_MODEL_DIR), reason="the demo model's weights are not bundled")

# A held-out ticket (names, e-mail domains and phrasings never seen in training) that needs one tool call.
HELDOUT_SEED, HELDOUT_INDEX = 1, 2


@pytest.fixture(scope="module")
def demo_server():
    engine = real_engine(DEMO_MODEL_DIR, dtype="bfloat16", max_model_len=2048, num_kv_blocks=256,
                         speculative_config=DEMO_SPECULATIVE_CONFIG)
    server = start_server(engine, chat_template=ChatTemplate.from_model_dir(DEMO_MODEL_DIR),
                          enable_auto_tool_choice=True, model_path=str(DEMO_MODEL_DIR))
    yield server
    stop_real(server)


@pytest.fixture(scope="module")
def ticket():
    example = generate("heldout", HELDOUT_INDEX + 1, seed=HELDOUT_SEED)[HELDOUT_INDEX]
    assert example.expected["type"] == "tool_call"
    return example


def test_heldout_ticket_gives_the_right_tool_call(demo_server, ticket):
    client = demo_server.client()
    kwargs = dict(model=MODEL_NAME, messages=ticket.messages[:-1], tools=ticket.tools, temperature=0.0,
                  max_tokens=256, extra_body={"chat_template_kwargs": ticket.template_kwargs})
    r = client.chat.completions.create(**kwargs)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == ticket.expected["name"]
    assert json.loads(call.function.arguments) == ticket.expected["arguments"]
    assert "<tool_call>" not in (choice.message.content or "")
    assert "</think>" not in (getattr(choice.message, "reasoning_content", None) or "")

    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    name = "".join(c.choices[0].delta.tool_calls[0].function.name or "" for c in chunks
                   if c.choices and c.choices[0].delta.tool_calls)
    arguments = "".join(c.choices[0].delta.tool_calls[0].function.arguments or "" for c in chunks
                        if c.choices and c.choices[0].delta.tool_calls)
    assert name == call.function.name and json.loads(arguments) == ticket.expected["arguments"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
