"""ChatTemplate: HF-compatible rendering, loading, errors and the sandbox limits (QUALITY row 10)."""

import json
import time

import pytest

from nemoh.chat.template import ChatTemplate, TemplateError, builtin_template_source

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A template written to touch the HF-specific pieces: tojson options, loopcontrols, namespace,
# special tokens, extra kwargs, trim_blocks/lstrip_blocks whitespace handling.
FEATURES = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m.role == 'skip' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    <{{ m.role }}>{{ m.content }}</{{ m.role }}>
    {% if ns.n >= 3 %}{% break %}{% endif %}
{% endfor %}
{% if tools %}{{ tools | tojson }}|{{ tools | tojson(indent=2, sort_keys=True) }}{% endif %}
{{ custom_flag | default('unset') }}{{ eos_token }}
"""

MESSAGES = [
    {"role": "system", "content": "Be brief. ünïcødé 😀 <b>&</b>"},
    {"role": "user", "content": "Hi"},
    {"role": "skip", "content": "hidden"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "More"},
]
TOOLS = [{"type": "function", "function": {"name": "f", "description": "Do <it> & \"that\"",
                                           "parameters": {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}}}]


def test_render_chatml_generation_prompt():
    t = ChatTemplate(CHATML)
    assert t.render([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert t.render([{"role": "user", "content": "hi"}], add_generation_prompt=False) == "<|im_start|>user\nhi<|im_end|>\n"


def test_special_tokens_kwargs_and_tojson_do_not_escape():
    t = ChatTemplate(FEATURES, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
    out = t.render(MESSAGES, tools=TOOLS, custom_flag="ON")
    assert out.startswith("<s>")
    assert out.endswith("ON</s>")  # jinja drops the final newline, as in HF
    assert "hidden" not in out and "<user>More</user>" not in out  # continue / break
    assert '"Do <it> & \\"that\\""' in out  # no HTML escaping
    assert '[\n  {\n    "function": {\n      "description"' in out  # indent + sort_keys
    assert "ünïcødé 😀" in out  # ensure_ascii=False


def _hf_render(source, messages, tools=None, **kwargs):
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    rendered, _ = chat_template_utils.render_jinja_template(
        conversations=[messages], tools=tools, chat_template=source, **kwargs
    )
    return rendered[0]


HF_CASES = [
    (CHATML, MESSAGES[:2], None, {}),
    (FEATURES, MESSAGES, TOOLS, {"custom_flag": "x", "bos_token": "<s>", "eos_token": "</s>"}),
    (FEATURES, MESSAGES, None, {}),
]


@pytest.mark.parametrize("source,messages,tools,kwargs", HF_CASES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_parity_with_transformers(source, messages, tools, kwargs, add_generation_prompt):
    special = {k: v for k, v in kwargs.items() if k.endswith("_token")}
    extra = {k: v for k, v in kwargs.items() if not k.endswith("_token")}
    ours = ChatTemplate(source, special_tokens=special).render(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, **extra)
    theirs = _hf_render(source, messages, tools, add_generation_prompt=add_generation_prompt, **kwargs)
    assert ours == theirs


NEMOTRON_TOOLS = [
    {"type": "function", "function": {"name": "lookup_user", "description": "Find an account by email.",
     "parameters": {"type": "object", "properties": {"email": {"type": "string", "description": "Work email."}},
                    "required": ["email"]}}},
    {"type": "function", "function": {"name": "create_ticket", "description": "Open a ticket.",
     "parameters": {"type": "object", "properties": {
         "category": {"type": "string", "enum": ["network", "other"]},
         "priority": {"type": "integer", "description": "1 (urgent) to 4 (low).", "minimum": 1}},
         "required": ["category"], "additionalProperties": False}}},
]

NEMOTRON_CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "sys"}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b", "reasoning_content": "think b"}, {"role": "user", "content": "c"}],
    [{"role": "user", "content": "reset bob"},
     {"role": "assistant", "content": "", "reasoning_content": "lookup first",
      "tool_calls": [{"id": "c1", "type": "function",
                      "function": {"name": "lookup_user", "arguments": {"email": "bob@x.io", "n": 2, "o": {"k": [1, None, True]}}}}]},
     {"role": "tool", "tool_call_id": "c1", "content": "{\"user_id\": \"U1\"}"},
     {"role": "tool", "tool_call_id": "c2", "content": "second"}],
]


@pytest.mark.parametrize("messages", NEMOTRON_CONVERSATIONS)
@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"low_effort": True},
                                    {"truncate_history_thinking": False}])
def test_nemotron3_template_parity_with_transformers(messages, kwargs):
    source = builtin_template_source("nemotron3")
    tools = TOOLS + NEMOTRON_TOOLS
    ours = ChatTemplate(source).render(messages, tools=tools, **kwargs)
    assert ours == _hf_render(source, messages, tools, add_generation_prompt=True, **kwargs)


def test_messages_are_normalized_not_mutated():
    t = ChatTemplate("{% for m in messages %}{{ m | tojson }}{% endfor %}")
    msg = {"role": "assistant", "content": None,
           "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]}
    out = json.loads(t.render([msg], add_generation_prompt=False))
    assert "content" not in out  # None-valued keys are dropped, as HF does
    assert out["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert msg["tool_calls"][0]["function"]["arguments"] == "{\"a\": 1}"  # caller's object untouched



@pytest.mark.parametrize("message", [
    {"role": "assistant", "content": "a", "reasoning": "r"},
    {"role": "assistant", "content": "a", "thinking": "r"},
    {"role": "assistant", "content": "a", "reasoning_content": "first", "reasoning": "second"},
    {"role": "assistant", "content": "a", "reasoning": None, "thinking": "r"},
])
def test_reasoning_fields_are_aliased_as_hf_does(message):
    source = "{% for m in messages %}{{ m | tojson }}{% endfor %}"
    out = json.loads(ChatTemplate(source).render([message], add_generation_prompt=False))
    expected = message.get("reasoning_content") or message.get("thinking") or message.get("reasoning")
    assert out["reasoning_content"] == out["thinking"] == expected
    hf_input = {k: v for k, v in message.items() if v is not None}  # apply_chat_template drops None first
    assert out == json.loads(_hf_render(source, [hf_input], add_generation_prompt=False))

# ---- loading -------------------------------------------------------------------------------------


def test_from_model_dir_jinja_file_wins(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}file")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "config", "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>"}))
    t = ChatTemplate.from_model_dir(tmp_path)
    assert t.render([]) == "<s>file"
    assert t.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}


def test_from_model_dir_named_templates(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "default", "template": "plain"}, {"name": "tool_use", "template": "tools:{{ tools | length }}"}]}))
    t = ChatTemplate.from_model_dir(tmp_path)
    assert t.render([]) == "plain"
    assert t.render([], tools=TOOLS) == "tools:1"


def test_from_model_dir_errors(tmp_path):
    with pytest.raises(TemplateError, match="no chat template"):
        ChatTemplate.from_model_dir(tmp_path)
    with pytest.raises(TemplateError, match="default"):
        ChatTemplate([{"name": "tool_use", "template": "x"}])


# ---- errors --------------------------------------------------------------------------------------


def test_syntax_error_is_template_error():
    with pytest.raises(TemplateError, match="syntax error at line 2"):
        ChatTemplate("ok\n{% for %}")
    assert issubclass(TemplateError, ValueError)


def test_raise_exception_is_template_error():
    t = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}")
    with pytest.raises(TemplateError, match="first message must be user"):
        t.render([{"role": "assistant", "content": "x"}])


def test_runtime_type_error_is_template_error():
    with pytest.raises(TemplateError):
        ChatTemplate("{{ messages[0].content + 1 }}").render([{"role": "user", "content": "x"}])


def test_bad_limits_rejected():
    with pytest.raises(ValueError, match="timeout_s"):
        ChatTemplate("x", timeout_s=0)


# ---- sandbox -------------------------------------------------------------------------------------

ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}",
    "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ self._TemplateReference__context }}",
    "{{ self.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ (messages | first).items.__self__.__class__ }}",
    "{% set x = messages.append(1) %}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{{ range.__call__.__self__ }}",
    "{{ '{0.__class__}'.format('') }}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_sandbox_escapes_run_nothing(source, tmp_path):
    marker = tmp_path / "pwned"
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(TemplateError, match="unsafe|not safely callable"):
        ChatTemplate(source.replace("MARKER", str(marker))).render(messages)
    assert messages == [{"role": "user", "content": "hi"}]
    assert not marker.exists()


RUNAWAYS = [
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{% for i in range(100000) %}{{ f(n) if n < 0 else '' }}{% endfor %}{% endmacro %}"
    "{% for i in range(100000) %}{{ f(i) }}{% endfor %}",
]


@pytest.mark.parametrize("source", RUNAWAYS)
def test_runaway_template_is_stopped(source):
    t = ChatTemplate(source, timeout_s=0.3)
    start = time.monotonic()
    with pytest.raises(TemplateError, match="exceeded"):
        t.render([])
    assert time.monotonic() - start < 1.5


def test_default_timeout_is_one_second():
    t = ChatTemplate(RUNAWAYS[0])
    assert t.timeout_s == 1.0
    start = time.monotonic()
    with pytest.raises(TemplateError, match="exceeded 1 s"):
        t.render([])
    assert time.monotonic() - start < 1.5


MEMORY_BOMBS = [
    "{{ 'a' * 10**10 }}",
    "{{ [1, 2] * 10**9 }}",
    "{{ 2 ** (10 ** 9) }}",
    "{{ ''.ljust(10**9) }}",
    "{{ '' | center(10**9) }}",
    "{{ '%999999999s' % 'x' }}",
    "{{ '{:>999999999}'.format('x') }}",
    "{{ '%0999999999d' | format(1) }}",
    "{% set ns = namespace(s='a' * 1000000) %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='a' * 1000000) %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% set l = ['a' * 1000000, 'b' * 1000000, 'c' * 1000000, 'd' * 1000000, 'e' * 1000000] %}{{ l | join }}",
    "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",  # output cap
]


@pytest.mark.parametrize("source", MEMORY_BOMBS)
def test_oversized_values_are_refused(source):
    start = time.monotonic()
    with pytest.raises(TemplateError):
        ChatTemplate(source).render([])
    assert time.monotonic() - start < 1.5


def test_numbers_in_content_are_not_mistaken_for_format_widths():
    t = ChatTemplate("{{ messages[0].content.split('-')[0] }}|{{ messages[0].content.upper() }}|{{ '%s' % 5 }}")
    assert t.render([{"role": "user", "content": "order 123456789012-x"}], add_generation_prompt=False) == (
        "order 123456789012|ORDER 123456789012-X|5")


def test_tracer_is_restored_and_normal_render_unaffected():
    import sys

    def outer(frame, event, arg):
        return None

    sys.settrace(outer)
    try:
        assert ChatTemplate(CHATML).render([{"role": "user", "content": "x"}]).endswith("assistant\n")
        assert sys.gettrace() is outer
    finally:
        sys.settrace(None)
