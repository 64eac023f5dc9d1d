"""Prefix caching seen from the API: `usage.prompt_tokens_details.cached_tokens` on an agent's second turn
(the real chat template, thinking on: the next prompt re-renders the previous generation prompt's end) and the
/metrics counters of both caches."""
from __future__ import annotations

import httpx

from server_helpers import API_KEY, MODEL_NAME

AUTH = {"Authorization": f"Bearer {API_KEY}"}
GREEDY = dict(temperature=0.0, max_tokens=6)


def metrics(server) -> dict[str, float]:
    values = {}
    for line in httpx.get(server.base_url + "/metrics", headers=AUTH).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_second_turn_reports_cached_tokens(real_server):
    c = real_server.client()
    turn = [{"role": "system", "content": "You are the IT helpdesk agent of ACME (prefix cache test)."},
            {"role": "user", "content": "My laptop does not connect to the office printer."}]
    before = metrics(real_server)
    first = c.chat.completions.create(model=MODEL_NAME, messages=turn, **GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    turn += [{"role": "assistant", "content": "Which printer is it?"},
             {"role": "user", "content": "The one on the second floor, next to the kitchen."}]
    second = c.chat.completions.create(model=MODEL_NAME, messages=turn, **GREEDY)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # everything up to the first turn's generation prompt, less its last token, is served from the cache
    assert first.usage.prompt_tokens - 1 <= cached < second.usage.prompt_tokens
    chunks = list(c.chat.completions.create(model=MODEL_NAME, messages=turn, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1
    after = metrics(real_server)
    for name in ("nemoh:prefix_cache_queries_total", "nemoh:mamba_prefix_cache_queries_total"):
        assert after[name] - before.get(name, 0.0) >= first.usage.prompt_tokens + 2 * second.usage.prompt_tokens
    assert after["nemoh:mamba_prefix_cache_hits_total"] - before.get("nemoh:mamba_prefix_cache_hits_total", 0.0) \
        == cached + second.usage.prompt_tokens - 1
    assert after["nemoh:prefix_cache_hits_total"] > before.get("nemoh:prefix_cache_hits_total", 0.0)


def test_completions_usage_has_cached_tokens(real_server):
    c = real_server.client()
    prompt = "Reset the password of the user jdoe in the directory, then tell me what you did. " * 3
    first = c.completions.create(model=MODEL_NAME, prompt=prompt, **GREEDY)
    again = c.completions.create(model=MODEL_NAME, prompt=prompt, **GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert again.choices[0].text == first.choices[0].text
