"""Schema fuzzing (QUALITY.md #1): schemathesis over the server's own OpenAPI document, real engine.

Every route that takes input gets schema-valid bodies (positive) and schema-violating ones (negative); no
answer may be a 5xx, every answer must match the status codes, content types, headers and bodies the document
declares, and schema-violating bodies must be refused with a 4xx. Afterwards the server is healthy and greedy
output is unchanged. The full-scale run (>= 200 cases per route and mode) is
benchmarks/reliability/schema_fuzz.py.
"""
from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis import checks as st_checks

from server_helpers import API_KEY, MODEL_NAME

AUTH = {"Authorization": f"Bearer {API_KEY}"}
GREEDY = {"model": MODEL_NAME, "prompt": "The laptop will not boot", "max_tokens": 8, "temperature": 0}
CHECKS = [st_checks.not_a_server_error, st_checks.status_code_conformance, st_checks.content_type_conformance,
          st_checks.response_schema_conformance, st_checks.response_headers_conformance,
          st_checks.negative_data_rejection]
CASES_PER_ROUTE = 40


def _document(base_url: str) -> dict:
    r = httpx.get(base_url + "/openapi.json", headers=AUTH)
    assert r.status_code == 200
    return r.json()


def test_openapi_document_describes_bodies_statuses_and_auth(real_server):
    doc = _document(real_server.base_url)
    paths = doc["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"):
        assert paths[path]["post"]["requestBody"]["required"] is True
        assert {"200", "400", "401", "413"} <= set(paths[path]["post"]["responses"])
    chat = paths["/v1/chat/completions"]["post"]["responses"]
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["429"]["headers"]["Retry-After"]["required"] is True
    assert doc["security"] == [{"bearerAuth": []}] and paths["/health"]["get"]["security"] == []
    assert "ChatCompletionRequest" in doc["components"]["schemas"]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_schemathesis_finds_no_5xx_and_no_schema_violation(real_server, mode):
    base = real_server.base_url
    with httpx.Client(timeout=30) as client:
        before = client.post(base + "/v1/completions", headers=AUTH, json=GREEDY).json()["choices"][0]["text"]
    schema = schemathesis.openapi.from_dict(_document(base))
    counts: dict[str, int] = {}
    statuses: dict[int, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.body is None or not len(operation.body):  # no inputs: nothing to generate
            continue

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=CASES_PER_ROUTE, deadline=None, database=None, derandomize=True,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        def run(case) -> None:
            response = case.call(base_url=base, headers=AUTH, timeout=30)
            counts[operation.label] = counts.get(operation.label, 0) + 1
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            case.validate_response(response, headers=AUTH, checks=CHECKS)

        run()
    print(f"\nschemathesis ({mode.value}): {counts}, statuses {dict(sorted(statuses.items()))}")
    assert set(counts) == {"POST /v1/chat/completions", "POST /v1/completions", "POST /tokenize",
                           "POST /detokenize"}
    assert min(counts.values()) >= CASES_PER_ROUTE // 2, counts
    assert max(statuses) < 500, statuses
    if mode == GenerationMode.NEGATIVE:  # a few mutate only the auth header, which the calls here set right
        assert sum(n for s, n in statuses.items() if 400 <= s < 500) >= 0.9 * sum(statuses.values()), statuses
    else:
        assert statuses.get(200, 0) > 0, statuses  # schema-valid bodies reach the engine, not only refusals
    assert httpx.get(base + "/health").status_code == 200
    with httpx.Client(timeout=30) as client:
        after = client.post(base + "/v1/completions", headers=AUTH, json=GREEDY).json()["choices"][0]["text"]
    assert after == before
