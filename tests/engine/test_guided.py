"""Constrained decoding in the engine: bitmasks, draft masks that roll back, and random weights that still write
valid JSON and valid calls at temperature 1.0, with and without MTP speculative decoding."""
import json

import jsonschema_rs
import pytest
import torch

from engine_helpers import PROMPTS, assert_idle
from nemoh.chat.grammar import response_format_constraint, tool_constraint
from nemoh.chat.tools import Qwen3CoderToolParser
from nemoh.engine.guided import GrammarMasks, TokenMasks, allowed_tokens, apply_token_bitmask_, pack_bits
from nemoh.sampling_params import SamplingParams, StructuredOutput

SPEC = {"method": "mtp", "num_speculative_tokens": 2}
SCHEMA = {
    "type": "object",
    "properties": {
        "naïve": {"type": "string", "maxLength": 6},
        "level": {"type": "integer", "minimum": -5, "maximum": 500},
        "mode": {"enum": ["fast", "slow", None]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "minItems": 1, "maxItems": 3},
        "inner": {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"anyOf": [
            {"type": "integer", "maximum": 9, "minimum": 0}, {"type": "null"}]}},
                  "required": ["ok"], "additionalProperties": False},
    },
    "required": ["naïve", "level", "inner"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}},
]


def structured_json(llm, schema=SCHEMA, **kw):
    c = response_format_constraint({"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    return StructuredOutput(c.grammar, c.param, **kw)


def test_bitmask_round_trip_and_apply():
    g = torch.Generator().manual_seed(0)
    allowed = torch.rand((3, 100), generator=g) < 0.3
    bitmask = torch.stack([pack_bits(a) for a in allowed])
    assert all(torch.equal(allowed_tokens(bitmask[i], 100), allowed[i]) for i in range(3))
    logits = torch.randn((5, 100), generator=g)
    expected = logits.clone()
    for j, row in enumerate([4, 0, 2]):
        expected[row] = expected[row].masked_fill(~allowed[j], float("-inf"))
    assert torch.equal(apply_token_bitmask_(logits.clone(), TokenMasks(bitmask, [4, 0, 2])), expected)


def test_draft_masks_match_step_by_step_and_roll_back(llm):
    compiler = llm.engine.grammar_compiler()
    masks = GrammarMasks(4096, [2, 11])
    c = response_format_constraint({"type": "json_object"})
    ids = llm.get_tokenizer().encode('{"a": [1, 2]}', add_special_tokens=False).ids
    state = masks.new_state(compiler.matcher(c.grammar, c.param), ())
    drafted = masks.draft_masks(state, ids[:3])
    step = masks.new_state(compiler.matcher(c.grammar, c.param), ())
    for j in range(4):
        assert torch.equal(drafted[j], masks.fill([step])[0])
        if j < 3:
            assert step.accept(ids[j])
    assert torch.equal(masks.fill([state])[0], drafted[0])          # rolled back to where it was
    close = llm.get_tokenizer().encode("}", add_special_tokens=False).ids[0]
    refused = masks.draft_masks(state, [close, ids[0]])               # JSON does not start with '}'
    assert not allowed_tokens(refused[0], 4096)[close] and bool((refused[1:] == -1).all())
    assert torch.equal(masks.fill([state])[0], drafted[0])
    # the think block: everything but EOS, until its end token goes by
    thinking = masks.new_state(compiler.matcher(c.grammar, c.param), (5,))
    free = allowed_tokens(masks.fill([thinking])[0], 4096)
    assert not free[2] and not free[11] and free.sum() == 4094
    assert thinking.accept(77) and not thinking.active and thinking.accept(5) and thinking.active


@pytest.mark.parametrize("mask_time_s", [0.0, 1.0])
def test_masks_computed_ahead_equal_those_computed_in_place(llm, mask_time_s):
    """`GrammarMasks.start` (on the worker thread during the forward when masks are slow, else at collection) gives
    the masks `fill` and `draft_masks` give, and leaves each state where it was; a failure there is an empty
    result, so the engine computes them itself."""
    compiler = llm.engine.grammar_compiler()
    masks = GrammarMasks(4096, [2, 11])
    masks.mask_time_s = mask_time_s
    c = response_format_constraint({"type": "json_object"})
    ids = llm.get_tokenizer().encode('{"a": [1, 2]}', add_special_tokens=False).ids
    states = [masks.new_state(compiler.matcher(c.grammar, c.param), ()) for _ in range(3)]
    for token in ids[:2]:
        assert states[1].accept(token)
    thinking = masks.new_state(compiler.matcher(c.grammar, c.param), (5,))
    pending = masks.start([(10, states[0], []), (11, states[1], []), (12, states[2], ids[:3]), (13, thinking, [])])
    assert (pending._future is not None) == (mask_time_s > 0)                  # on the worker thread or not
    ahead = pending.result()
    assert torch.equal(ahead[10], masks.fill([states[0]])) and torch.equal(ahead[11], masks.fill([states[1]]))
    assert torch.equal(ahead[12], masks.draft_masks(states[2], ids[:3])) and ahead[12].shape[0] == 4
    assert torch.equal(ahead[13], masks.fill([thinking]))
    assert torch.equal(masks.fill([states[2]]), masks.fill([states[0]]))      # the drafts were rolled back
    assert masks.start([]).result() == {}
    assert masks.start([(1, None, [])]).result() == {}                          # failed: logged, computed in place


@pytest.mark.parametrize("spec", [None, SPEC])
def test_random_weights_write_valid_json_at_temperature_one(make_llm, spec):
    llm = make_llm(speculative_config=spec, max_model_len=512)
    validator = jsonschema_rs.validator_for(SCHEMA)
    params = [SamplingParams(temperature=1.0, max_tokens=400, seed=i, structured=structured_json(llm))
              for i in range(12)]
    outs = llm.generate([PROMPTS[i % len(PROMPTS)] for i in range(12)], params)
    for out in outs:
        c = out.outputs[0]
        assert c.finish_reason == "stop", c.text
        assert validator.is_valid(json.loads(c.text)), c.text
    assert_idle(llm.engine)


@pytest.mark.parametrize("spec", [None, SPEC])
def test_random_weights_call_offered_tools_with_valid_arguments(make_llm, spec):
    llm = make_llm(speculative_config=spec, max_model_len=512)
    compiler = llm.engine.grammar_compiler()
    c = tool_constraint(TOOLS, "required", None, compiler.marker)
    params = SamplingParams(temperature=1.0, max_tokens=300, structured=StructuredOutput(c.grammar, c.param),
                            skip_special_tokens=False)
    outs = llm.generate(PROMPTS * 3, params)
    schemas = {t["function"]["name"]: jsonschema_rs.validator_for(t["function"]["parameters"]) for t in TOOLS}
    for out in outs:
        text = out.outputs[0].text.replace("<|im_end|>", "").replace("</s>", "")
        parsed = Qwen3CoderToolParser(TOOLS).extract(text)
        assert parsed.tool_calls and not (parsed.content or "").strip(), text
        for call in parsed.tool_calls:
            assert schemas[call.name].is_valid(json.loads(call.arguments)), call


def test_reasoning_stays_free_until_its_end_token(make_llm):
    llm = make_llm(max_model_len=512)
    free = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=6))[0].outputs[0].token_ids
    trigger = free[2]
    structured = structured_json(llm, start_after=(trigger,))
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=300, structured=structured))[0]
    ids = out.outputs[0].token_ids
    assert ids[:3] == free[:3]                                    # unconstrained up to the think end
    reply = llm.get_tokenizer().decode(ids[3:], skip_special_tokens=True)
    assert jsonschema_rs.validator_for(SCHEMA).is_valid(json.loads(reply))


def test_a_continuation_resumes_the_grammar(make_llm):
    llm = make_llm(max_model_len=512)
    s = StructuredOutput("start: x", start_after=(5,))
    assert s.continued([7, 8]) == s                               # still thinking
    assert s.continued([7, 5, 210, 9]) == StructuredOutput("start: x", prefix_token_ids=(210, 9))
    assert StructuredOutput("g").continued([1, 2]).prefix_token_ids == (1, 2)
    tok = llm.get_tokenizer()
    prefix = tuple(tok.encode('{"naïve": "ab", ', add_special_tokens=False).ids)
    structured = structured_json(llm, prefix_token_ids=prefix)
    out = llm.generate([PROMPTS[1]], SamplingParams(temperature=1.0, seed=3, max_tokens=300, structured=structured))
    text = '{"naïve": "ab", ' + out[0].outputs[0].text
    assert jsonschema_rs.validator_for(SCHEMA).is_valid(json.loads(text)), text
    with pytest.raises(ValueError, match="do not follow"):
        llm.generate([PROMPTS[1]], SamplingParams(structured=structured_json(llm, prefix_token_ids=(13, 13))))


def test_min_tokens_and_structured_output_do_not_mix():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=3, structured=StructuredOutput("start: x"))
